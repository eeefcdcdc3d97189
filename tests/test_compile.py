"""``model.compile``: the compiled step equals the eager one (losses and gradients to float
tolerance, step by step from the same state, over several steps with optimizer updates, EMA and
queues) for every objective; I-JEPA compiles
one graph for all its mask lengths (no recompile per batch) and without graph breaks; a resumed
compiled I-JEPA run equals an uninterrupted one.

torch.compile on a 2-core CPU is slow (inductor writes and builds C++ for every graph: ~2 min for
the tiny I-JEPA step from a cold cache, ~20 min for this file on a loaded VM), so everything is
tiny, each compiled module is built once (module-scoped results shared by the tests), and the
default backend here is ``aot_eager``: dynamo's tracing, guards and dynamic shapes and AOT
autograd's functionalised forward and backward, which is where selfsup's code meets the compiler
(graph breaks, recompiles, wrong gradients through traced code), without inductor's C++ code
generation. ``SELFSUP_TEST_COMPILE_BACKEND=inductor`` runs the same tests with what
``model.compile`` uses on a GPU (it passed on 2026-12-01 in ~23 min from a cold cache)."""

import functools
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from conftest import ROOT, write_shards
from selfsup.config import load_recipe
from selfsup.schedules import EMA
from selfsup.build import build_model
from selfsup.views import view_size
from tinyrun import TINY, TINY_NO_HEAD, train

HALLUCINATOR = ["objective.hallucinator.enabled=true", "objective.hallucinator.hidden_dim=48"]
MOCO = ["objective.name=moco", "objective.queue_size=32", "objective.momentum=0.9"]
MOCHI = ["objective.mochi.n=8", "objective.mochi.s=4", "objective.mochi.s_prime=2",
         "objective.mochi.start_epoch=0"]
# tiny ViT for I-JEPA: an 8x8 grid of 2 px patches on 16 px images, one block, one predictor block
IJ = ["model.name=test_vit", "model.kwargs.img_size=16", "model.kwargs.patch_size=2",
      "model.kwargs.depth=1", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
      "objective.pred_depth=1", "objective.pred_dim=16", "objective.min_keep=4"]
JC = ["model.name=test_resnet", "model.small_stem=true", "augment.size=16", "objective.proj_hidden_dim=64",
      "objective.proj_dim=32"]
# name: (recipe, overrides, TINY set); batch 8 throughout. model.compile compiles the backbone
# (I-JEPA: encoders and predictor); the contrastive losses (InfoNCE, DCL, DCLW) run eager around
# the same compiled backbone, so one of them (DCL) stands for all three
CASES = {
    "simclr-dcl": ("tiny.yaml", ["objective.loss=dcl"], TINY),
    "simclr-dcl-hallucinator": ("tiny.yaml", ["objective.loss=dcl", *HALLUCINATOR], TINY),
    "moco": ("tiny.yaml", MOCO, TINY),
    "moco-mochi": ("tiny.yaml", [*MOCO, *MOCHI], TINY),
    "jigclu": ("jigclu_small.yaml", JC, TINY),
    "ijepa": ("ijepa_vit_tiny.yaml", IJ, TINY_NO_HEAD),
}
STEPS = 4
BACKEND = os.environ.get("SELFSUP_TEST_COMPILE_BACKEND", "aot_eager")


@pytest.fixture(scope="module", autouse=True)
def compile_backend():
    """Every torch.compile the objectives and nn.Module.compile make in this file uses BACKEND."""
    patch = pytest.MonkeyPatch()
    patch.setattr(torch, "compile", functools.partial(torch.compile, backend=BACKEND))
    yield BACKEND
    patch.undo()


def build(case: str, compile_: bool):
    recipe, overrides, tiny = CASES[case]
    cfg = load_recipe(str(ROOT / "recipes" / recipe), [*tiny, *overrides, "train.batch_size=8",
                                                       f"model.compile={str(compile_).lower()}"])
    torch.manual_seed(0)  # the same initial weights for the eager and the compiled module
    return build_model(cfg, SimpleNamespace(num_processes=1, device=torch.device("cpu")))


def lockstep(eager, compiled) -> tuple[list[dict], list[dict]]:
    """STEPS training steps as the trainer makes them (forward with the objective's own
    augmentation and masks, backward, optimizer step, EMA) on both modules side by side; before
    each step the compiled module gets the eager one's state (weights, EMA copies, queues,
    counters), so each step is compared from the same state and float differences do not
    compound over the updates. Per step and module: loss, metrics and every gradient."""
    runs = []
    for obj in (eager, compiled):
        opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        runs.append((obj, opt, torch.Generator().manual_seed(1), []))
    views = eager.views()
    shape = (8, len(views), 3, view_size(views), view_size(views))
    for i in range(STEPS):
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        compiled.load_state_dict(eager.state_dict())
        for obj, opt, gen, out in runs:
            loss, metrics = obj({"image": images, "epoch": float(i)}, gen)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad(set_to_none=True)
            for online, target in obj.momentum_pairs():
                EMA([(online, target)]).update(obj.momentum((i + 1) / STEPS))
            out.append({"loss": loss.detach(), "metrics": {k: float(v) for k, v in metrics.items()},
                        "grads": grads})
    return runs[0][3], runs[1][3]


@pytest.fixture(scope="module")
def steps():
    """Eager and compiled steps of each case, made once per module; per compiled case also the
    dynamo counters it added (graphs, graph breaks)."""
    cache = {}

    def get(case):
        if case not in cache:
            torch._dynamo.reset()  # no cache entries or dynamic-shape memory from another case
            before = {k: dict(v) for k, v in counters.items()}
            eager, compiled = lockstep(build(case, False), build(case, True))
            added = {k: {n: c - before.get(k, {}).get(n, 0) for n, c in v.items()} for k, v in counters.items()}
            cache[case] = eager, compiled, added
        return cache[case]

    yield get
    torch._dynamo.reset()


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_steps_equal_eager_losses_and_gradients(steps, case):
    eager, compiled, added = steps(case)
    assert added["stats"].get("unique_graphs", 0) >= 1, "nothing was compiled"
    for i, (e, c) in enumerate(zip(eager, compiled)):
        torch.testing.assert_close(c["loss"], e["loss"], rtol=1e-4, atol=1e-5, msg=f"{case} step {i} loss")
        assert c["grads"].keys() == e["grads"].keys() and e["grads"]
        for name, g in e["grads"].items():
            # relative to the gradient's norm: single elements of a conv kernel's gradient differ
            # by ~1e-5 with inductor's summation order
            err = float((c["grads"][name] - g).norm() / g.norm().clamp_min(1e-12))
            assert err < 1e-4, f"{case} step {i} grad {name}: relative error {err:.2e}"
    assert len({float(e["loss"]) for e in eager}) == STEPS  # the steps differ: weights moved


def test_ijepa_compiles_one_graph_for_every_mask_length(steps):
    """The masks' lengths change from batch to batch (a new size is drawn per batch); they are
    dynamic dimensions of the compiled graph, not a recompile per batch, and the step traces
    without a graph break (a break splits the graph and stops fusion across it)."""
    eager, compiled, added = steps("ijepa")
    lengths = [(s["metrics"]["context_len"], s["metrics"]["target_len"]) for s in compiled]
    assert lengths == [(s["metrics"]["context_len"], s["metrics"]["target_len"]) for s in eager]
    assert len({c for c, _ in lengths}) >= 3, lengths  # the test does see different lengths
    assert added["stats"]["unique_graphs"] == 1, added["stats"]
    assert not any(added.get("graph_break", {}).values()), added["graph_break"]


def test_resumed_compiled_ijepa_run_equals_an_uninterrupted_one(tmp_path):
    shards = write_shards(tmp_path / "s", n=32, shard_size=16)
    common = ["train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=5", "train.batch_size=8",
              "model.compile=true", *IJ]
    full = tmp_path / "full"
    assert train("ijepa_vit_tiny.yaml", shards, full, *common, tiny=TINY_NO_HEAD) == 0
    half = tmp_path / "half"
    (half / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000000002", half / "checkpoints" / "step-000000002")
    assert train("ijepa_vit_tiny.yaml", shards, half, *common, "resume=auto", tiny=TINY_NO_HEAD) == 0
    a, b = (load_file(str(r / "checkpoints" / "step-000000004" / "model.safetensors")) for r in (full, half))
    assert int(a["mask_calls"]) == int(b["mask_calls"]) == 4
    for name in a:  # context and target encoders, predictor
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(full)[2:] == losses(half) and len(set(losses(full))) == 4
