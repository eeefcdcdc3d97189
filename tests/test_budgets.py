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
def _big_jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 30)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def test_large_jpegs_never_reach_the_device_decoder(tmp_path, monkeypatch):
    """16 valid 3000 x 3000 JPEGs (9 M pixels, 27 MB decoded whole; 48 headers claiming 9000 x
    9000 once took 8.8 GB) among small ones, decode=device, 16-px views: before, every one went
    to the device to be decoded whole; now the worker decodes them DCT-scaled (375 x 375), and
    only the small ones go to the device."""
    from selfsup.data import ShardLoader
    from selfsup.decode import DeviceDecoder
    from selfsup.views import ViewSpec

    members, big = {}, _big_jpeg(3000)
    for i in range(16):
        members[f"big{i:02d}.jpg"], members[f"big{i:02d}.cls"] = big, b"0"
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
                         views=[ViewSpec(16, (0.5, 1.0))] * 2, decode="device", shuffle_buffer=64,
                         samples_per_epoch=64)
    keys = []
    for batch in loader.epoch(0):
        on_cpu = [batch["key"][i] for i in batch.get("image_rows", torch.arange(16)).tolist()]
        on_device = [batch["key"][i] for i in batch.get("jpeg_rows", torch.empty(0)).tolist()]
        assert all(k.startswith("real") for k in on_device), on_device
        assert all(k.startswith("big") for k in on_cpu), on_cpu
        keys += batch["key"]
        out = loader.to_device(batch, torch.device("cpu"))
        assert out["image"].shape == (16, 2, 3, 16, 16) and out["corrupt"] == 0
    assert sum(k.startswith("big") for k in keys) == 16  # every large one decoded, on the CPU
    assert sent and set(sent) == {(64, 48)}  # and none reached the device decoder


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


# ------------------------------------------------------- 2. an export's model and its batches ----
def _crafted_export(path, tensors: dict, **meta) -> None:
    import json

    from safetensors.torch import save_file

    info = {"format": 1, "model_name": "vit_tiny_patch16_224", "model_kwargs": {"num_classes": 0},
            "input_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "pool": "head", **meta}
    save_file(tensors, str(path), metadata={"selfsup": json.dumps(info)})


def _devices_built_on(monkeypatch) -> list:
    """The default device at each timm.create_model call: 'meta' builds allocate nothing."""
    import timm

    seen, real = [], timm.create_model

    def spy(*a, **k):
        seen.append(torch.get_default_device().type)
        return real(*a, **k)

    monkeypatch.setattr(timm, "create_model", spy)
    return seen


def test_a_crafted_export_is_refused_before_its_model_is_built(tmp_path, monkeypatch):
    """404 bytes asking for a ViT with embed_dim 8192 and depth 24 (~77 GB as fp32): refused
    from the header's tensor list; the only model built is the shape-only one on 'meta'."""
    from selfsup_eval.checkpoint import EvalError, load_backbone

    path = tmp_path / "crafted.safetensors"
    _crafted_export(path, {"cls_token": torch.zeros(1, 1, 8)},
                    model_kwargs={"num_classes": 0, "embed_dim": 8192, "depth": 24, "num_heads": 8})
    assert path.stat().st_size < 1000
    seen = _devices_built_on(monkeypatch)
    with pytest.raises(EvalError, match=r"weights do not fit vit_tiny_patch16_224 .*missing.*nothing was built"):
        load_backbone(str(path))
    assert seen == ["meta"]


def test_an_export_whose_shapes_differ_is_refused_and_a_matching_one_loads(tmp_path, monkeypatch):
    import timm

    from selfsup_eval.checkpoint import EvalError, load_backbone

    kwargs = {"num_classes": 0, "img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}
    good = {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict().items()}
    _crafted_export(tmp_path / "ok.safetensors", good, model_kwargs=kwargs)
    seen = _devices_built_on(monkeypatch)
    bb = load_backbone(str(tmp_path / "ok.safetensors"))
    assert seen == ["meta", "cpu"] and bb.meta["feature_dim"] == 24
    wide = {**kwargs, "embed_dim": 4096}  # same names, every shape larger
    _crafted_export(tmp_path / "wide.safetensors", good, model_kwargs=wide)
    with pytest.raises(EvalError, match=r"of another shape, e.g. blocks.0.attn.proj.bias \[24\] \(the model's is \[4096\]\)"):
        load_backbone(str(tmp_path / "wide.safetensors"))


def test_an_export_naming_a_hub_model_is_refused_without_the_network(tmp_path, monkeypatch, capsys):
    import socket

    from selfsup_eval.cli import main
    from test_eval_fixtures import write_split

    calls = []
    monkeypatch.setattr(socket.socket, "connect", lambda *a: calls.append(a) or 1 / 0)
    path = tmp_path / "hub.safetensors"
    _crafted_export(path, {"w": torch.zeros(2)}, model_name="hf-hub:timm/resnet18.a1_in1k")
    train = write_split(tmp_path / "d", "train", 8)
    rc = main(["knn", str(path), "--train", str(train), "--val", str(train), "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "model_name 'hf-hub:timm/resnet18.a1_in1k' is not a model of timm" in err
    assert "nothing is downloaded at run time" in err and calls == []


def _backbone(size: int, name: str = "resnet10t"):
    """A Backbone as load_backbone makes it, weights left out (only its metadata is sized)."""
    from selfsup_eval.checkpoint import Backbone

    meta = {"model_name": name, "model_kwargs": {"num_classes": 0}, "input_size": size,
            "mean": [0.5], "std": [0.25], "pool": "head"}
    return Backbone(f"{name}@{size}", "x", meta, torch.nn.Identity(), "d")


def test_the_largest_activation_is_measured_on_meta_as_a_real_forward_measures_it():
    import timm

    from selfsup_eval.budgets import _max_output, meta_model

    model = timm.create_model("resnet10t", num_classes=0).eval()
    outputs = []
    for m in model.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda _m, _i, o: outputs.append(o.numel()))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    meta = _max_output(meta_model(_backbone(64).meta), torch.empty(1, 3, 64, 64, device="meta"), "head")
    assert meta == max(outputs) == 64 * 32 * 32  # the stem's 64 channels at half the side


def test_extraction_batches_are_cut_to_the_memory_budget(monkeypatch, capsys):
    """input_size 2048 (the allowed maximum): 256 samples would take ~60 GB; the batch is cut to
    what fits 4 GB, from the estimate alone (the model never runs at 2048 px here)."""
    from selfsup_eval.budgets import BATCH_GB_ENV, extraction_batch, sample_bytes

    big = _backbone(2048)
    per = sample_bytes(big)
    # 3 x 2048^2 input (2 uint8 + 3 float copies) + 3 fp32 copies of the 64 x 1024^2 stem output
    assert per == 3 * 2048 ** 2 * 14 + 12 * 64 * 1024 ** 2
    n = extraction_batch(big, 256)
    assert n == int(4e9 // per) == 4 and "extraction batch 4 instead of 256" in capsys.readouterr().err
    assert extraction_batch(_backbone(16), 256) == 256  # small inputs: as asked
    monkeypatch.setenv(BATCH_GB_ENV, "0.000001")
    assert extraction_batch(_backbone(16), 256) == 1


def test_extract_runs_the_model_on_budgeted_batches(tmp_path, monkeypatch):
    from selfsup_eval.budgets import BATCH_GB_ENV, sample_bytes
    from selfsup_eval.checkpoint import Backbone, load_backbone
    from selfsup_eval.features import extract
    from test_eval_fixtures import export, write_split

    train = write_split(tmp_path / "d", "train", 12)
    bb = load_backbone(str(export(tmp_path / "e.safetensors")))
    sizes, real = [], Backbone.features
    monkeypatch.setattr(Backbone, "features", lambda self, x: sizes.append(len(x)) or real(self, x))
    monkeypatch.setenv(BATCH_GB_ENV, str(3.5 * sample_bytes(bb) / 1e9))  # room for 3 samples
    out = extract(bb, [str(p) for p in sorted(train.parent.glob("train-*.tar"))], batch_size=256, workers=1)
    assert len(out["label"]) == 12 and sizes == [3, 3, 3, 3]


# ---------------------------------------------------------------- 3. the raw-pixel size ----
def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (side, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("first, rest, side", [
    ((4000, 3000), [16] * 9, 16),  # one large first image: it upscaled everything to 3000 px
    ((9400, 9400), [], 64),  # every image large: capped (9400 px made every image too large)
])
def test_the_raw_pixel_size_is_a_capped_median_not_the_first_image(tmp_path, first, rest, side):
    from types import SimpleNamespace

    from selfsup_eval.checkpoint import raw_backbone
    from selfsup_eval.cli import prepare_raw

    members = {"a0.jpg": claiming(*first), "a0.cls": b"0"}
    for i, s in enumerate(rest):
        members[f"b{i}.png"], members[f"b{i}.cls"] = _png(s), b"1"
    for i in range(2 if not rest else 0):
        members[f"c{i}.jpg"], members[f"c{i}.cls"] = claiming(*first), b"1"
    write_tar(tmp_path / "t-000000.tar", members)
    bb = raw_backbone(None)
    prepare_raw(bb, SimpleNamespace(urls=[str(tmp_path / "t-000000.tar")], spec="t"))
    assert bb.input_size == side and bb.in_chans == 3


def test_an_explicit_raw_size_is_bounded(capsys):
    from selfsup_eval.cli import main

    assert main(["knn", "raw-pixels", "--train", "x", "--val", "y", "--raw-size", "9400"]) == 2
    assert "--raw-size must be at most 2048" in capsys.readouterr().err


# ---------------------------------------------------------------------- 4. class labels ----
def _relabel(index, key_label: dict):
    """Rewrite the shards of ``index`` with some samples' .cls replaced (index kept)."""
    for tar in sorted(index.parent.glob(f"{index.stem}-*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for key, label in key_label.items():
            if f"{key}.cls" in members:
                members[f"{key}.cls"] = str(label).encode()
        write_tar(tar, members)


def test_a_label_beyond_the_index_classes_is_a_bad_label(tmp_path, capsys):
    """A 3-class index, one train label 5 and one 30,000,000: classes were max label + 1
    (9.6 GB at 30 M); now both samples are skipped and counted, and the probes see 3 classes."""
    from selfsup_eval.cli import main
    from test_eval_fixtures import write_split

    train = write_split(tmp_path / "d", "train", 24)
    val = write_split(tmp_path / "d", "val", 9, seed=1)
    _relabel(train, {"train-00000003": 5, "train-00000007": 30_000_000})
    args = ["knn", "raw-pixels", "--train", str(train), "--val", str(val), "--k", "1", "--no-cache"]
    assert main(args) == 2  # 2 of 24 is more than the default corrupt fraction: said so
    err = capsys.readouterr().err
    assert "2 sample(s) have a label beyond the 3 classes (e.g. train-00000003, label 5)" in err
    assert "2 of the 24 samples of the train split could not be used" in err.strip().splitlines()[-1]
    assert main(args + ["--max-corrupt-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 corrupt sample(s), e.g. train-00000003, train-00000007" in out, out


def test_labels_are_capped_without_class_names_and_cached_features_are_checked_too(tmp_path):
    from selfsup_eval.budgets import MAX_CLASSES
    from selfsup_eval.checkpoint import raw_backbone, resolve_raw
    from selfsup_eval.features import cached_features

    members = {}
    for i, label in enumerate([0, 1, MAX_CLASSES - 1, MAX_CLASSES, 30_000_000]):
        members[f"k{i}.png"], members[f"k{i}.cls"] = _png(8), str(label).encode()
    write_tar(tmp_path / "u-000000.tar", members)
    bb = raw_backbone(8)
    resolve_raw(bb, (8, 8), 3)
    for _ in range(2):  # extracted, then served from the cache: checked both times
        f = cached_features(bb, [str(tmp_path / "u-000000.tar")], str(tmp_path / "cache"), workers=1)
        assert f["label"].tolist() == [0, 1, MAX_CLASSES - 1] and f["key"] == ["k0", "k1", "k2"]
        assert f["features"].shape == (3, 3 * 8 * 8) and f["corrupt"] == 2
        assert f["corrupt_keys"] == ["k3", "k4"]
