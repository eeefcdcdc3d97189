"""Memory that input could make unbounded (issue 30, A): every budget check fires on the header's
numbers, before anything of that size is allocated. No test here allocates more than a few MB."""

from __future__ import annotations

import io
import sys
import tarfile

import pytest
import torch
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import imagenet_like  # noqa: E402  (bench/: the realistic-JPEG generator)


def write_tar(path, members: dict) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def claiming(width: int, height: int) -> bytes:
    """A 40 x 40 baseline JPEG whose SOF0 header is patched to claim ``width`` x ``height``
    (1.9 KB of file, ends with its EOI marker: device-decodable by every cheap test)."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (120, 30, 200)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


# ------------------------------------------------------------------ 1. device pixel budget ----
def test_jpeg_bombs_never_reach_the_device_decoder(tmp_path, monkeypatch):
    """48 JPEGs claiming 9000 x 9000 among real ones, decode=device, batches of 16: before, each
    went to the device to be decoded whole (243 MB each, 8.8 GB seen); now the worker decodes
    them on the DCT-scaled CPU path (1125 x 1125 at most), and the real ones go to the device."""
    from selfsup.data import ShardLoader
    from selfsup.decode import DeviceDecoder
    from selfsup.views import ViewSpec

    members = {}
    for i in range(48):
        members[f"bomb{i:02d}.jpg"] = claiming(9000, 9000)
        members[f"bomb{i:02d}.cls"] = b"0"
    for i in range(48):
        members[f"real{i:02d}.jpg"] = imagenet_like.jpeg_bytes(64, 48, seed=i)
        members[f"real{i:02d}.cls"] = b"1"
    write_tar(tmp_path / "s-000000.tar", members)
    sent = []
    real_decode_all = DeviceDecoder._decode_all

    def spy(self, jpegs):
        for data in jpegs:
            img = Image.open(io.BytesIO(data.numpy().tobytes()))
            sent.append(img.size)  # the header: what nvJPEG would allocate
        return real_decode_all(self, jpegs)

    monkeypatch.setattr(DeviceDecoder, "_decode_all", spy)
    loader = ShardLoader(str(tmp_path / "s-000000.tar"), batch_size=16, num_workers=0,
                         views=[ViewSpec(16, (0.5, 1.0))] * 2, decode="device", shuffle_buffer=96,
                         samples_per_epoch=96)
    keys = []
    for batch in loader.epoch(0):
        on_cpu = [batch["key"][i] for i in batch.get("image_rows", torch.arange(16)).tolist()]
        on_device = [batch["key"][i] for i in batch.get("jpeg_rows", torch.empty(0)).tolist()]
        assert all(k.startswith("real") for k in on_device), on_device
        assert all(k.startswith("bomb") for k in on_cpu), on_cpu
        keys += batch["key"]
        assert loader.to_device(batch, torch.device("cpu"))["image"].shape == (16, 2, 3, 16, 16)
    assert sum(k.startswith("bomb") for k in keys) > 16  # the bombs were drawn...
    assert sent and set(sent) == {(64, 48)}  # ...and none reached the device decoder


def test_the_device_budget_bounds_a_batch_and_sends_scalable_large_jpegs_to_the_cpu(monkeypatch):
    from selfsup.decode import DEVICE_PIXELS_ENV, device_pixel_budget, to_device

    monkeypatch.setenv(DEVICE_PIXELS_ENV, "10000")
    assert device_pixel_budget(4) == 40000
    small = torch.tensor([[0.0, 0, 20, 20]])  # crops that need every pixel: no DCT scaling
    large = torch.tensor([[0.0, 0, 200, 200]])  # 200 px boxes for 16 px views: 1/8 on the CPU
    assert to_device(100, 100, large, 16, left=40000)  # within its share
    assert not to_device(300, 300, large, 16, left=10 ** 9)  # over its share, CPU scales it 1/8
    assert to_device(300, 300, small, 16, left=10 ** 9)  # over its share, but nothing to scale
    assert not to_device(100, 100, large, 16, left=9999)  # over what the batch has left
    # a batch's device JPEGs stay within the budget, whatever the headers claim
    left, sent = device_pixel_budget(4), 0
    for w in (150, 150, 150, 150, 150):
        if to_device(w, w, small, 16, left):
            left -= w * w
            sent += w * w
    assert sent == 22500  # one fits; a second would pass the budget
