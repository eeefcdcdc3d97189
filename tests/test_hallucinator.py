"""The Hallucinator (docs/methods.md §5, §7): extrapolation, generator training, doubled batch, the
masked SimCLR variant against an explicit loop, keys enqueued once, recipes end to end."""

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


def test_moco_enqueues_each_key_once():
    obj = build(*MOCO_OBJ, *ON)
    v0, v1 = views()
    old, keys = obj.queue.clone(), obj.keys(v1)
    obj({"views": [v0, v1]}, torch.Generator().manual_seed(0))
    assert obj.queue_ptr.item() == 6  # not 12: the duplicated keys are not enqueued twice
    torch.testing.assert_close(obj.queue[:6], keys, rtol=0, atol=1e-15)
    assert torch.equal(obj.queue[6:], old[6:])


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


@pytest.mark.parametrize("loss", ["infonce", "dcl"])
def test_simclr_variant_masks_same_instance_entries(loss):
    obj = build(f"objective.loss={loss}", *ON)
    v0, v1 = views()
    lam = obj.hallucinator.draw_lambda(torch.Generator().manual_seed(4))
    z0, z1 = obj.embed(torch.cat([v0, v1])).chunk(2)
    h = obj.hallucinator.mlp(torch.cat([z0, extrapolate(z0, z1, lam)], dim=1))
    expected = masked_loop(z0, h, z1, loss)
    got, _ = obj({"views": [v0, v1]}, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the official quirk, NT-Xent over [q; h] vs [k; k] with h_i and k_i's copy as negatives of
    # q_i, is another loss: the masks matter
    quirk = simclr.contrastive_loss(torch.cat([z0, h]), torch.cat([z1, z1]), loss, 0.2)
    assert abs(quirk.item() - got.item()) > 1e-2


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
