"""The Hallucinator (docs/methods.md §5, §7): extrapolation, generator training, doubled batch, the
published SimCLR and MoCo variants against the authors' formulas written out, the masked SimCLR
variant against an explicit loop, keys enqueued once or twice, recipes end to end."""

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from selfsup.config import load_recipe
from selfsup.models import create_backbone
from selfsup.objectives import build_objective, moco, simclr
from selfsup.objectives.hallucinator import Hallucinator, extrapolate
from tinyrun import MOCO, queue_check_one_and_two_processes, run_recipe_and_evaluate, train

TINY = str(ROOT / "recipes" / "tiny.yaml")
ON = ["objective.hallucinator.enabled=true", "objective.hallucinator.hidden_dim=48"]
SIMCLR = ["objective.loss=dcl"]
MOCO_OBJ = ["objective.name=moco", "objective.queue_size=32"]


def build(*overrides, seed=0):
    cfg = load_recipe(TINY, ["train.batch_size=6", "objective.temperature=0.2", *overrides])
    torch.manual_seed(seed)
    return build_objective(cfg, create_backbone(cfg.model.name)).double()


def views(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]


def test_extrapolation_and_lambda():
    q, k = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(extrapolate(q, k, 0.0), q)  # λ = 0: ĥ = q
    torch.testing.assert_close(extrapolate(q, k, 0.05), 1.05 * q - 0.05 * k)
    gen = Hallucinator(8, lambda_max=0.1).double()
    assert [m.out_features for m in gen.mlp if isinstance(m, torch.nn.Linear)] == [16, 16, 8]
    h, lam = gen(q, k, lam=0.0)
    torch.testing.assert_close(h, gen.mlp(torch.cat([q, q], dim=1)), rtol=0, atol=0)
    lams = [gen.draw_lambda(torch.Generator().manual_seed(i)) for i in range(200)]
    assert 0 <= min(lams) and max(lams) <= 0.1 and max(lams) - min(lams) > 0.09
    assert gen.draw_lambda(torch.Generator().manual_seed(3)) == lams[3]  # from the generator
    assert Hallucinator(8, lambda_max=0.0).draw_lambda(None) == 0.0


@pytest.mark.parametrize("base", [SIMCLR, MOCO_OBJ], ids=["simclr", "moco"])
def test_generator_is_trained_by_the_contrastive_loss(base):
    obj = build(*base, *ON)
    names = [n for n, _ in obj.named_parameters() if n.startswith("hallucinator.")]
    assert len(names) == 6  # three Linear layers: part of the module, so the optimizer gets them
    loss, metrics = obj({"views": views()}, torch.Generator().manual_seed(0))
    loss.backward()
    for name, p in obj.hallucinator.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert 0 <= metrics["halluc_lambda"] <= 0.1


@pytest.mark.parametrize("base", [SIMCLR, MOCO_OBJ], ids=["simclr", "moco"])
def test_disabled_is_exactly_the_base_loss(base):
    ref, _ = build(*base)({"views": views()}, torch.Generator().manual_seed(0))
    obj = build(*base, "objective.hallucinator.enabled=false", "objective.hallucinator.lambda_max=0.05")
    loss, metrics = obj({"views": views()}, torch.Generator().manual_seed(0))
    assert torch.equal(loss, ref) and obj.hallucinator is None and "halluc_lambda" not in metrics
    on, _ = build(*base, *ON)({"views": views()}, torch.Generator().manual_seed(0))
    assert abs(on.item() - ref.item()) > 1e-3


@pytest.mark.parametrize("base,module,rows", [(SIMCLR, simclr, 4 * 6), (MOCO_OBJ, moco, 2 * 6)],
                         ids=["simclr", "moco"])
def test_the_batch_of_queries_doubles(monkeypatch, base, module, rows):
    seen = []
    real = module.contrastive_logits_loss

    def spy(pos, neg, *args, **kwargs):
        seen.append((tuple(pos.shape), tuple(neg.shape)))
        return real(pos, neg, *args, **kwargs)

    monkeypatch.setattr(module, "contrastive_logits_loss", spy)
    obj = build(*base, *ON)
    obj({"views": views()}, torch.Generator().manual_seed(0))
    # SimCLR: anchors [q; h; k; k] against the pool of the same; MoCo: [q; h] against the queue
    assert seen == [((rows,), (rows, rows if module is simclr else 32))]


@pytest.mark.parametrize("extra,copies", [([], 2), (["objective.hallucinator.enqueue_twice=false"], 1)])
def test_moco_enqueues_the_published_duplicated_keys_by_default(extra, copies):
    obj = build(*MOCO_OBJ, *ON, *extra)
    v0, v1 = views()
    old, keys = obj.queue.clone(), obj.keys(v1)
    obj({"views": [v0, v1]}, torch.Generator().manual_seed(0))
    n = 6 * copies  # the authors' code enqueues [k; k]; enqueue_twice=false each key once
    assert obj.queue_ptr.item() == n
    torch.testing.assert_close(obj.queue[:n], keys.repeat(copies, 1), rtol=0, atol=1e-15)
    assert torch.equal(obj.queue[n:], old[n:])


def masked_loop(q, h, k, loss, tau=0.2):
    """Rows [q; h; k; k]; q_i and h_i have positive k_i (and k_i's copies have q_i, h_i); every
    row of the same image is excluded from the negatives (the clean variant)."""
    rows = F.normalize(torch.cat([q, h, k, k]), dim=1)
    b = len(q)
    total = 0
    for r in range(4 * b):
        partner = r + 2 * b if r < 2 * b else r - 2 * b
        pos = rows[r] @ rows[partner]
        others = [j for j in range(4 * b) if j % b != r % b]
        terms = rows[others] @ rows[r]
        if loss == "infonce":
            terms = torch.cat([terms, pos.view(1)])
        total = total - pos / tau + torch.logsumexp(terms / tau, 0)
    return total / (4 * b)


def hallucinated(obj, v0, v1, seed):
    """q, h, k as the objective makes them, λ drawn as forward draws it from ``seed``."""
    lam = obj.hallucinator.draw_lambda(torch.Generator().manual_seed(seed))
    z0, z1 = obj.embed(torch.cat([v0, v1])).chunk(2)
    return z0, obj.hallucinator.mlp(torch.cat([z0, extrapolate(z0, z1, lam)], dim=1)), z1


def official_nt_xent(feat1, feat2, tau):
    """The authors' NT_Xent (losses/NT_Xent.py, temperature = base_temperature), written out:
    rows [feat1; feat2] normalised, row r's positive is r ± n, every other row but r itself is in
    its denominator."""
    n = len(feat1)
    f = F.normalize(torch.cat([feat1, feat2]), dim=1)
    logits = f @ f.T / tau
    neg_mask = ~torch.eye(2 * n, dtype=torch.bool)
    pos_mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    pos_mask[:n, n:] = torch.eye(n, dtype=torch.bool)
    pos_mask[n:, :n] = torch.eye(n, dtype=torch.bool)
    log_prob = logits[pos_mask] - torch.log(torch.exp(logits)[neg_mask].view(2 * n, -1).sum(1))
    return -log_prob.mean()


def test_simclr_default_is_the_published_nt_xent_over_q_h_against_k_k():
    """The authors' SimCLR path: the model returns [q; h; k; k], the loss is NT_Xent([q; h], [k; k])."""
    obj = build("objective.loss=infonce", *ON)
    v0, v1 = views()
    q, h, k = hallucinated(obj, v0, v1, seed=4)
    expected = official_nt_xent(torch.cat([q, h]), torch.cat([k, k]), 0.2)
    got, _ = obj({"views": [v0, v1]}, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the masked variant is another loss: the masks matter
    masked = masked_loop(q, h, k, "infonce")
    assert abs(masked.item() - got.item()) > 1e-2


def published_dcl_loop(q, h, k, tau=0.2):
    """DCL over the published rows: every row but itself and its positive is a negative."""
    rows = F.normalize(torch.cat([q, h, k, k]), dim=1)
    n2 = 2 * len(q)
    total = 0
    for r in range(2 * n2):
        partner = (r + n2) % (2 * n2)
        others = [j for j in range(2 * n2) if j not in (r, partner)]
        total = total - rows[r] @ rows[partner] / tau + torch.logsumexp(rows[others] @ rows[r] / tau, 0)
    return total / (2 * n2)


def test_simclr_published_variant_with_dcl():
    obj = build("objective.loss=dcl", *ON)
    v0, v1 = views()
    got, _ = obj({"views": [v0, v1]}, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, published_dcl_loop(*hallucinated(obj, v0, v1, seed=5)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["infonce", "dcl"])
def test_simclr_mask_same_image_masks_same_instance_entries(loss):
    obj = build(f"objective.loss={loss}", *ON, "objective.hallucinator.mask_same_image=true")
    v0, v1 = views()
    q, h, k = hallucinated(obj, v0, v1, seed=4)
    got, _ = obj({"views": [v0, v1]}, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, masked_loop(q, h, k, loss), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("twice", [False, True])
def test_moco_variant_is_the_official_formula(twice):
    """The authors' models/moco.py with the generator on, written out: q raw from the query head,
    k normalised from the key encoder, [q; G(q, k, λ)] normalised, logits [q·k | q·queue]/T over
    the doubled batch with keys [k; k], cross-entropy with label 0. Their code enqueues [k; k]
    (``enqueue_twice``, the default); ``false`` enqueues k once."""
    obj = build(*MOCO_OBJ, *ON, "objective.loss=infonce", f"objective.hallucinator.enqueue_twice={twice}")
    v0, v1 = views()
    queue = obj.queue.clone()
    lam = obj.hallucinator.draw_lambda(torch.Generator().manual_seed(6))
    q = obj.head(obj.backbone(v0))
    with torch.no_grad():
        k = F.normalize(obj.head_key(obj.backbone_key(v1)), dim=1)
    out = torch.cat([q, obj.hallucinator.mlp(torch.cat([q, (1 + lam) * q - lam * k], dim=1))])
    out, k2 = F.normalize(out, dim=1), torch.cat([k, k])
    logits = torch.cat([(out * k2).sum(1, keepdim=True), out @ queue.T], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(len(out), dtype=torch.long))
    got, _ = obj({"views": [v0, v1]}, torch.Generator().manual_seed(6))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    n = 12 if twice else 6
    assert obj.queue_ptr.item() == n
    torch.testing.assert_close(obj.queue[:n], k2[:n], rtol=0, atol=1e-14)
    assert torch.equal(obj.queue[n:], queue[n:])


def test_two_processes_give_the_gradients_of_one():
    """SimCLR + Hallucinator across processes: gathered rows keep their image ids, so the
    masks and gradients of 2 processes equal those of 1 on the same global batch."""
    one, two = queue_check_one_and_two_processes()
    assert one["lambda"] == two["lambda"] > 0
    g1, g2 = one["halluc_grads"], two["halluc_grads"]
    assert g1.keys() == g2.keys() and any(k.startswith("hallucinator.") for k in g1)
    assert max((g1[k] - g2[k]).abs().max().item() for k in g1) <= 1e-10
    assert max(g1[k].abs().max().item() for k in g1) > 1e-3


@pytest.mark.parametrize("args,message", [
    (["objective.hallucinator.lambda_max=-0.1"], "objective.hallucinator.lambda_max must be >= 0"),
    (["objective.hallucinator.hidden_dim=0"], "objective.hallucinator.hidden_dim must be >= 1"),
])
def test_bad_hallucinator_values_are_one_line_errors(tmp_path, shards, capsys, args, message):
    assert train("dcl_hallucinator.yaml", shards, tmp_path / "run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup-train: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("recipe,extra,skip", [("dcl_hallucinator.yaml", [], 0),
                                               ("moco_hallucinator.yaml", MOCO, 4)])
def test_hallucinator_recipes_run_and_their_exports_evaluate(tmp_path, recipe, extra, skip):
    _, knn = run_recipe_and_evaluate(tmp_path, recipe, "objective.hallucinator.hidden_dim=64",
                                     *extra, skip=skip)
    assert 0.0 <= knn <= 1.0
