"""Issue 16: 16-bit images are not clipped to {0, 255}, and no small file makes a reader allocate
gigabytes, in the trainer's loader, the evaluator and selfsup-shards alike (selfsup_io.images);
selfsup-shards reads each folder once and names every file it skips."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import ShardLoader
from selfsup.decode import decode_views
from selfsup.shard_writer import main as shards_main
from selfsup.views import ViewSpec
from selfsup_eval.data import decode as eval_decode
from selfsup_io.images import ImageTooLarge, to_8bit

GRADIENT16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png16() -> bytes:
    data = png_bytes(Image.fromarray(GRADIENT16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    return data


def expected8() -> np.ndarray:
    return (GRADIENT16 >> 8).astype(np.uint8)  # 0..255, every grey level: not {0, 255}


def test_to_8bit_takes_the_high_byte():
    out = np.asarray(to_8bit(Image.open(io.BytesIO(png16()))))
    assert out.dtype == np.uint8 and np.array_equal(out, expected8())
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_8bit(rgb) is rgb


def test_the_training_loader_keeps_16_bit_grey_levels(tmp_path):
    with tarfile.open(tmp_path / "s-000000.tar", "w") as tf:
        for name, data in (("k0.png", png16()), ("k0.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    loader = ShardLoader(str(tmp_path / "s-000000.tar"), batch_size=1, num_workers=0,
                         views=[ViewSpec(16, random=False)], samples_per_epoch=1)
    (batch,) = list(loader.epoch(0))
    view = batch["image"][0, 0]  # (3, 16, 16): the whole image at its own size
    for c in range(3):
        assert (view[c].numpy().astype(int) - expected8()).__abs__().max() <= 1


def test_evaluation_keeps_16_bit_grey_levels():
    for channels in (1, 3):
        out = eval_decode(png16(), 16, channels)
        assert out.shape == (channels, 16, 16)
        assert np.array_equal(out[0].numpy(), expected8())


def test_selfsup_shards_reencodes_16_bit_without_clipping(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.png").write_bytes(png16())
    assert shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train",
                        "--image-format", "png"]) == 0
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tf:
        data = tf.extractfile(next(m for m in tf.getmembers() if m.name.endswith(".png"))).read()
    img = Image.open(io.BytesIO(data))
    assert img.mode == "L" and np.array_equal(np.asarray(img), expected8())


def test_resizing_a_thin_strip_is_refused_before_it_allocates():
    """A 1 x 2000 PNG of ~100 bytes, shorter side resized to 256: 256 x 512,000 pixels (1.3 GB
    for 1 x 20,000). The evaluator refuses it (a corrupt sample) before resizing."""
    strip = png_bytes(Image.new("L", (1, 2000)))
    assert len(strip) < 200
    with pytest.raises(ImageTooLarge, match="resized image of 256x512000"):
        eval_decode(strip, 256, 3)


def test_decoding_more_pixels_than_the_budget_is_refused(monkeypatch):
    monkeypatch.setenv("SELFSUP_MAX_PIXELS", "10000")
    big = png_bytes(Image.new("RGB", (200, 200)))
    boxes = torch.tensor([[0.0, 0.0, 200.0, 200.0]])
    with pytest.raises(ImageTooLarge):
        decode_views(big, boxes, 16)
    with pytest.raises(ImageTooLarge):
        eval_decode(big, 16, 3)
    small = png_bytes(Image.new("RGB", (100, 100)))
    assert decode_views(small, torch.tensor([[0.0, 0.0, 100.0, 100.0]]), 16).shape == (1, 3, 16, 16)


def test_selfsup_shards_skips_bombs_and_names_every_unreadable_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELFSUP_MAX_PIXELS", "10000")
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(src / "ok.png")
    Image.new("L", (300, 300)).save(src / "bomb.png")  # 90,000 pixels > the budget of 10,000
    (src / "notes.jpg").write_bytes(b"minutes of the meeting, not an image")
    (src / "empty.png").write_bytes(b"")
    assert shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--split", "train"]) == 0
    err = capsys.readouterr().err
    assert "skipped 3 unreadable file(s)" in err
    for name in ("bomb.png (ImageTooLarge", "notes.jpg (not an image", "empty.png"):
        assert name in err
    assert json.loads((tmp_path / "out" / "train.json").read_text())["num_samples"] == 1


def test_selfsup_shards_does_not_follow_a_link_back_up(tmp_path, capsys):
    """dog/loop -> .. used to make 8 images 328 samples and label the cat images dog."""
    root = tmp_path / "src"
    for cls, n in (("cat", 3), ("dog", 5)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / cls / f"{i}.png")
    os.symlink("..", root / "dog" / "loop")
    os.symlink("../cat", root / "dog" / "cats")  # another class's folder: not dog's images
    assert shards_main([str(root), str(tmp_path / "out"), "--split", "train"]) == 0
    index = json.loads((tmp_path / "out" / "train.json").read_text())
    assert index["num_samples"] == 8 and index["class_names"] == ["cat", "dog"]
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    labels = {json.loads(v)["path"]: int(members[k[:-5] + ".cls"]) for k, v in members.items()
              if k.endswith(".json")}
    assert labels == {**{f"cat/{i}.png": 0 for i in range(3)}, **{f"dog/{i}.png": 1 for i in range(5)}}
    assert "not following 2 link(s)" in capsys.readouterr().err


def test_the_training_loader_cuts_a_thin_strip_without_resizing_it_whole(tmp_path, monkeypatch):
    """The trainer's views are cut from crop boxes over the original (at most the strip's own
    20,000 pixels are decoded): with a budget just above that the strip still decodes."""
    monkeypatch.setenv("SELFSUP_MAX_PIXELS", "25000")
    strip = png_bytes(Image.new("L", (1, 20000), 128))
    with tarfile.open(tmp_path / "s-000000.tar", "w") as tf:
        info = tarfile.TarInfo("k0.png")
        info.size = len(strip)
        tf.addfile(info, io.BytesIO(strip))
    loader = ShardLoader(str(tmp_path / "s-000000.tar"), batch_size=1, num_workers=0,
                         views=[ViewSpec(256, (0.08, 1.0))] * 2, samples_per_epoch=1)
    (batch,) = list(loader.epoch(0))
    assert batch["corrupt"] == 0 and batch["image"].shape == (1, 2, 3, 256, 256)
    assert int(batch["image"].float().mean().round()) == 128
