"""selfsup-shards torchvision:NAME:ROOT for the VTAB data sets torchvision reads with a split
(the splits VTAB uses), checked on small on-disk layouts made here in torchvision's own format."""

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from selfsup.shard_writer import main as shards_main


def _jpg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


def _labels(index):
    out = {}
    for name in json.loads(index.read_text())["shards"]:
        with tarfile.open(index.parent / name["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    out[m.name[:-4]] = int(tar.extractfile(m).read())
    return out


def test_dtd_train_is_train_plus_val_and_test_is_test(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    lists = {"train1": ["banded/a.jpg", "dotted/b.jpg"], "val1": ["banded/c.jpg", "dotted/d.jpg"],
             "test1": ["banded/e.jpg", "dotted/f.jpg", "dotted/g.jpg"]}
    for name, files in lists.items():
        for i, f in enumerate(files):
            _jpg(data / "images" / f, 40 * i)
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{name}.txt").write_text("\n".join(files) + "\n")
    out = tmp_path / "shards"
    assert shards_main([f"torchvision:DTD:{tmp_path}", str(out), "--split", "train"]) == 0
    assert shards_main([f"torchvision:DTD:{tmp_path}", str(out), "--split", "test"]) == 0
    train, test = json.loads((out / "train.json").read_text()), json.loads((out / "test.json").read_text())
    assert train["num_samples"] == 4 and test["num_samples"] == 3
    assert train["class_names"] == test["class_names"] == ["banded", "dotted"]
    assert sorted(_labels(out / "train.json").values()) == [0, 0, 1, 1]
    assert sorted(_labels(out / "test.json").values()) == [0, 1, 1]


def test_pets_trainval_and_test_and_a_missing_layout_is_one_line(tmp_path, capsys):
    base = tmp_path / "oxford-iiit-pet"
    rows = {"trainval": [("Abyssinian_1", 1, 1), ("beagle_2", 2, 2)], "test": [("beagle_3", 2, 2)]}
    (base / "annotations" / "trimaps").mkdir(parents=True)
    for split, items in rows.items():
        (base / "annotations" / f"{split}.txt").write_text("".join(f"{i} {c} {b} 1\n" for i, c, b in items))
        for image_id, _, _ in items:
            _jpg(base / "images" / f"{image_id}.jpg", 90)
    out = tmp_path / "shards"
    assert shards_main([f"torchvision:OxfordIIITPet:{tmp_path}", str(out), "--split", "train"]) == 0
    assert sorted(_labels(out / "train.json").values()) == [0, 1]
    assert shards_main([f"torchvision:OxfordIIITPet:{tmp_path}", str(out), "--split", "test"]) == 0
    assert list(_labels(out / "test.json").values()) == [1]
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the writer's bad-input exit: one line, status 2
        shards_main([f"torchvision:SVHN:{empty}", str(tmp_path / "x"), "--split", "train"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SVHN" in err and "splits train" in err
