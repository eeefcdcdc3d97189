"""The suite's finetune protocol at tiny settings on a CPU: schedule, augmentation, grid choice on
800 → 200 (here 30 → 10), the checkpoint left untouched, reruns reproducible."""

import math

import pytest
import torch

from selfsup_eval.checkpoint import load_backbone
from selfsup_eval.finetune import augment, cosine_lr, train
from test_eval_suite import run_suite, suite  # noqa: F401  (the module-scoped suite fixture)


def test_cosine_schedule_and_augmentation_written_out():
    assert [cosine_lr(0.1, s, 4) for s in range(4)] == pytest.approx(
        [0.1 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    assert torch.equal(augment(x, "none", torch.Generator()), x)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    for kind in ("crop", "crop+flip"):
        flips = 0
        for seed in range(20):
            out = augment(x, kind, torch.Generator().manual_seed(seed))
            for i in range(2):  # every output is a window of the padded image, or its mirror
                windows = [padded[i, :, a:a + 8, b:b + 8] for a in range(3) for b in range(3)]
                plain = any(torch.equal(out[i], w) for w in windows)
                mirrored = any(torch.equal(out[i], w.flip(2)) for w in windows)
                assert plain or mirrored
                flips += mirrored and not plain
        assert (flips > 0) == (kind == "crop+flip")


def test_finetune_learns_and_leaves_the_checkpoint_alone(tmp_path, suite):  # noqa: F811
    _, _, ckpt = suite
    bb = load_backbone(str(ckpt))
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 2
    x = torch.randn(48, 3, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float() * 2 - 1
    net = train(bb, x, y, 2, lr=0.05, steps=20, batch=16, kind="crop+flip", seed=1, device="cpu")
    assert (net(x).argmax(1) == y).float().mean() > 0.9
    assert any(not torch.equal(p, before[k]) for k, p in net.model.state_dict().items() if p.is_floating_point())
    assert all(torch.equal(v, before[k]) for k, v in bb.model.state_dict().items())
    again = train(bb, x, y, 2, lr=0.05, steps=20, batch=16, kind="crop+flip", seed=1, device="cpu")
    torch.testing.assert_close(again.head.weight, net.head.weight, rtol=0, atol=0)


def test_finetune_in_the_suite_chooses_on_the_held_out_part(tmp_path, suite):  # noqa: F811
    _, path, ckpt = suite
    extra = ["--protocols", "finetune", "linear", "--finetune-steps", "2", "6", "--finetune-lr", "0.01", "0.1",
             "--finetune-batch", "16"]
    out, records = run_suite(tmp_path, path, "raw-pixels", ckpt, extra=extra)
    for r in records:
        ft = r["suite"]["tasks"]["squares"]["finetune"]
        grid = {(g["lr"], g["steps"]): g["holdout_top1"] for g in ft["grid"]}
        assert list(grid) == [(0.01, 2), (0.01, 6), (0.1, 2), (0.1, 6)]
        assert grid[(ft["lr"], ft["steps"])] == max(grid.values()) == ft["holdout_top1"]
        assert ft["batch"] == 16 and 0 <= ft["top1"] <= 1
    assert records[1]["verdict"]["protocol"] == "finetune" and set(records[1]["verdicts"]) == {"finetune", "linear"}
    _, again = run_suite(tmp_path / "again", path, "raw-pixels", ckpt, extra=extra)
    assert again[1]["suite"]["tasks"] == records[1]["suite"]["tasks"]


def test_the_grid_is_scored_on_the_keys_files_held_out_part(tmp_path, suite):  # noqa: F811
    """Each grid point's held-out top-1 = a run trained on the keys file's first lines (train
    part) with the documented seed, scored on its last lines (val_share 0.25 of 40: 10)."""
    from selfsup_eval.finetune import load_images, predict, seed_of

    root, path, ckpt = suite
    extra = ["--protocols", "finetune", "--finetune-steps", "20", "--finetune-lr", "0.05", "--finetune-batch", "8"]
    out, records = run_suite(tmp_path, path, ckpt, extra=extra)
    ft = records[0]["suite"]["tasks"]["squares"]["finetune"]
    keys = (out / "keys" / "squares-subset0.txt").read_text().split()
    bb = load_backbone(str(ckpt))
    bb.to("cpu")
    shard_keys, x, y = load_images(bb, [str(p) for p in sorted((out / "subsets" / "squares-subset0").glob("*.tar"))])
    assert shard_keys == keys  # the copy holds the draw in the keys file's order
    net = train(bb, x[:30], y[:30], 3, lr=0.05, steps=20, batch=8, kind="crop+flip",
                seed=seed_of("squares", 0, 0.05, 20), device="cpu")
    want = float((predict(net, x[30:], "cpu") == y[30:]).float().mean())
    assert ft["grid"] == [{"lr": 0.05, "steps": 20, "holdout_top1": want}]
    # the refit: all 40 with its own seed, scored on the whole test split
    _, tx, ty = load_images(bb, [str(p) for p in sorted((root / "squares").glob("test-*.tar"))])
    refit = train(bb, x, y, 3, lr=0.05, steps=20, batch=8, kind="crop+flip",
                  seed=seed_of("squares", 0, 0.05, 20, "all"), device="cpu")
    assert ft["top1"] == float((predict(refit, tx, "cpu") == ty).float().mean())
