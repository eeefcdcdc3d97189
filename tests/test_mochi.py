"""MoCHi hard negative mixing and the shared similarity-level loss (docs/methods.md §2, §7)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, write_shards
from selfsup.config import RecipeError, load_recipe
from selfsup.losses import contrastive_logits_loss, pair_similarities
from selfsup.models import create_backbone
from selfsup.objectives import build_objective
from selfsup.objectives.mixing import HardNegativeMixer, MochiConfig, mix_hard_negatives, same_class_share
from selfsup.objectives.simclr import contrastive_loss
from tinyrun import MOCO, losses, run_recipe_and_evaluate, train

TINY = str(ROOT / "recipes" / "tiny.yaml")
TAU, SIGMA = 0.2, 0.5


def rand(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.requires_grad_(grad)


# ------------------------------------------------------------- the similarity-level loss ----
def problem(m=5, k=7, e=3, d=4):
    """Anchors, keys, a shared pool with some entries masked per anchor, per-anchor extras."""
    q, key = rand(m, d, seed=1, grad=True), rand(m, d, seed=2, grad=True)
    pool = F.normalize(rand(k, d, seed=3), dim=1)
    synth = F.normalize(rand(m, e, d, seed=4), dim=2)
    mask = torch.rand(m, k, generator=torch.Generator().manual_seed(5)) < 0.3
    return q, key, pool, synth, mask


def module_loss(q, key, pool, synth, mask, loss):
    qn, kn = F.normalize(q, dim=1), F.normalize(key, dim=1)
    pos = (qn * kn).sum(1)
    neg = (qn @ pool.T).masked_fill(mask, float("-inf"))
    extra = torch.einsum("md,med->me", qn, synth)
    return contrastive_logits_loss(pos, neg, extra, loss, TAU, SIGMA)


def loop_value(q, key, pool, synth, mask, loss):
    """Plain-Python floats, one anchor at a time."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    qs, ks = [unit(r) for r in q.tolist()], [unit(r) for r in key.tolist()]
    pos = [dot(a, b) for a, b in zip(qs, ks)]
    e = [math.exp(p / SIGMA) for p in pos]
    total = 0.0
    for m, a in enumerate(qs):
        terms = [pos[m]] if loss == "infonce" else []
        terms += [dot(a, p) for j, p in enumerate(pool.tolist()) if not mask[m, j]]
        terms += [dot(a, h) for h in synth[m].tolist()]
        w = 2 - e[m] / (sum(e) / len(e)) if loss == "dclw" else 1.0
        total += -w * pos[m] / TAU + math.log(sum(math.exp(t / TAU) for t in terms))
    return total / len(qs)


def loop_torch(q, key, pool, synth, mask, loss):
    qn, kn = F.normalize(q, dim=1), F.normalize(key, dim=1)
    pos = (qn * kn).sum(1)
    w = 2 - len(pos) * torch.softmax(pos.detach() / SIGMA, 0) if loss == "dclw" else torch.ones(len(pos))
    total = 0
    for m in range(len(qn)):
        terms = [pos[m:m + 1]] if loss == "infonce" else []
        terms += [pool[~mask[m]] @ qn[m], synth[m] @ qn[m]]
        total = total - w[m] * pos[m] / TAU + torch.logsumexp(torch.cat(terms) / TAU, 0)
    return total / len(qn)


@pytest.mark.parametrize("loss", ["infonce", "dcl", "dclw"])
def test_logits_loss_with_extra_negatives_equals_an_explicit_loop(loss):
    args = problem()
    got = module_loss(*args, loss)
    assert got.item() == pytest.approx(loop_value(*args, loss), rel=1e-12, abs=1e-12)
    g = torch.autograd.grad(got, args[:2])
    r = torch.autograd.grad(loop_torch(*args, loss), args[:2])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # the extras matter: dropping them changes value and gradient
    q, key, pool, synth, mask = args
    assert abs(module_loss(q, key, pool, synth[:, :0], mask, loss).item() - got.item()) > 1e-3


@pytest.mark.parametrize("loss", ["infonce", "dcl", "dclw"])
def test_without_extras_the_shared_loss_is_lightlys_simclr_loss(loss):
    z0, z1 = rand(6, 5, seed=7, grad=True), rand(6, 5, seed=8, grad=True)
    anchors, pos, neg, _ = pair_similarities(z0, z1)
    ours = contrastive_logits_loss(pos, neg, None, loss, TAU, SIGMA)
    lightly = contrastive_loss(z0, z1, loss, TAU, SIGMA)
    torch.testing.assert_close(ours, lightly, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (z0, z1)), torch.autograd.grad(lightly, (z0, z1))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # an empty extra block (s = s' = 0) is bit for bit the loss without one
    empty = contrastive_logits_loss(pos, neg, pos.new_zeros(len(pos), 0), loss, TAU, SIGMA)
    assert torch.equal(empty, ours)


# ------------------------------------------------------------------ synthetic negatives ----
def test_synthetic_negatives_are_unit_mixes_of_each_anchors_own_hardest():
    m, k, d, n, s, sp = 6, 40, 8, 5, 7, 4
    anchors = F.normalize(rand(m, d, seed=10), dim=1)
    pool = F.normalize(rand(k, d, seed=11), dim=1)
    pool[:m] = anchors  # each anchor's own copy: the most similar entry, and masked
    sim = (anchors @ pool.T).masked_fill(torch.eye(m, k, dtype=torch.bool), float("-inf"))
    mixed = mix_hard_negatives(anchors, pool, sim, n, s, sp, torch.Generator().manual_seed(0))
    f = mixed.features
    assert f.shape == (m, s + sp, d) and not f.requires_grad
    torch.testing.assert_close(f.norm(dim=2), torch.ones(m, s + sp, dtype=torch.float64))
    hard_sets = []
    for i in range(m):
        valid = [j for j in range(k) if j != i]
        top = set(sorted(valid, key=lambda j: -float(anchors[i] @ pool[j]))[:n])
        assert set(mixed.hard[i].tolist()) == top and i not in top  # masked self never picked
        assert set(mixed.pairs[i].flatten().tolist()) <= top and set(mixed.partner[i].tolist()) <= top
        assert len(set(mixed.pairs[i].flatten().tolist())) > 1
        hard_sets.append(frozenset(top))
    assert len(set(hard_sets)) == m  # anchors have different top-N: per-anchor indexing matters
    assert 0 <= mixed.alpha.min() and mixed.alpha.max() <= 1
    assert 0 <= mixed.beta.min() and mixed.beta.max() <= 0.5 and mixed.beta.max() > 0.3
    a = mixed.alpha.unsqueeze(2)
    type1 = F.normalize(a * pool[mixed.pairs[..., 0]] + (1 - a) * pool[mixed.pairs[..., 1]], dim=2)
    b = mixed.beta.unsqueeze(2)
    type2 = F.normalize(b * anchors.unsqueeze(1) + (1 - b) * pool[mixed.partner], dim=2)
    torch.testing.assert_close(f, torch.cat([type1, type2], dim=1), rtol=0, atol=1e-14)
    again = mix_hard_negatives(anchors, pool, sim, n, s, sp, torch.Generator().manual_seed(0))
    other = mix_hard_negatives(anchors, pool, sim, n, s, sp, torch.Generator().manual_seed(1))
    assert torch.equal(again.features, f) and not torch.equal(other.features, f)


def test_gradient_reaches_only_the_query_factor():
    """q·h with h built from q (type 2): the gradient must be h, not h + (∂h/∂q)ᵀq."""
    anchors = F.normalize(rand(4, 6, seed=12), dim=1).requires_grad_(True)
    pool = F.normalize(rand(20, 6, seed=13), dim=1).requires_grad_(True)
    sim = anchors @ pool.T
    mixer = HardNegativeMixer(MochiConfig(n=5, s=3, s_prime=3, start_epoch=0))
    extra, mixed = mixer.extra_similarities(anchors, pool, sim, torch.Generator().manual_seed(0))
    g_anchor, g_pool = torch.autograd.grad(extra.sum(), (anchors, pool), allow_unused=True)
    torch.testing.assert_close(g_anchor, mixed.features.sum(1), rtol=0, atol=1e-14)
    assert g_pool is None  # the queue / batch pool gets nothing through the mixed points


# ------------------------------------------------------------------- in the objectives ----
def build(*overrides, seed=0):
    cfg = load_recipe(TINY, ["train.batch_size=6", *overrides])
    torch.manual_seed(seed)
    return build_objective(cfg, create_backbone(cfg.model.name)).double()


def views(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]


def step(obj, epoch=math.inf, seed=0):
    loss, metrics = obj({"views": views(), "epoch": epoch}, torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(loss, [p for p in obj.parameters() if p.requires_grad])
    return loss, grads, metrics


OBJECTIVES = [["objective.loss=infonce"], ["objective.loss=dcl"], ["objective.loss=dclw"],
              ["objective.name=moco", "objective.queue_size=32", "objective.loss=infonce"],
              ["objective.name=moco", "objective.queue_size=32", "objective.loss=dcl"]]


@pytest.mark.parametrize("base", OBJECTIVES, ids=["simclr-infonce", "simclr-dcl", "simclr-dclw",
                                                  "moco-infonce", "moco-dcl"])
def test_no_mixed_points_or_warm_up_give_exactly_the_base_loss(base):
    mochi = ["objective.mochi.n=8", "objective.mochi.start_epoch=2"]
    ref_loss, ref_grads, _ = step(build(*base))
    for extra, epoch in (([], 5.0), (["objective.mochi.s=4", "objective.mochi.s_prime=2"], 1.99)):
        loss, grads, metrics = step(build(*base, *mochi, *extra), epoch)
        assert torch.equal(loss, ref_loss) and "mochi_hard_sim" not in metrics
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    # from start_epoch on, the extra negatives only add to every denominator: a larger loss
    loss, _, metrics = step(build(*base, *mochi, "objective.mochi.s=4", "objective.mochi.s_prime=2"), 2.0)
    assert loss.item() > ref_loss.item() + 1e-3 and "mochi_hard_sim" in metrics


def test_mixed_points_are_never_enqueued():
    obj = build("objective.name=moco", "objective.queue_size=32", "objective.mochi.n=8",
                "objective.mochi.s=4", "objective.mochi.s_prime=4", "objective.mochi.start_epoch=0")
    v0, v1 = views()
    old, keys = obj.queue.clone(), obj.keys(v1)
    loss, metrics = obj({"views": [v0, v1], "epoch": 0.0}, torch.Generator().manual_seed(0))
    assert "mochi_hard_sim" in metrics and obj.queue_ptr.item() == 6  # B keys, not B·(1 + s + s')
    torch.testing.assert_close(obj.queue[:6], keys, rtol=0, atol=1e-15)
    assert torch.equal(obj.queue[6:], old[6:]) and not obj.queue.requires_grad
    loss.backward()
    assert obj.queue.grad is None


MOCHI_MOCO = ["objective.name=moco", "objective.queue_size=32", "objective.mochi.n=8",
              "objective.mochi.s=4", "objective.mochi.s_prime=2"]


@pytest.mark.parametrize("start,warned", [(0.3, True), (0.6, False), (0.0, True)])
def test_mixing_before_the_queue_is_full_is_one_warning_line(capsys, start, warned):
    """K = 32 keys, 6 a step: real keys only after 6 steps. Epoch 0.1 a step: start_epoch 0.3
    mixes after 3 steps (warned at the second step, when the rate is known), 0.6 after 6 (fine),
    0 at once (warned at the first step)."""
    obj = build(*MOCHI_MOCO, f"objective.mochi.start_epoch={start}")
    for i in range(3):
        obj({"views": views(seed=i), "epoch": 0.1 * i}, torch.Generator().manual_seed(i))
        err = capsys.readouterr().err
        if i == (0 if start == 0 else 1) and warned:
            assert err.count("\n") == 1 and err.startswith("selfsup-train: warning: MoCHi starts mixing "
                                                           f"after {round(start * 10)} steps"), err
            assert "the 32-key queue holds only real keys after 6 (6 keys a step)" in err
            assert ("start_epoch >= 0.6" in err) == (start > 0)  # the rate is known from step 2
        else:
            assert err == "", err


def test_same_class_share_counts_known_labels_only():
    hard = torch.tensor([[0, 1], [2, 3]])
    # anchor 0 (class 0): entries 0 (class 0, same), 1 (class 1); anchor 1: 2 (unknown), 3 (same)
    share = same_class_share(hard, torch.tensor([0, 1]), torch.tensor([0, 1, -1, 1]))
    assert share.item() == pytest.approx(2 / 3)
    assert same_class_share(hard, torch.tensor([-1, -1]), torch.tensor([0, 1, 0, 1])).isnan()


def test_same_class_share_of_the_hardest_negatives_is_logged_when_the_monitor_has_labels():
    monitor = ["monitor.every_steps=5", "data.val=some/val-{000000..000001}.tar"]
    obj = build(*MOCHI_MOCO, "objective.mochi.start_epoch=0", *monitor)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    queue_labels = torch.arange(32) % 4 - 1  # -1 (unknown), 0, 1, 2, ...
    obj.queue_label.copy_(queue_labels)
    queue = obj.queue.clone()
    v0, v1 = views()
    with torch.no_grad():  # the queries as forward makes them (BatchNorm on the same batch)
        qn = F.normalize(obj.head(obj.backbone(v0)), dim=1)
    hard = (qn @ queue.T).topk(8, dim=1).indices
    pool = queue_labels[hard]
    same, known = (pool == labels[:, None]) & (pool >= 0), (pool >= 0)
    _, metrics = obj({"views": [v0, v1], "epoch": 0.0, "label": labels}, torch.Generator().manual_seed(0))
    assert metrics["mochi_hard_same_class"].item() == pytest.approx(same.sum().item() / known.sum().item())
    assert torch.equal(obj.queue_label[:6], labels)  # the keys' labels enter the queue with them
    # without a monitor with labels, no metric (and no label bookkeeping)
    _, metrics = build(*MOCHI_MOCO, "objective.mochi.start_epoch=0")(
        {"views": [v0, v1], "epoch": 0.0, "label": labels}, torch.Generator().manual_seed(0))
    assert "mochi_hard_sim" in metrics and "mochi_hard_same_class" not in metrics


def test_with_the_hallucinator_the_published_duplicated_keys_enqueue_their_labels_twice():
    monitor = ["monitor.every_steps=5", "data.val=some/val-{000000..000001}.tar"]
    obj = build(*MOCHI_MOCO, "objective.mochi.start_epoch=0", *monitor, "objective.hallucinator.enabled=true",
                "objective.hallucinator.hidden_dim=48")
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    _, metrics = obj({"views": views(), "epoch": 0.0, "label": labels}, torch.Generator().manual_seed(0))
    assert obj.queue_ptr.item() == 12 and torch.equal(obj.queue_label[:12], labels.repeat(2))
    assert (obj.queue_label[12:] == -1).all()
    assert metrics["mochi_hard_same_class"].isnan()  # the queue's labels were all unknown
    _, metrics = obj({"views": views(seed=2), "epoch": 0.0, "label": labels}, torch.Generator().manual_seed(1))
    assert 0 <= metrics["mochi_hard_same_class"].item() <= 1 and obj.queue_ptr.item() == 24


@pytest.mark.parametrize("halluc", [False, True])
def test_simclr_logs_the_same_class_share_of_its_hardest_in_batch_negatives(halluc):
    """SimCLR's pool is the batch: each of the 2B anchors' (with the Hallucinator 4B) hardest n
    negatives, itself and its image's positive excluded, by a slow loop over anchors."""
    monitor = ["monitor.every_steps=5", "data.val=some/val-{000000..000001}.tar"]
    extra = ["objective.hallucinator.enabled=true", "objective.hallucinator.hidden_dim=48",
             "objective.hallucinator.lambda_max=0"] if halluc else []
    mochi = ["objective.mochi.n=4", "objective.mochi.s=2", "objective.mochi.s_prime=1",
             "objective.mochi.start_epoch=0"]
    obj = build(*mochi, *extra, *monitor)
    labels = torch.tensor([0, 1, -1, 0, 1, 0])
    v0, v1 = views()
    with torch.no_grad():
        z0, z1 = obj.embed(torch.cat([v0, v1])).chunk(2)
        if halluc:  # λ = 0: ĥ = q, h = MLP([q; q]), positive z1 again
            z0, z1 = torch.cat([z0, obj.hallucinator.mlp(torch.cat([z0, z0], dim=1))]), torch.cat([z1, z1])
    rows = F.normalize(torch.cat([z0, z1]), dim=1)
    row_label, p = labels.repeat(len(rows) // 6), len(z0)
    same = known = 0
    for a in range(len(rows)):
        partner = (a + p) % (2 * p)
        sims = [(float(rows[a] @ rows[j]), j) for j in range(len(rows)) if j not in (a, partner)]
        for _, j in sorted(sims, reverse=True)[:4]:
            if row_label[a] >= 0 and row_label[j] >= 0:
                known += 1
                same += int(row_label[a] == row_label[j])
    _, metrics = obj({"views": [v0, v1], "epoch": 0.0, "label": labels}, torch.Generator().manual_seed(0))
    assert metrics["mochi_hard_same_class"].item() == pytest.approx(same / known)
    # no monitor with labels: no metric
    _, metrics = build(*mochi, *extra)({"views": [v0, v1], "epoch": 0.0, "label": labels},
                                       torch.Generator().manual_seed(0))
    assert "mochi_hard_sim" in metrics and "mochi_hard_same_class" not in metrics


@pytest.mark.parametrize("args,message", [
    (["objective.mochi.s=1", "objective.mochi.n=31"], "objective.mochi.n=31 exceeds the 30 in-batch negatives"),
    (["objective.mochi.s=-1"], "objective.mochi.s must be >= 0, not -1"),
    (["objective.mochi.s_prime=2", "objective.mochi.n=0"], "objective.mochi.n must be >= 1"),
    (["objective.mochi.start_epoch=-1"], "objective.mochi.start_epoch must be >= 0"),
    (["objective.mochi.m=3"], "unknown recipe key 'objective.mochi.m'"),
])
def test_bad_mochi_values_are_one_line_errors(tmp_path, shards, capsys, args, message):
    assert train("dcl_mochi.yaml", shards, tmp_path / "run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup-train: error:") and message in err and "\n" not in err


def test_mixing_needs_enough_negatives_at_run_time():
    with pytest.raises(RecipeError, match="objective.mochi.n=9 exceeds the 8 negatives"):
        sim = torch.zeros(2, 10).masked_fill(torch.eye(2, 10, dtype=torch.bool), float("-inf"))
        sim[:, -1] = float("-inf")
        mix_hard_negatives(torch.zeros(2, 3), torch.zeros(10, 3), sim, 9, 1, 1)


# ----------------------------------------------------------------------- recipes, e2e ----
def test_mochi_recipe_runs_mixes_after_warm_up_and_its_export_evaluates(tmp_path):
    mochi = ["objective.mochi.n=32", "objective.mochi.s=32", "objective.mochi.s_prime=16",
             "objective.mochi.start_epoch=1"]
    curve, knn = run_recipe_and_evaluate(tmp_path, "mochi.yaml", *MOCO, *mochi, *labelled_monitor(tmp_path),
                                         skip=4)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "mochi_hard_sim" in r] == list(range(5, 61))  # epoch 1 on
    assert 0.0 <= knn <= 1.0 and curve == losses(tmp_path / "run")
    assert_same_class_share_logged(records, first_step=5)


def test_dcl_mochi_recipe_runs_and_its_export_evaluates(tmp_path):
    mochi = ["objective.mochi.n=16", "objective.mochi.s=32", "objective.mochi.s_prime=16",
             "objective.mochi.start_epoch=0"]
    _, knn = run_recipe_and_evaluate(tmp_path, "dcl_mochi.yaml", *mochi, *labelled_monitor(tmp_path))
    assert 0.0 <= knn <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert_same_class_share_logged(records, first_step=1)


def labelled_monitor(tmp_path):
    """The online monitor on (once, at the last step) with labelled shards: the trainer then
    hands the train shards' labels to the objective for mochi_hard_same_class."""
    val = write_shards(tmp_path / "monitor", n=32, split="val", shard_size=32, seed=2)
    return ["monitor.every_steps=60", f"monitor.val={val}", "monitor.max_samples=64"]


def assert_same_class_share_logged(records, first_step):
    """The labels of real shards reached the metric: logged whenever mixing ran, a share in
    [0, 1], and not a constant (4 classes, 16 images a step)."""
    shares = [r["mochi_hard_same_class"] for r in records if "loss" in r and r["step"] >= first_step]
    assert len(shares) == 61 - first_step and all(0.0 <= x <= 1.0 for x in shares)
    assert len(set(shares)) > 1
