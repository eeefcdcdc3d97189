"""Exports → eval-mode models, decoding, extraction (1 vs 2 processes), damaged samples, cache."""

import subprocess

import numpy as np
import pytest
import torch

from selfsup_eval import features as feat_mod
from selfsup_eval.checkpoint import EvalError, load_backbone
from selfsup_eval.cli import main
from selfsup_eval.data import decode, iter_samples
from selfsup_eval.features import extract
from test_eval_fixtures import (ROOT, child_env, export, export_step, images, png, torchrun, write_split,
                                write_tar)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: 60 samples in 5 shards (4 dealt whole to 2 processes + 1 split by sample);
    val: 21 samples in 1 shard (split by sample)."""
    root = tmp_path_factory.mktemp("shards")
    return (write_split(root, "train", 60, shard_size=13),
            write_split(root, "val", 21, shard_size=32, seed=1))


def test_features_do_not_depend_on_the_batch_in_eval_mode(tmp_path, shards):
    bb = load_backbone(str(export(tmp_path / "bn.safetensors")))
    one = extract(bb, [str(shards[0].parent / "train-000000.tar")], batch_size=1, workers=0)
    five = extract(bb, [str(shards[0].parent / "train-000000.tar")], batch_size=5, workers=3)
    assert one["key"] == five["key"] and len(one["key"]) == 13
    torch.testing.assert_close(one["features"], five["features"], rtol=1e-5, atol=1e-5)
    x = torch.randn(6, 3, 16, 16)
    alone = torch.cat([bb.features(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, bb.features(x), rtol=1e-5, atol=1e-5)
    bb.model.train()  # the same comparison in train mode differs: the test can see the difference
    assert not torch.allclose(bb.features(x)[:2], bb.features(x[:2]), atol=1e-3)


def test_small_stem_and_mean_patch_exports_load_with_their_dims(tmp_path):
    small = load_backbone(str(export(tmp_path / "a.safetensors", "resnet18", small_stem=True)))
    assert small.model.conv1.stride == (1, 1) and small.model.conv1.kernel_size == (3, 3)
    assert isinstance(small.model.maxpool, torch.nn.Identity)
    assert small.features(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    vit_kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 1, "num_heads": 2}
    vit = load_backbone(str(export(tmp_path / "b.safetensors", "vit_tiny_patch16_224", kwargs=vit_kwargs,
                                   pool="mean_patch")))
    x = torch.randn(2, 3, 16, 16)
    tokens = vit.model.forward_features(x)  # (2, 1 + 16, 48): a class token, then 16 patches
    assert tokens.shape == (2, 17, 48) and vit.model.num_prefix_tokens == 1
    torch.testing.assert_close(vit.features(x), tokens[:, 1:].mean(1))
    assert not torch.allclose(vit.features(x), tokens.mean(1))  # the class token is left out
    gray = load_backbone(str(export(tmp_path / "c.safetensors", "resnet10t", in_chans=1)))
    assert gray.in_chans == 1 and gray.features(torch.randn(2, 1, 16, 16)).shape == (2, 512)


def test_decoding_is_a_no_op_at_input_size_and_torchvision_otherwise():
    from PIL import Image
    from torchvision import transforms

    rgb = images(1, size=16)[0][0]
    assert torch.equal(decode(png(rgb), 16, 3), torch.from_numpy(rgb).permute(2, 0, 1))
    gray = images(1, size=16, gray=True)[0][0]
    three = decode(png(gray), 16, 3)
    assert three.shape == (3, 16, 16) and torch.equal(three[0], three[2])
    assert torch.equal(three[1], torch.from_numpy(gray))  # replicated, not re-weighted
    assert torch.equal(decode(png(gray), 16, 1)[0], torch.from_numpy(gray))
    wide = np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8)
    ref = transforms.Compose([transforms.Resize(20), transforms.CenterCrop(20)])(Image.fromarray(wide))
    assert torch.equal(decode(png(wide), 20, 3), torch.from_numpy(np.array(ref)).permute(2, 0, 1))


def test_damaged_samples_are_skipped_and_counted_unlabelled_ones_are_errors(tmp_path):
    imgs, ys = images(5, size=16)
    good = [{"__key__": f"s-{i:04d}", "png": png(imgs[i]), "cls": str(ys[i]).encode()} for i in range(5)]
    bad = [{"__key__": "s-0005", "png": b"\x89PNG not really", "cls": b"1"},
           {"__key__": "s-0006", "cls": b"2"},
           {"__key__": "s-0007", "png": png(imgs[0]), "cls": b"seven"}]
    tar = write_tar(tmp_path / "d-000000.tar", good[:2] + bad + good[2:])
    bb = load_backbone(str(export(tmp_path / "m.safetensors")))
    out = extract(bb, [str(tar)], batch_size=2)
    assert out["key"] == [f"s-{i:04d}" for i in range(5)] and out["corrupt"] == 3
    assert out["corrupt_keys"] == ["s-0005", "s-0006", "s-0007"] and out["features"].shape == (5, 512)
    nolabel = write_tar(tmp_path / "n-000000.tar", good[:1] + [{"__key__": "s-0009", "png": png(imgs[1])}])
    with pytest.raises(EvalError, match=r"1 sample\(s\) .* no 'cls' label \(e.g. s-0009\)"):
        extract(bb, [str(nolabel)])
    cut = tmp_path / "t-000000.tar"
    cut.write_bytes(tar.read_bytes()[:2000])  # a shard cut short mid-member: fatal, not skipped
    with pytest.raises(EvalError, match="cannot read 1 shard"):
        extract(bb, [str(cut)])


def test_every_sample_goes_to_exactly_one_process(shards):
    urls = [str(shards[0].parent / f"train-{i:06d}.tar") for i in range(5)]
    for world in (2, 3, 7):
        seen = [s.key for rank in range(world) for s in iter_samples(urls, rank, world)]
        assert sorted(seen) == [f"train-{i:08d}" for i in range(60)]


def test_two_processes_extract_exactly_the_features_of_one(tmp_path, shards):
    ckpt = str(export(tmp_path / "m.safetensors"))
    args = ["knn", "raw-pixels", ckpt, "--train", str(shards[0]), "--val", str(shards[1]), "--k", "3",
            "--batch-size", "4"]
    assert main(args + ["--cache-dir", str(tmp_path / "one")]) == 0
    r = subprocess.run(torchrun(2, "-m", "selfsup_eval", *args, "--cache-dir", str(tmp_path / "two")),
                       env=child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("protocol:") == 1  # only rank 0 prints
    files = sorted(p.name for p in (tmp_path / "one").glob("*.pt"))
    assert len(files) == 4 and files == sorted(p.name for p in (tmp_path / "two").glob("*.pt"))
    for name in files:
        a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ("one", "two"))
        n = len(a["key"])
        assert n in (60, 21) and a["key"] == b["key"] == sorted(a["key"])  # shard order, no duplicate
        assert torch.equal(a["label"], b["label"])
        torch.testing.assert_close(a["features"], b["features"], rtol=1e-5, atol=1e-5)


def test_the_cache_serves_reruns_and_follows_the_checkpoint_and_settings(tmp_path, shards, monkeypatch):
    ckpt = export(tmp_path / "m.safetensors")
    cache = tmp_path / "cache"
    args = ["knn", str(ckpt), "--train", str(shards[0]), "--val", str(shards[1]), "--k", "3",
            "--cache-dir", str(cache)]
    assert main(args) == 0
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(first) == 2 and all(n.endswith(".pt") for n in first)  # no temporary files left

    def boom(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(feat_mod, "extract", boom)
    assert main(args) == 0  # served from the cache
    assert main(["linear"] + args[1:]) == 0  # another probe, same features
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == first
    export(ckpt, seed=1)  # same path, new weights → new content hash → must extract
    with pytest.raises(AssertionError, match="extracted again"):
        main(args)
    with pytest.raises(AssertionError, match="extracted again"):  # another raw size, another key
        main(["knn", "raw-pixels", "--raw-size", "8"] + args[2:])
    monkeypatch.undo()
    monkeypatch.setenv("SELFSUP_EVAL_CACHE", str(tmp_path / "env"))
    assert main(args[:-2]) == 0 and len(list((tmp_path / "env").glob("*.pt"))) == 2


def test_raw_pixels_through_the_cli(tmp_path):
    train = write_split(tmp_path / "g", "train", 12, size=12, gray=True)
    val = write_split(tmp_path / "g", "val", 6, size=12, gray=True, seed=3)
    cache = tmp_path / "cache"
    for extra in ([], ["--raw-size", "6"]):
        assert main(["knn", "raw-pixels", "--train", str(train), "--val", str(val), "--k", "1",
                     "--cache-dir", str(cache), *extra]) == 0
    found = {tuple(d["features"].shape): d for d in (torch.load(p, weights_only=True) for p in cache.glob("*.pt"))}
    assert sorted(found) == [(6, 36), (6, 144), (12, 36), (12, 144)]  # 1 channel, native or 6x6
    pixels = torch.from_numpy(images(12, size=12, gray=True)[0]).float().div(255).flatten(1)
    torch.testing.assert_close(found[12, 144]["features"], pixels, rtol=0, atol=0)  # the pixels in [0, 1]
