"""Issue 30 (C): selfsup-shards writes what the docs promise from an image folder and names
what it does not write: GIFs are re-encoded as PNG, a file link into another class is not a
second sample under a second label, and files without an image extension are named."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from selfsup.shard_writer import main as shards_main


def members(out):
    with tarfile.open(out / "train-000000.tar") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def paths_and_labels(found):
    return {json.loads(v)["path"]: int(found[k[:-5] + ".cls"]) for k, v in found.items() if k.endswith(".json")}


def test_a_gif_is_written_as_png_with_its_pixels(tmp_path, capsys):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:4] = (255, 0, 0)
    arr[4:] = (0, 0, 255)
    Image.fromarray(arr).save(src / "flag.gif")  # palette image: two exact colours
    Image.fromarray(arr).save(src / "flag.png")
    assert shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train"]) == 0
    found = members(tmp_path / "out")
    assert sorted(paths_and_labels(found)) == ["a/flag.gif", "a/flag.png"]
    key = next(k[:-5] for k, v in found.items() if k.endswith(".json") and b"flag.gif" in v)
    img = Image.open(io.BytesIO(found[key + ".png"]))
    assert img.format == "PNG" and np.array_equal(np.asarray(img.convert("RGB")), arr)
    assert "warning" not in capsys.readouterr().err


def test_a_file_link_into_another_class_is_not_a_second_label(tmp_path, capsys):
    root = tmp_path / "src"
    for cls in ("c0", "c1"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (100 if cls == "c0" else 200, 0, 0)).save(root / cls / "0.png")
    os.symlink("../c0/0.png", root / "c1" / "stolen.png")  # c0's image under c1's label
    os.symlink("../c1/0.png", root / "c0" / "a-stolen.png")  # the same, read before its class
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (8, 8), (0, 99, 0)).save(outside / "x.png")
    os.symlink(outside / "x.png", root / "c1" / "linked.png")  # data assembled from links: kept
    assert shards_main([str(root), str(tmp_path / "out"), "--split", "train"]) == 0
    assert paths_and_labels(members(tmp_path / "out")) == {"c0/0.png": 0, "c1/0.png": 1, "c1/linked.png": 1}
    err = capsys.readouterr().err
    assert "not following 2 link(s)" in err and "c1/stolen.png" in err and "c0/a-stolen.png" in err


def test_files_without_an_image_extension_are_named(tmp_path, capsys):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "ok.png")
    (src / "README.txt").write_text("notes")
    (src / "labels.csv").write_text("a,b")
    assert shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train"]) == 0
    err = capsys.readouterr().err
    assert "not writing 2 file(s) without an image extension: a/README.txt, a/labels.csv" in err
