"""selfsup-shards round trips (read back independently with tarfile) and shard specifications."""

import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import make_images
from selfsup.shards import ShardSpecError, main, resolve_shards


def read_tars(paths):
    """Independent reader: plain tarfile, grouping members by key."""
    samples = {}
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_round_trip_is_pixel_exact(tmp_path, channels):
    images, labels = make_images(25, size=12, classes=3, channels=3)
    if channels == 1:
        images = images[..., 0]
    np.savez(tmp_path / "d.npz", images=images, labels=labels, class_names=np.array(["a", "b", "c"]))
    assert main([str(tmp_path / "d.npz"), str(tmp_path / "out"), "--split", "val", "--shard-size", "10"]) == 0
    index = json.loads((tmp_path / "out" / "val.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [10, 10, 5]
    assert index["num_samples"] == 25 and index["class_names"] == ["a", "b", "c"]
    assert [s["name"] for s in index["shards"]] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    samples = read_tars(sorted((tmp_path / "out").glob("val-*.tar")))
    assert len(samples) == 25
    for i in range(25):
        s = samples[f"val-{i:08d}"]
        assert int(s["cls"]) == labels[i]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), images[i])
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_image_folder_round_trip(tmp_path):
    images, labels = make_images(6, size=8, classes=2)
    for i, (img, c) in enumerate(zip(images, labels)):
        d = tmp_path / "src" / ["cat", "dog"][c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train", "--image-format", "jpg"]) == 0
    index = json.loads((tmp_path / "out" / "train.json").read_text())
    assert index["class_names"] == ["cat", "dog"] and index["num_samples"] == 6
    samples = read_tars([tmp_path / "out" / "train-000000.tar"])
    assert sorted(int(s["cls"]) for s in samples.values()) == [0, 0, 0, 1, 1, 1]
    assert all("jpg" in s for s in samples.values())


def write_idx(path, arr):
    """The MNIST idx format, gzipped, as the Debian package ships it."""
    dims = arr.shape
    header = struct.pack(">BBBB", 0, 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_torchvision_fashion_mnist_from_raw_idx_files(tmp_path):
    raw = tmp_path / "fmnist"
    raw.mkdir()
    rng = np.random.default_rng(0)
    imgs, labs = rng.integers(0, 255, (7, 28, 28)), np.arange(7) % 10
    write_idx(raw / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", labs)
    assert main([f"torchvision:FashionMNIST:{raw}", str(tmp_path / "out"), "--split", "test"]) == 0
    index = json.loads((tmp_path / "out" / "test.json").read_text())
    assert index["num_samples"] == 7 and index["class_names"][0] == "T-shirt/top"
    s = read_tars([tmp_path / "out" / "test-000000.tar"])["test-00000004"]
    assert int(s["cls"]) == 4
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), imgs[4])


@pytest.mark.parametrize("args,message", [
    (["missing.npz", "out", "--split", "train"], "does not exist"),
    (["torchvision:ImageNet:/x", "out", "--split", "train"], "unsupported torchvision data set"),
    (["bad.npz", "out", "--split", "train"], "no 'images' array"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("selfsup-shards: error:") and message in err


@pytest.fixture
def two_splits(tmp_path):
    images, labels = make_images(30, size=8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    for split in ("train", "val"):
        main([str(tmp_path / "d.npz"), str(tmp_path / "out"), "--split", split, "--shard-size", "10"])
    return tmp_path / "out"


def test_resolve_every_spec_form(two_splits):
    out = two_splits
    by_index = resolve_shards(str(out / "train.json"))
    assert by_index.num_samples == 30 and by_index.shard_sizes == [10, 10, 10]
    assert by_index.urls == [str(out / f"train-00000{i}.tar") for i in range(3)]
    brace = resolve_shards(str(out / "train-{000000..000001}.tar"))
    assert brace.urls == by_index.urls[:2] and brace.num_samples == 20  # counts from train.json
    joined = resolve_shards(f"{out}/train.json::{out}/val.json")
    assert len(joined.urls) == 6 and joined.num_samples == 60
    pipe = resolve_shards("pipe:cat /d/x-{0..2}.tar")
    assert pipe.urls == ["pipe:cat /d/x-0.tar", "pipe:cat /d/x-1.tar", "pipe:cat /d/x-2.tar"]
    assert pipe.num_samples is None
    assert len(resolve_shards("https://h/s-{000..009}.tar").urls) == 10


def test_resolve_errors_name_the_problem(two_splits, tmp_path):
    with pytest.raises(ShardSpecError, match="several shard indexes .*train.json, val.json"):
        resolve_shards(str(two_splits))
    assert resolve_shards(str(two_splits), prefer=("val", "test")).urls[0].endswith("val-000000.tar")
    with pytest.raises(ShardSpecError, match="no such file or directory"):
        resolve_shards(str(tmp_path / "nope"))
    with pytest.raises(ShardSpecError, match="do not exist"):
        resolve_shards(str(two_splits / "train-{000000..000009}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSpecError, match="empty shard set"):
        resolve_shards(str(tmp_path / "empty"))
    (two_splits / "train-000001.tar").unlink()
    with pytest.raises(ShardSpecError, match="lists 1 shard"):
        resolve_shards(str(two_splits / "train.json"))
