"""selfsup-shards round trips, read back independently of the writer (webdataset's own reader and
plain tarfile), and every form of shard specification with its errors."""

import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFile

from conftest import child_env, make_images
from selfsup.shard_writer import main
from selfsup_io.shards import ShardSet, ShardSpecError, resolve_shards


def read_tars(urls):
    """Independent reader (plain tarfile): {key: {ext: bytes}} in stream order."""
    samples = {}
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    return samples


def tar_members(path):
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers()]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def index_of(out, split):
    return json.loads((out / f"{split}.json").read_text())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # webdataset's open files
@pytest.mark.parametrize("channels", [1, 3])
def test_npz_round_trip_is_pixel_exact(tmp_path, channels):
    images, labels = make_images(25, size=12, classes=3, channels=3)
    if channels == 1:
        images = images[..., 0]
    np.savez(tmp_path / "d.npz", images=images, labels=labels, class_names=np.array(["a", "b", "c"]))
    out = tmp_path / "out"
    assert main([str(tmp_path / "d.npz"), str(out), "--split", "val", "--shard-size", "10"]) == 0
    index = index_of(out, "val")
    assert index == {"format": "selfsup-shards/1", "split": "val", "num_samples": 25,
                     "class_names": ["a", "b", "c"], "image_format": "keep", "max_side": None,
                     "shards": [{"name": "val-000000.tar", "num_samples": 10},
                                {"name": "val-000001.tar", "num_samples": 10},
                                {"name": "val-000002.tar", "num_samples": 5}]}
    assert sorted(os.listdir(out)) == ["val-000000.tar", "val-000001.tar", "val-000002.tar", "val.json"]
    assert tar_members(out / "val-000002.tar") == [f"val-{i:08d}.{e}" for i in range(20, 25) for e in ("cls", "png")]
    samples = read_tars(sorted(out.glob("val-*.tar")))
    assert list(samples) == [f"val-{i:08d}" for i in range(25)]
    stream = wds.WebDataset([str(p) for p in sorted(out.glob("val-*.tar"))], shardshuffle=False)
    assert [{k: s[k] for k in ("__key__", "cls", "png")} for s in stream] == list(samples.values())
    for i, s in enumerate(samples.values()):
        assert s["cls"] == str(labels[i]).encode()
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == ("L" if channels == 1 else "RGB")  # grayscale stays single-channel
        np.testing.assert_array_equal(np.asarray(img), images[i])


def test_npz_single_channel_axis_and_unlabelled(tmp_path):
    images, _ = make_images(4, size=6, channels=3)
    np.savez(tmp_path / "d.npz", images=images[..., :1])  # (N,H,W,1), no labels
    assert main([str(tmp_path / "d.npz"), str(tmp_path / "o"), "--split", "train"]) == 0
    index = index_of(tmp_path / "o", "train")
    assert index["class_names"] is None and index["num_samples"] == 4
    samples = read_tars([tmp_path / "o" / "train-000000.tar"])
    assert all("cls" not in s for s in samples.values())
    np.testing.assert_array_equal(pixels(samples["train-00000003"]["png"]), images[3, :, :, 0])


def test_npz_without_class_names_numbers_the_classes(tmp_path):
    images, labels = make_images(5, size=6, classes=3)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    main([str(tmp_path / "d.npz"), str(tmp_path / "o"), "--split", "train"])
    assert index_of(tmp_path / "o", "train")["class_names"] == ["0", "1", "2"]


def make_folder(root, images, labels, names, ext="png", start=0):
    for i, (img, c) in enumerate(zip(images, labels), start):
        (root / names[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / names[c] / f"{i:02d}.{ext}", quality=90)


@pytest.mark.parametrize("image_format", ["keep", "png"])
def test_image_folder_png_round_trip(tmp_path, image_format):
    images, labels = make_images(7, size=8, classes=2)
    make_folder(tmp_path / "src", images, labels, ["dog", "cat"])  # class 0 = "dog" on disk
    (tmp_path / "src" / "cat" / "notes.txt").write_text("not an image")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train", "--shard-size", "4",
                 "--image-format", image_format]) == 0
    index = index_of(tmp_path / "out", "train")
    assert index["image_format"] == image_format and index["max_side"] is None
    assert index["class_names"] == ["cat", "dog"]  # sorted folder names, as ImageFolder
    assert [s["num_samples"] for s in index["shards"]] == [4, 3]
    samples = list(read_tars(sorted((tmp_path / "out").glob("train-*.tar"))).values())
    assert len(samples) == 7
    for s in samples:
        path = json.loads(s["json"])["path"]
        i = int(path.split("/")[1][:2])
        assert path == f"{['dog', 'cat'][labels[i]]}/{i:02d}.png"
        assert int(s["cls"]) == {"cat": 0, "dog": 1}[path.split("/")[0]]
        np.testing.assert_array_equal(pixels(s["png"]), images[i])
        if image_format == "keep":
            assert s["png"] == (tmp_path / "src" / path).read_bytes()


def test_image_folder_jpg_passthrough_and_reencode(tmp_path):
    images, labels = make_images(4, size=16, classes=2)
    make_folder(tmp_path / "src", images[:2], labels[:2], ["a", "b"], ext="jpg")
    make_folder(tmp_path / "src", images[2:], labels[2:], ["a", "b"], ext="png", start=2)
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train", "--image-format", "jpg"]) == 0
    samples = read_tars([tmp_path / "out" / "train-000000.tar"])
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    assert sorted(by_path) == ["a/00.jpg", "a/02.png", "b/01.jpg", "b/03.png"]
    assert by_path["a/00.jpg"]["jpg"] == (tmp_path / "src" / "a" / "00.jpg").read_bytes()  # unchanged
    expected = io.BytesIO()
    Image.fromarray(images[2]).save(expected, format="JPEG", quality=95)  # --jpeg-quality default
    assert by_path["a/02.png"]["jpg"] == expected.getvalue()


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_keep_stores_originals_under_their_real_format(tmp_path, capsys):
    """The default: files byte for byte under the extension of the format PIL sniffs (not the
    name's); BMP/TIFF re-encoded as PNG; an unreadable file skipped, counted and reported."""
    images, _ = make_images(8, size=12)
    src = tmp_path / "src"
    files = {"a/00.jpg": encoded(Image.fromarray(images[0]), "JPEG", quality=90),
             "a/01.jpg": encoded(Image.fromarray(images[1]), "PNG"),  # a PNG named .jpg
             "a/02.bmp": encoded(Image.fromarray(images[2]), "BMP"),
             "a/03.jpeg": encoded(Image.fromarray(images[3][..., 0]), "JPEG", quality=80),  # grayscale
             "b/04.png": b"\x89PNG\r\n\x1a\n but no more",  # unreadable: skipped
             "b/05.tiff": encoded(Image.fromarray(images[5]), "TIFF"),
             "b/06.webp": encoded(Image.fromarray(images[6]), "WEBP", quality=80),
             "b/07.jpg": encoded(Image.fromarray(images[7]), "MPO", save_all=True,  # camera JPEG
                                 append_images=[Image.fromarray(images[0])])}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    assert Image.open(src / "b/07.jpg").format == "MPO"
    out = tmp_path / "out"
    assert main([str(src), str(out), "--split", "train", "--shard-size", "3"]) == 0
    warning = capsys.readouterr().err.strip().splitlines()[-1]
    assert warning.startswith("selfsup-shards: warning: skipped 1 unreadable file(s): ")
    assert str(src / "b/04.png") in warning
    index = index_of(out, "train")
    assert index["image_format"] == "keep" and index["max_side"] is None
    assert index["num_samples"] == 7 and [s["num_samples"] for s in index["shards"]] == [3, 3, 1]
    samples = read_tars(sorted(out.glob("train-*.tar")))
    assert list(samples) == [f"train-{i:08d}" for i in range(7)]  # no gap where the file was skipped
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    assert {p: sorted(set(s) - {"__key__", "json"}) for p, s in by_path.items()} == {
        "a/00.jpg": ["cls", "jpg"], "a/01.jpg": ["cls", "png"], "a/02.bmp": ["cls", "png"],
        "a/03.jpeg": ["cls", "jpg"], "b/05.tiff": ["cls", "png"], "b/06.webp": ["cls", "webp"],
        "b/07.jpg": ["cls", "jpg"]}
    for path, ext in [("a/00.jpg", "jpg"), ("a/01.jpg", "png"), ("a/03.jpeg", "jpg"),
                      ("b/06.webp", "webp"), ("b/07.jpg", "jpg")]:
        assert by_path[path][ext] == files[path], path  # the file's own bytes
    for path, i in [("a/02.bmp", 2), ("b/05.tiff", 5)]:
        assert Image.open(io.BytesIO(by_path[path]["png"])).format == "PNG"
        np.testing.assert_array_equal(pixels(by_path[path]["png"]), images[i])  # lossless
    assert [int(by_path[p]["cls"]) for p in sorted(by_path)] == [0, 0, 0, 0, 1, 1, 1]
    stream = wds.WebDataset([str(p) for p in sorted(out.glob("train-*.tar"))], shardshuffle=False)
    assert [sorted(s) for s in stream][-1] == ["__key__", "__local_path__", "__url__", "cls", "jpg", "json"]


def test_keep_decodes_no_pixels(tmp_path, monkeypatch):
    """Header sniffing only: a decode anywhere would fail the run."""
    images, labels = make_images(6, size=16, classes=3)
    make_folder(tmp_path / "src", images[:3], labels[:3], ["a", "b", "c"], ext="jpg")
    make_folder(tmp_path / "src", images[3:], labels[3:], ["a", "b", "c"], ext="webp", start=3)
    make_folder(tmp_path / "src", images[:2], labels[:2], ["a", "b", "c"], ext="png", start=6)

    def no_decode(self):
        raise AssertionError("pixels decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train"]) == 0
    assert index_of(tmp_path / "out", "train")["num_samples"] == 8


def test_max_side_downscales_big_images_and_keeps_small_ones(tmp_path):
    yy, xx = np.mgrid[:240, :400]
    photo = np.stack([xx // 2, yy, (xx // 2 + yy) // 2], -1).astype(np.uint8)  # smooth: JPEG-friendly
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.fromarray(photo).save(src / "big.jpg", quality=90)  # 400x240 → 64x38 (38.4), via draft 1/2
    Image.fromarray(photo[:, :180]).save(src / "tall.png")  # 180 wide, 240 high → 48x64
    Image.fromarray(photo[:64, :40]).save(src / "edge.jpg", quality=90)  # 40x64: within N, kept
    Image.fromarray(photo[:30, :50]).save(src / "small.webp", quality=90)
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), str(out), "--split", "val", "--max-side", "64"]) == 0
    index = index_of(out, "val")
    assert index["image_format"] == "keep" and index["max_side"] == 64
    first = (out / "val-000000.tar").read_bytes()
    by_path = {json.loads(s["json"])["path"]: s for s in read_tars([out / "val-000000.tar"]).values()}
    big = Image.open(io.BytesIO(by_path["a/big.jpg"]["jpg"]))
    assert big.format == "JPEG" and big.size[0] == 64 and abs(big.size[1] - 240 * 64 / 400) <= 1
    reference = Image.open(src / "big.jpg").resize(big.size, Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(big, float) - np.asarray(reference, float)).mean() < 4  # the same picture
    tall = Image.open(io.BytesIO(by_path["a/tall.png"]["png"]))
    assert tall.format == "PNG" and tall.size[1] == 64 and abs(tall.size[0] - 180 * 64 / 240) <= 1
    assert by_path["a/edge.jpg"]["jpg"] == (src / "edge.jpg").read_bytes()
    assert by_path["a/small.webp"]["webp"] == (src / "small.webp").read_bytes()
    assert main([str(tmp_path / "src"), str(out), "--split", "val", "--max-side", "64"]) == 0
    assert (out / "val-000000.tar").read_bytes() == first  # byte-reproducible


def test_max_side_with_jpg_and_arrays(tmp_path):
    images, labels = make_images(3, size=40, classes=3)
    make_folder(tmp_path / "src", images, labels, ["a", "b", "c"], ext="png")
    make_folder(tmp_path / "src", images[:1, :20, :20], labels[:1], ["a", "b", "c"], ext="jpg", start=3)
    assert main([str(tmp_path / "src"), str(tmp_path / "o"), "--split", "train", "--image-format", "jpg",
                 "--max-side", "24"]) == 0
    by_path = {json.loads(s["json"])["path"]: s for s in read_tars([tmp_path / "o" / "train-000000.tar"]).values()}
    assert {p: Image.open(io.BytesIO(s["jpg"])).size for p, s in by_path.items()} == {
        "a/00.png": (24, 24), "b/01.png": (24, 24), "c/02.png": (24, 24), "a/03.jpg": (20, 20)}
    assert by_path["a/03.jpg"]["jpg"] == (tmp_path / "src" / "a" / "03.jpg").read_bytes()
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    assert main([str(tmp_path / "d.npz"), str(tmp_path / "n"), "--split", "train", "--max-side", "16"]) == 0
    s = read_tars([tmp_path / "n" / "train-000000.tar"])["train-00000002"]
    assert Image.open(io.BytesIO(s["png"])).size == (16, 16)
    assert index_of(tmp_path / "n", "train")["max_side"] == 16


def write_idx(path, arr, compress=True):
    """The MNIST idx format: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """Tiny Fashion-MNIST raw files laid out as the Debian package does (all in one folder, .gz)."""
    rng = np.random.default_rng(0)
    data = {"train": (rng.integers(0, 256, (12, 28, 28)), (np.arange(12) * 3) % 10),
            "t10k": (rng.integers(0, 256, (7, 28, 28)), np.arange(7) % 10)}
    raw = tmp_path / "fmnist"
    raw.mkdir()
    for prefix, (imgs, labs) in data.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labs)
    return raw, data


@pytest.mark.parametrize("split,extra,prefix", [("train", [], "train"), ("test", [], "t10k"),
                                                ("val", [], "t10k"),
                                                ("holdout", ["--torchvision-split", "train"], "train")])
def test_torchvision_fashion_mnist_from_raw_idx_files(tmp_path, fake_fmnist, split, extra, prefix):
    raw, data = fake_fmnist
    imgs, labs = data[prefix]
    out = tmp_path / "out"
    assert main([f"torchvision:FashionMNIST:{raw}", str(out), "--split", split, "--shard-size", "5", *extra]) == 0
    index = index_of(out, split)
    assert index["num_samples"] == len(imgs)
    assert index["class_names"][:2] == ["T-shirt/top", "Trouser"] and len(index["class_names"]) == 10
    samples = list(read_tars(sorted(out.glob(f"{split}-*.tar"))).values())
    assert [int(s["cls"]) for s in samples] == labs.tolist()
    for s, img in zip(samples, imgs):
        np.testing.assert_array_equal(pixels(s["png"]), img)


def test_torchvision_layout_with_uncompressed_idx(tmp_path, fake_fmnist):
    """ROOT/FashionMNIST/raw/*-ubyte (torchvision's own layout), not gzipped."""
    _, data = fake_fmnist
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", data["t10k"][0], compress=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", data["t10k"][1], compress=False)
    assert main([f"torchvision:FashionMNIST:{tmp_path / 'root'}", str(tmp_path / "o"), "--split", "test"]) == 0
    s = read_tars([tmp_path / "o" / "test-000000.tar"])["test-00000004"]
    assert int(s["cls"]) == 4
    np.testing.assert_array_equal(pixels(s["png"]), data["t10k"][0][4])


def test_rewrite_is_atomic_and_drops_stale_shards(tmp_path):
    images, labels = make_images(25, size=6)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    out = tmp_path / "out"
    main([str(tmp_path / "d.npz"), str(out), "--split", "train", "--shard-size", "5"])
    (out / "other-000009.tar").write_bytes(b"")  # another split: untouched
    main([str(tmp_path / "d.npz"), str(out), "--split", "train", "--shard-size", "10"])
    assert sorted(os.listdir(out)) == ["other-000009.tar", "train-000000.tar", "train-000001.tar",
                                       "train-000002.tar", "train.json"]  # no *.tmp, no train-000004
    assert resolve_shards(str(out / "train.json")).shard_sizes == [10, 10, 5]


@pytest.mark.parametrize("args,message", [
    (["missing.npz", "out", "--split", "train"], "SOURCE missing.npz does not exist"),
    (["torchvision:ImageNet:.", "out", "--split", "train"], "unsupported torchvision data set 'ImageNet'"),
    (["torchvision:CIFAR10:.", "out", "--split", "train"], "Dataset not found"),
    (["torchvision:FashionMNIST:.", "out", "--split", "extra"], "--torchvision-split"),
    (["noimages.npz", "out", "--split", "train"], "has no 'images' array"),
    (["mismatch.npz", "out", "--split", "train"], "'labels' must have shape (3,)"),
    (["names.npz", "out", "--split", "train"], "label 2 but only 2 class_names"),
    (["notzip.npz", "out", "--split", "train"], "not a readable .npz"),
    (["folder", "out", "--split", "train"], "Couldn't find any class folder"),
    (["corrupt", "out", "--split", "train"], "none of its 2 image file(s) could be read, e.g. corrupt/a/0.png"),
    (["corrupt", "out", "--split", "train", "--image-format", "png"], "could be read"),
    (["mismatch.npz", "out", "--split", "a.b"], "--split 'a.b'"),
    (["mismatch.npz", "out", "--split", "train", "--shard-size", "0"], "--shard-size must be at least 1"),
    (["mismatch.npz", "out", "--split", "train", "--max-side", "15"], "--max-side must be at least 16"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    np.savez("noimages.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    np.savez("mismatch.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2, int))
    np.savez("names.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.arange(3), class_names=["x", "y"])
    (tmp_path / "notzip.npz").write_text("hello")
    (tmp_path / "folder").mkdir()
    (tmp_path / "corrupt" / "a").mkdir(parents=True)
    (tmp_path / "corrupt" / "a" / "0.png").write_bytes(b"garbage")  # nothing readable at all
    (tmp_path / "corrupt" / "a" / "1.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("selfsup-shards: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no *.tmp left


def test_cli_error_as_a_process(tmp_path):
    """The console script's view: exit status 2, one stderr line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "selfsup.shard_writer", str(tmp_path / "nope"), str(tmp_path / "o"),
                        "--split", "train"], capture_output=True, text=True, env=child_env())
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"selfsup-shards: error: SOURCE {tmp_path / 'nope'} does not exist"]


# --------------------------------------------------------------------------- resolve_shards ----
@pytest.fixture
def two_splits(tmp_path):
    images, labels = make_images(30, size=8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels, class_names=list("wxyz"))
    for split in ("train", "val"):
        main([str(tmp_path / "d.npz"), str(tmp_path / "out"), "--split", split, "--shard-size", "10"])
    return tmp_path / "out"


def test_resolve_index_directory_and_brace(two_splits):
    out = two_splits
    urls = [str(out / f"train-00000{i}.tar") for i in range(3)]
    by_index = resolve_shards(str(out / "train.json"))
    assert by_index == ShardSet(urls, 30, [10, 10, 10], list("wxyz"), str(out / "train.json"))
    (out / "val.json").rename(out / "val.json.bak")
    assert resolve_shards(str(out)).urls == urls  # the one index in DIR
    (out / "val.json.bak").rename(out / "val.json")
    assert resolve_shards(str(out), prefer=("val", "test")).urls[0] == str(out / "val-000000.tar")
    brace = resolve_shards(str(out / "train-{000000..000001}.tar"))
    assert (brace.urls, brace.num_samples, brace.shard_sizes) == (urls[:2], 20, [10, 10])  # counts from train.json
    both = resolve_shards(str(out / "{train,val}-{000000..000002}.tar"))
    assert both.num_samples == 60 and both.class_names == list("wxyz")
    single = resolve_shards(str(out / "val-000002.tar"))
    assert single.urls == [str(out / "val-000002.tar")] and single.shard_sizes == [10]
    shutil.copy(out / "train-000000.tar", out / "train-000007.tar")  # not in train.json
    unknown = resolve_shards(str(out / "train-{000000,000007}.tar"))
    assert len(unknown.urls) == 2 and unknown.num_samples is None and unknown.shard_sizes is None


def test_resolve_joins_and_urls(two_splits):
    out = two_splits
    joined = resolve_shards(f"{out}/train.json::{out}/val-{{000000..000001}}.tar")
    assert len(joined.urls) == 5 and joined.num_samples == 50 and joined.shard_sizes == [10] * 5
    assert joined.class_names == list("wxyz") and joined.spec == f"{out}/train.json::{out}/val-{{000000..000001}}.tar"
    pipe = resolve_shards("pipe:aws s3 cp s3://b/x-{0..2}.tar -")
    assert pipe.urls == [f"pipe:aws s3 cp s3://b/x-{i}.tar -" for i in range(3)]
    assert pipe.num_samples is None and pipe.shard_sizes is None and pipe.class_names is None
    web = resolve_shards("https://h/s-{000..009}.tar")
    assert web.urls[0] == "https://h/s-000.tar" and len(web.urls) == 10
    mixed = resolve_shards(f"{out}/train.json::http://h/a.tar")
    assert mixed.urls[-1] == "http://h/a.tar" and mixed.num_samples is None and mixed.class_names is None


def test_resolve_errors_name_the_problem(two_splits, tmp_path):
    out = two_splits
    cases = [
        (str(out), r"several shard indexes \(train.json, val.json\): pass .*/NAME.json"),
        (str(tmp_path / "nope"), "nope: no such file or directory"),
        (str(out / "train-{000000..000009}.tar"), "7 of 10 shards do not exist"),
        (str(out / "test-{000000..000002}.tar"), "matches no file"),
        ("", "empty shard specification"),
        (f"{out}/train.json::", "empty part between '::'"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), "empty shard set"))
    (tmp_path / "tars").mkdir()
    for i in range(3):
        shutil.copy(out / f"train-00000{i}.tar", tmp_path / "tars")
    cases.append((str(tmp_path / "tars"), r"3 .tar file\(s\) but no shard index .*train-\{000000..000002\}.tar"))
    (tmp_path / "bad.json").write_text("{not json")
    cases.append((str(tmp_path / "bad.json"), "bad.json is not a selfsup shard index"))
    (tmp_path / "none.json").write_text(json.dumps({"format": "selfsup-shards/1", "shards": []}))
    cases.append((str(tmp_path / "none.json"), "lists no shards"))
    for spec, message in cases:
        with pytest.raises(ShardSpecError, match=message) as e:
            resolve_shards(spec)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    (out / "train-000001.tar").unlink()
    with pytest.raises(ShardSpecError, match="lists 1 shard.* that do not exist, e.g. .*train-000001.tar"):
        resolve_shards(str(out / "train.json"))
