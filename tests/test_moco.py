"""MoCo-v2: loss over the queue, key encoder (no gradient, trainer EMA), FIFO queue gathered from
every process, shuffle-BN and split-BN, queue restored on resume, the recipe end to end."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

from conftest import ROOT
from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.schedules import EMA
from tinyrun import (MOCO, one_and_two_processes, queue_check_one_and_two_processes,
                     run_recipe_and_evaluate, train)

TINY = str(ROOT / "recipes" / "tiny.yaml")


def build(*overrides, seed=0):
    cfg = load_recipe(TINY, ["objective.name=moco", "objective.queue_size=32", *overrides])
    torch.manual_seed(seed)
    return build_objective(cfg, create_backbone(cfg.model.name)).double()


def views(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]


@pytest.mark.parametrize("loss", ["infonce", "dcl"])
def test_loss_is_moco_cross_entropy_over_key_and_queue(loss):
    obj = build(f"objective.loss={loss}", "objective.temperature=0.2")
    v0, v1 = views()
    queue = obj.queue.clone()
    q = F.normalize(obj.head(obj.backbone(v0)), dim=1)  # BN in train mode: batch statistics,
    k = F.normalize(obj.head_key(obj.backbone_key(v1)), dim=1)  # the same as inside forward
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
    if loss == "infonce":  # MoCo's cross-entropy with the key at index 0
        expected = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    else:  # DCL: the positive leaves the denominator
        expected = (-logits[:, 0] + torch.logsumexp(logits[:, 1:], dim=1)).mean()
    got, metrics = obj({"views": [v0, v1]}, None)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert abs(metrics["pos_sim"].item() - (q * k).sum(1).mean().item()) < 1e-12
    # the queue enters the loss: another queue gives another value
    obj2 = build(f"objective.loss={loss}", "objective.temperature=0.2")
    obj2.queue.copy_(F.normalize(torch.randn(32, 32, dtype=torch.float64), dim=1))
    assert abs(obj2({"views": [v0, v1]}, None)[0].item() - got.item()) > 1e-3


def test_key_encoder_gets_no_gradient_and_moves_only_by_the_trainers_ema():
    obj = build("objective.momentum=0.9")
    optimizer = create_optimizer_v2(obj, opt="sgd", lr=0.5, weight_decay=1e-4)  # as the trainer does
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    keys = list(obj.backbone_key.parameters()) + list(obj.head_key.parameters())
    assert keys and not any(p.requires_grad or id(p) in in_opt for p in keys)
    before = [p.detach().clone() for p in keys]
    loss, _ = obj({"views": views()}, None)
    loss.backward()
    assert all(p.grad is None for p in keys)
    assert all(p.grad is not None for p in obj.backbone.parameters())
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, keys))  # optimizer left it alone
    online = list(obj.backbone.parameters()) + list(obj.head.parameters())
    assert obj.momentum(0.3) == 0.9
    for o, t in obj.momentum_pairs():  # the trainer's loop
        EMA([(o, t)]).update(obj.momentum(0.3))
    for old, new, on in zip(before, keys, online):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * on.detach(), rtol=0, atol=1e-15)
    assert any(not torch.equal(a, p) for a, p in zip(before, keys))
    cos = build("objective.momentum=0.99", "objective.momentum_cosine=true")
    assert [cos.momentum(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.99, 0.995, 1.0])


def test_queue_is_a_fifo_ring_of_normalised_keys_saved_with_the_model():
    obj = build("objective.queue_size=10", "train.batch_size=4")
    assert {"queue", "queue_ptr"} <= set(obj.state_dict())  # so accelerate checkpoints it
    torch.testing.assert_close(obj.queue.norm(dim=1), torch.ones(10, dtype=torch.float64))
    batches = [F.normalize(torch.randn(4, 32, dtype=torch.float64), dim=1) for _ in range(3)]
    for b in batches:
        obj.enqueue(b)
    b1, b2, b3 = batches
    assert obj.queue_ptr.item() == 2  # 12 keys written into 10 slots
    assert torch.equal(obj.queue, torch.cat([b3[2:], b1[2:], b2, b3[:2]]))
    oldest_first = torch.roll(obj.queue, -int(obj.queue_ptr), dims=0)
    assert torch.equal(oldest_first, torch.cat([b1[2:], b2, b3]))  # the newest 10, in order


def test_forward_enqueues_exactly_this_steps_keys():
    obj = build()
    v0, v1 = views()
    old = obj.queue.clone()
    k = obj.keys(v1)
    obj({"views": [v0, v1]}, None)
    assert obj.queue_ptr.item() == 6
    torch.testing.assert_close(obj.queue[:6], k, rtol=0, atol=1e-15)
    assert torch.equal(obj.queue[6:], old[6:])


def test_a_checkpoint_from_before_the_enqueue_counter_still_loads():
    """enqueue_calls (when the queue's random entries are gone, for MoCHi's warning) is new in
    the state dict: an older checkpoint without it loads strictly and counts from 0."""
    obj = build()
    obj({"views": views()}, None)
    state = obj.state_dict()
    assert int(state.pop("enqueue_calls")) == 1 and "queue_label" not in state  # labels: not saved
    fresh = build(seed=1)
    fresh.load_state_dict(state)  # strict
    assert torch.equal(fresh.queue, obj.queue) and int(fresh.enqueue_calls) == 0


@pytest.fixture(scope="module")
def two_vs_one():
    return queue_check_one_and_two_processes()


def test_two_processes_fill_the_queue_exactly_like_one(two_vs_one):
    one, two = two_vs_one
    assert one["queue_ptr"].item() == two["queue_ptr"].item() == (4 * 8) % 24
    torch.testing.assert_close(two["queue"], one["queue"], rtol=0, atol=1e-12)
    # FIFO contents: the last 3 global batches (24 keys) in step order, rank 0's keys first
    oldest_first = torch.roll(one["queue"], -int(one["queue_ptr"]), dims=0)
    torch.testing.assert_close(oldest_first, torch.cat(one["keys"][1:]), rtol=0, atol=1e-12)
    # the check has teeth: the key encoder moves between steps (SGD + EMA), so a queue that
    # missed a step or a rank's keys (lightly #1018: only local keys enqueued) would differ
    assert (one["keys"][1] - one["keys"][3]).abs().max() > 1e-3


def test_simclr_mochi_same_class_share_pairs_labels_with_the_gathered_pool(two_vs_one):
    """SimCLR's pool is every process's batch: rank 0's metric equals a slow loop over rank 0's
    anchors against the whole global batch, with 1 and with 2 processes."""
    for run in two_vs_one:
        assert run["same_class"] == pytest.approx(run["same_class_loop"], abs=1e-12)
    assert two_vs_one[0]["same_class"] != pytest.approx(two_vs_one[1]["same_class"])  # 16 vs 8 anchors


def test_resume_restores_the_queue_exactly(tmp_path, shards):
    common = ["train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=5", *MOCO]
    full = tmp_path / "full"
    assert train("moco.yaml", shards, full, *common) == 0
    half = tmp_path / "half"
    (half / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000000003", half / "checkpoints" / "step-000000003")
    assert train("moco.yaml", shards, half, *common, "resume=auto") == 0

    def state(run, step):
        return load_file(str(run / "checkpoints" / f"step-{step:09d}" / "model.safetensors"))

    a, b, mid = state(full, 6), state(half, 6), state(full, 3)
    assert int(a["queue_ptr"]) == int(b["queue_ptr"]) == (6 * 16) % 64
    assert torch.equal(a["queue"], b["queue"])
    for name in a:  # the key encoder too
        assert torch.equal(a[name], b[name]), name
    # the queue at step 3 is not the one at step 6: a resume that lost it could not match
    assert not torch.equal(mid["queue"], a["queue"]) and int(mid["queue_ptr"]) == 48


def test_keys_are_normalised_per_shuffled_group():
    """Split-BN with 3 groups and shuffle-BN, checked by hand: the key encoder receives the key
    batch in the order of a permutation drawn from the generator, its first BatchNorm normalises
    each group of 2 consecutive rows with that group's own statistics, and the keys come back in
    the original order, equal to encoding each group alone."""
    obj = build("objective.bn_splits=3", "objective.shuffle_bn=true", "train.batch_size=6")
    bns = [m for m in obj.backbone_key.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.bn_splits == 3 for m in bns)
    seen = {}
    obj.backbone_key.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))  # returns None
    bns[0].register_forward_hook(lambda m, a, out: seen.update(bn=(a[0], out.clone())))  # ReLU is in place
    v0, v1 = views()
    obj({"views": [v0, v1]}, torch.Generator().manual_seed(3))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))  # the only draw
    assert not torch.equal(perm, torch.arange(6))
    assert torch.equal(seen["x"], v1[perm])
    x, out = seen["bn"]
    bn = bns[0]
    for g in range(3):  # BatchNorm of each group by hand: biased variance over (N, H, W)
        xg = x[2 * g:2 * g + 2]
        mean = xg.mean(dim=(0, 2, 3), keepdim=True)
        var = xg.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        by_hand = (xg - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(out[2 * g:2 * g + 2], by_hand, rtol=1e-10, atol=1e-10)
    whole = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
    assert (out - whole).abs().max() > 1e-2  # the groups matter
    # keys (enqueued at 0..5) in the original order, each image's key from its own group alone
    for m in bns:
        m.bn_splits = 1
    expected = torch.empty(6, 32, dtype=torch.float64)
    with torch.no_grad():
        for g in range(3):
            rows = perm[2 * g:2 * g + 2]
            expected[rows] = F.normalize(obj.head_key(obj.backbone_key(v1[rows])), dim=1)
    torch.testing.assert_close(obj.queue[:6], expected, rtol=0, atol=1e-12)


def test_group_batchnorm_is_kept_per_process_and_off_restores_sync_batchnorm():
    """Shuffle-BN needs per-process statistics (MoCo uses no SyncBatchNorm); the trainer asks the
    objective. bn_splits=1 with shuffle off is the earlier behaviour: SyncBatchNorm on GPUs."""
    obj = build("objective.bn_splits=2")
    assert obj.sync_batchnorm() is obj
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in obj.modules())
    off = build("objective.shuffle_bn=false").sync_batchnorm()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in off.modules())


def test_split_bn_on_one_process_equals_shuffle_bn_on_two(tmp_path):
    """1 process with bn_splits=2 and 2 processes (torchrun, gloo) with shuffle-BN on the same
    global batch: the same groups from the same permutation (rank 0's), so the same losses, step
    after step (SGD + EMA between), and the same queue. Exact up to float64 summation order,
    because every quantity is computed on the same rows: the queries' groups are the processes'
    slices, the keys' groups the slices of the permuted batch, and the 2-process loss is the mean
    of two equal-sized local means. Not comparable: BatchNorm's running statistics (one update
    per group here, one per process there; only eval mode uses them), and runs where the two
    draw their permutations from different generator states (the trainer's augmentation draws
    depend on the local batch size)."""
    one, two = one_and_two_processes("shuffle_bn_check.py", tmp_path)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-10, abs=1e-10)
    torch.testing.assert_close(one["queue"], two["queue"], rtol=0, atol=1e-10)
    assert max(one["losses"]) - min(one["losses"]) > 1e-3  # the steps differ: the check has teeth


@pytest.mark.parametrize("args,message", [
    (["objective.bn_splits=3"], "objective.bn_splits=3 must be >= 1 and divide train.batch_size=16"),
    (["objective.queue_size=8"], "objective.queue_size=8 is smaller than the 16 keys enqueued every step"),
    (["objective.queue_size=24", "objective.hallucinator.enabled=true"],  # the published [k; k]
     "objective.queue_size=24 is smaller than the 32 keys enqueued every step"),
    (["objective.momentum=1.5"], "objective.momentum must be in [0, 1]"),
    (["objective.temperature=0"], "objective.temperature must be > 0"),
    (["objective.loss=ntxent"], "objective.loss must be one of infonce, dcl, dclw"),
    (["objective.mochi.s=4", "objective.mochi.n=65"], "objective.mochi.n=65 exceeds the 64 queue entries"),
])
def test_bad_moco_values_are_one_line_errors(tmp_path, shards, capsys, args, message):
    assert train("moco.yaml", shards, tmp_path / "run", *MOCO, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup-train: error:") and message in err and "\n" not in err


def test_moco_recipe_runs_and_its_export_evaluates(tmp_path):
    curve, knn = run_recipe_and_evaluate(tmp_path, "moco.yaml", *MOCO, skip=4)
    assert curve[0] < curve[4]  # the random initial queue is easy; real keys make it harder
    assert 0.0 <= knn <= 1.0
