"""Decoding views from real-looking JPEGs: DCT scaling, odd files, the device path, public layouts."""

import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from conftest import ROOT
from selfsup.data import DataError, ShardLoader
from selfsup.decode import DeviceDecoder, crop_resize, dct_reduction, decode_views
from selfsup.views import ViewSpec, sample_boxes, sample_rng

sys.path.insert(0, str(ROOT / "bench"))
import imagenet_like  # noqa: E402  (bench/: the realistic-JPEG generator)


def reference(data: bytes, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Full-resolution decode, then torchvision's resized_crop on the PIL image per box."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = [TF.pil_to_tensor(TF.resized_crop(img, t, l, h, w, [size, size]))
           for t, l, h, w in boxes.int().tolist()]
    return torch.stack(out)


def test_dct_scaled_decoding_is_close_to_full_decoding():
    data = imagenet_like.jpeg_bytes(1600, 1200, seed=3)
    views = [ViewSpec(64, (0.08, 1.0))] * 2
    reductions = set()
    for i in range(8):
        boxes = sample_boxes(views, 1200, 1600, sample_rng(i))
        r = dct_reduction(boxes, 64)
        reductions.add(r)
        assert (boxes[:, 2:] / r >= 64).all()  # never fewer pixels than the crop needs
        fast, ref = decode_views(data, boxes, 64).float(), reference(data, boxes, 64).float()
        assert fast.shape == (2, 3, 64, 64)
        diff = (fast - ref).abs()
        assert diff.mean() < 1.5 and diff.max() <= 40, (r, diff.mean(), diff.max())
    assert reductions & {2, 4, 8}  # the DCT scaling was used
    # a view that needs the full resolution is decoded at full resolution
    assert dct_reduction(torch.tensor([[0.0, 0, 100, 1600], [0, 0, 1200, 1600]]), 64) == 1


def test_views_match_torchvision_random_resized_crop_on_the_original():
    data = imagenet_like.jpeg_bytes(120, 90, seed=1)
    boxes = torch.tensor([[0.0, 0, 90, 120], [10, 30, 40, 50], [50, 70, 40, 50]])
    ours, ref = decode_views(data, boxes, 32).float(), reference(data, boxes, 32).float()
    # PIL's box resize reads the pixels around the box, crop+resize clamps at its edge: only
    # the outermost rows and columns may differ by more than rounding
    inner = (ours - ref)[..., 2:-2, 2:-2].abs()
    assert inner.max() <= 2 and (ours - ref).abs().mean() < 1.5


def test_device_crop_resize_is_close_to_the_cpu_views():
    data = imagenet_like.jpeg_bytes(640, 480, seed=2)
    image = TF.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    for i in range(4):
        boxes = sample_boxes([ViewSpec(48, (0.08, 1.0))] * 2, 480, 640, sample_rng(i))
        dev, cpu = crop_resize(image, boxes, 48).float(), decode_views(data, boxes, 48).float()
        assert (dev - cpu).abs().mean() < 2.5, i


def write_tar(path, members: dict) -> None:
    """A shard as plain ``tar`` writes it from a folder of KEY.ext files."""
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def odd_shard(tmp_path):
    """Every special file of the realistic generator, labelled in the public layouts; returns
    (tar path, {key: label} of the decodable ones, number of undecodable ones)."""
    files = imagenet_like.write_specials(tmp_path / "files")
    members, labels = {}, {}
    bad_first = sorted(files.items(), key=lambda kv: (kv[0] not in ("truncated", "zero"), kv[0]))
    for i, (kind, path) in enumerate(bad_first):
        key = f"{kind}_{i:03d}"
        if kind == "rgb":
            key += ".v2"  # a dot in the base name: webdataset's key is "rgb_NNN", member "v2.jpg"
        members[f"{key}.jpg"] = path.read_bytes()
        if i % 3 == 0:
            members[f"{key}.cls"] = str(i).encode()
        elif i % 3 == 1:
            members[f"{key}.json"] = json.dumps({"label": i, "path": str(path)}).encode()
        else:
            members[f"{key}.txt"] = f"{i}\n".encode()
        if kind not in ("truncated", "zero"):
            labels[key.split(".")[0]] = i
    write_tar(tmp_path / "odd-000000.tar", members)
    return tmp_path / "odd-000000.tar", labels, len(files) - len(labels)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_odd_files_are_decoded_or_skipped_and_counted(odd_shard, decode):
    tar, labels, bad = odd_shard
    loader = ShardLoader(str(tar), batch_size=len(labels), views=[ViewSpec(24, (0.5, 1.0))] * 2,
                         num_workers=0, decode=decode, shuffle_buffer=1, samples_per_epoch=len(labels))
    (batch,) = list(loader.epoch(0))
    if decode == "device":
        assert len(batch["jpeg_sizes"]) >= 3  # rgb, portrait, progressive at least went to the device
    batch = loader.to_device(batch, torch.device("cpu"))
    assert batch["image"].shape == (len(labels), 2, 3, 24, 24)
    assert dict(zip(batch["key"], batch["label"].tolist())) == labels
    assert batch["corrupt"] == bad == 2  # the truncated and the empty file
    views = dict(zip(batch["key"], batch["image"]))
    gray = next(v for k, v in views.items() if k.startswith("gray"))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    for key, v in views.items():
        assert v.float().std() > 5, key  # real picture content, not a blank


def test_cpu_and_device_paths_cut_the_same_crops(tmp_path):
    members = {}
    for i in range(6):
        members[f"img{i}.jpg"] = imagenet_like.jpeg_bytes(90 + 20 * i, 140 - 10 * i, seed=i)
        members[f"img{i}.cls"] = b"1"
    write_tar(tmp_path / "s-000000.tar", members)
    out = {}
    for decode in ("cpu", "device"):
        loader = ShardLoader(str(tmp_path / "s-000000.tar"), batch_size=6, num_workers=0, seed=5,
                             views=[ViewSpec(32, (0.2, 1.0))] * 2, decode=decode, samples_per_epoch=6)
        out[decode] = loader.to_device(next(iter(loader.epoch(0))), torch.device("cpu"))
    assert out["cpu"]["key"] == out["device"]["key"]
    diff = (out["cpu"]["image"].float() - out["device"]["image"].float()).abs()
    assert diff.mean() < 3  # same boxes, two resamplers; a different box would differ by ~40


def test_device_decoder_replaces_and_counts_what_nobody_decodes():
    good = imagenet_like.jpeg_bytes(64, 48, seed=0)
    boxes = torch.tensor([[[0.0, 0, 48, 64]]] * 3)
    batch = {"label": torch.tensor([0, 1, 2]), "corrupt": 1,
             "image": torch.empty(0, 1, 3, 16, 16, dtype=torch.uint8),
             "image_rows": torch.empty(0, dtype=torch.long),
             "jpeg": torch.frombuffer(bytearray(good + b"\xff\xd8 not a jpeg \xff\xd9" + good),
                                      dtype=torch.uint8),
             "jpeg_sizes": torch.tensor([len(good), 16, len(good)]),
             "jpeg_rows": torch.tensor([0, 1, 2]), "jpeg_boxes": boxes}
    out = DeviceDecoder("cpu", 16).decode(batch)
    assert out["corrupt"] == 2 and out["image"].shape == (3, 1, 3, 16, 16)
    assert torch.equal(out["image"][1], out["image"][0])  # the bad one took a good sample's views
    with pytest.raises(ValueError, match="none of the 3 images"):
        DeviceDecoder("cpu", 16).decode({**batch, "jpeg": torch.zeros(48, dtype=torch.uint8),
                                         "jpeg_sizes": torch.tensor([16, 16, 16])})


@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_set_where_nothing_decodes_is_an_error_not_a_hang(tmp_path, workers):
    write_tar(tmp_path / "bad-000000.tar", {f"k{i}.jpg": b"\xff\xd8garbage" for i in range(5)})
    loader = ShardLoader(str(tmp_path / "bad-000000.tar"), batch_size=2, num_workers=workers,
                         views=[ViewSpec(16)] * 2, samples_per_epoch=10)
    with pytest.raises(DataError, match="could be decoded") as e:
        list(loader.epoch(0))
    assert str(e.value).startswith("none of the 5 images in 1 shard(s)") and "\n" not in str(e.value)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_resnet_trains_exports_and_evaluates_on_realistic_jpeg_shards(tmp_path, decode):
    """The README's path on ImageNet-shaped JPEGs (tiny): folder → selfsup-shards (original
    bytes) → selfsup-train with the ImageNet data recipe → selfsup-eval k-NN on the export."""
    from selfsup.shard_writer import main as shards_main
    from selfsup_eval.cli import main as eval_main
    from tinyrun import train

    imagenet_like.write_folder(tmp_path / "train", 40, classes=4, min_side=40, max_side=160)
    imagenet_like.write_folder(tmp_path / "val", 16, classes=4, min_side=40, max_side=160, seed=1)
    for split in ("train", "val"):
        assert shards_main([str(tmp_path / split), str(tmp_path / "shards"), "--split", split]) == 0
    index = json.loads((tmp_path / "shards" / "train.json").read_text())
    assert index["image_format"] == "keep" and index["num_samples"] == 40
    run = tmp_path / "run"
    assert train("dcl.yaml", tmp_path / "shards" / "train.json", run, "augment.size=32",
                 "train.batch_size=8", "train.max_steps=3", f"data.decode={decode}",
                 "data.val=null") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    rc = eval_main(["knn", str(run / "export" / "backbone.safetensors"), "--train",
                    str(tmp_path / "shards" / "train.json"), "--val", str(tmp_path / "shards" / "val.json"),
                    "--k", "5", "--no-cache", "--out", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "results.json").read_text())[0]
    assert rc == 0 and result["train_samples"] == 40 and result["val_samples"] == 16


def test_evaluation_decodes_big_jpegs_dct_scaled_close_to_the_full_decode():
    from selfsup_eval.data import decode, resize_center_crop

    data = imagenet_like.jpeg_bytes(1800, 1200, seed=4)
    full = resize_center_crop(Image.open(io.BytesIO(data)).convert("RGB"), 224)
    ref = torch.from_numpy(np.asarray(full).copy()).permute(2, 0, 1).float()
    out = decode(data, 224, 3)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    diff = (out.float() - ref).abs()
    assert 0 < diff.mean() < 1.5  # decoded at 1/4 scale (1200 // 4 = 300 >= 224), not whole
    assert decode(data, 224, 1).shape == (1, 224, 224)
    small = imagenet_like.jpeg_bytes(224, 224, seed=5)  # already at the size: untouched
    assert torch.equal(decode(small, 224, 3),
                       torch.from_numpy(np.asarray(Image.open(io.BytesIO(small)).convert("RGB")).copy()).permute(2, 0, 1))
