"""Issue 30 (C): files that decode "fine" into wrong pixels are corrupt on every read path.

A JPEG whose compressed data ends early (here: a 40 x 40 baseline JPEG whose SOF header is
patched to claim 48 x 48, so the last row and column of 8 x 8 blocks have no data) still ends
with its EOI marker; libjpeg only warns, PIL drops the warning and torchvision prints it, and
both return an image with grey blocks. It must count as corrupt in the trainer's CPU loader, on
the device-decode path, in the evaluator and in ``selfsup-shards --max-side``."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import ShardLoader
from selfsup.shard_writer import main as shards_main
from selfsup.views import ViewSpec
from selfsup_eval.data import decode as eval_decode, safe_decode
from selfsup_io.jpeg_check import JpegEndsEarly, check_jpeg


def jpeg(seed: int = 0, mode: str = "RGB", progressive: bool = False) -> bytes:
    """A 40 x 40 JPEG with 4:4:4 sampling (8 x 8 MCUs: 48 x 48 needs a sixth row of them)."""
    arr = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90, subsampling=0,
                                            progressive=progressive)
    return buf.getvalue()


def ends_early(data: bytes) -> bytes:
    """``data`` with its SOF header claiming 48 x 48: the data ends before the image does."""
    out = bytearray(data)
    i = next(i for i in (out.find(b"\xff\xc0"), out.find(b"\xff\xc2")) if i >= 0)
    out[i + 5:i + 9] = (48).to_bytes(2, "big") * 2
    return bytes(out)


def test_the_patched_file_is_what_the_issue_describes():
    bad = ends_early(jpeg())
    assert bad.endswith(b"\xff\xd9")  # still closed by its end marker
    img = Image.open(io.BytesIO(bad))
    img.load()  # PIL: no error, no warning
    assert img.size == (48, 48)
    from torchvision.io import decode_jpeg
    out = decode_jpeg(torch.frombuffer(bytearray(bad), dtype=torch.uint8))  # no error either
    assert out.shape == (3, 48, 48)


@pytest.mark.parametrize("mode,progressive", [("RGB", False), ("L", False), ("RGB", True)])
def test_check_jpeg_finds_data_that_ends_early(mode, progressive):
    good = jpeg(1, mode, progressive)
    check_jpeg(good)  # passes
    with pytest.raises(JpegEndsEarly, match="premature end"):
        check_jpeg(ends_early(good))
    check_jpeg(b"\x89PNG\r\n\x1a\n")  # not a JPEG: left to the caller's decoder


def test_check_jpeg_finds_a_cut_file_but_not_a_missing_end_marker():
    good = jpeg(2)
    for cut in (good[:len(good) * 2 // 3] + b"\xff\xd9", good[:len(good) * 2 // 3]):
        with pytest.raises(JpegEndsEarly):
            check_jpeg(cut)
    check_jpeg(good[:-2])  # every pixel there, only EOI missing: PIL decodes it whole, so do we
    check_jpeg(good + b"\x00" * 64)  # padding after EOI


def test_the_evaluator_counts_it_as_corrupt():
    good, bad = jpeg(3), ends_early(jpeg(3))
    assert eval_decode(good, 32, 3).shape == (3, 32, 32)
    with pytest.raises(JpegEndsEarly):
        eval_decode(bad, 32, 3)
    assert safe_decode((bad, 32, 3)) is None  # the extraction's "skipped and counted"


def shard(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_the_training_loader_counts_it_as_corrupt(tmp_path, decode):
    members = []
    for i in range(4):
        members += [(f"k{i}.jpg", jpeg(10 + i)), (f"k{i}.cls", b"0")]
    members.insert(4, ("bad.jpg", ends_early(jpeg(20))))
    members.insert(5, ("bad.cls", b"1"))
    url = shard(tmp_path / "s-000000.tar", members)
    loader = ShardLoader(url, batch_size=4, num_workers=0, views=[ViewSpec(16, random=False)],
                         samples_per_epoch=5, decode=decode, shuffle_buffer=1)
    (batch,) = list(loader.epoch(0))
    batch = loader.to_device(batch, "cpu")  # device mode: the worker's check ran before this
    assert batch["corrupt"] == 1
    assert "bad" not in batch["key"] and len(batch["key"]) == 4
    assert batch["image"].shape == (4, 1, 3, 16, 16)


def test_selfsup_shards_max_side_names_it_and_does_not_reencode_it(tmp_path, capsys):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "good.jpg").write_bytes(jpeg(30))
    (src / "bad.jpg").write_bytes(ends_early(jpeg(31)))
    assert shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train",
                        "--max-side", "16"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable file(s)" in err and "bad.jpg" in err and "ends early" in err
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tf:
        jpgs = [m for m in tf.getmembers() if m.name.endswith(".jpg")]
    assert len(jpgs) == 1
