"""A training step makes the host wait for the device nowhere (issue: GPU efficiency).

On a GPU every ``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``, ``nonzero()`` of a device tensor
and every blocking host→device copy stalls the host until the device has drained its queue: the
next kernels are not queued in time and the GPU idles for the host's Python. A CPU run cannot
observe a stall, so :class:`HostSyncs` counts the calls that would cause one, on the tensors that
would live on the device: the model's parameters, buffers and gradients, the batch once moved
there, and everything computed from them. Tensors the host makes itself (augmentation and mask
draws from the CPU generator) are the host's own: reading them costs nothing. With a GPU present,
``torch.cuda.set_sync_debug_mode("error")`` checks the real thing.

The whole loop of the trainer runs under the counter; the logging step (a deliberate sync per
``train.log_every`` steps) and checkpoints are left out."""

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from conftest import ROOT, write_shards
from selfsup.config import load_recipe
from tinyrun import TINY, TINY_NO_HEAD

SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
         "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
MOVES = {"to", "cuda", "copy_"}
IJ = ["model.name=test_vit", "model.kwargs.img_size=16", "model.kwargs.patch_size=2",
      "model.kwargs.depth=1", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
      "objective.pred_depth=1", "objective.pred_dim=16", "objective.min_keep=4"]
CASES = {"simclr": ("tiny.yaml", ["augment.blur_p=0.5", "optim.clip_grad=1.0"], TINY),
         "ijepa": ("ijepa_vit_tiny.yaml", IJ, TINY_NO_HEAD)}


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def host_made_literal(kwargs) -> bool:
    """Made on the host: no ``device=``, or torch's own ``device="cpu"`` (a string; the step's
    code passes torch.device objects such as ``x.device``)."""
    return "device" not in kwargs or kwargs["device"] == "cpu"


def _is_device(x) -> bool:
    if not isinstance(x, (torch.device, str)):
        return False
    try:
        return torch.device(x).type in ("cpu", "cuda")
    except RuntimeError:  # a string that is no device
        return False


class HostSyncs(TorchFunctionMode):
    """Records ``(call, where)`` for every call on the step's path that would make the host wait
    for a device. Host tensors are marked (``_host``) when made by a factory without ``device=``
    or computed from host tensors only; any other tensor is a device tensor. ``paused`` skips
    the deliberate syncs (logging, checkpoints)."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self.paused = False

    def _record(self, what: str) -> None:
        frame = next(f for f in reversed(traceback.extract_stack()[:-2])
                     if "torch/" not in f.filename and "test_host_sync" not in f.filename)
        self.found.append((what, f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.line}"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors((args, kwargs))
        on_device = [t for t in inputs if not getattr(t, "_host", False)]
        out = func(*args, **kwargs)
        if self.paused:
            return out
        if name in SYNCS and args and isinstance(args[0], torch.Tensor) and not getattr(args[0], "_host", False):
            self._record(f"{name}() of a device tensor")
        elif name in MOVES and args and getattr(args[0], "_host", False) or (
                name == "copy_" and len(args) > 1 and getattr(args[1], "_host", False)):
            target = [a for a in (*args[1:], kwargs.get("device")) if _is_device(a)]
            if name == "copy_" or target or name == "cuda":  # a host tensor sent to the device
                if not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2] is True):
                    self._record(f"blocking host->device {name}()")
                for t in _tensors(out):
                    t._host = False
                return out
        elif name in ("tensor", "as_tensor") and not host_made_literal(kwargs) and not on_device:
            self._record(f"torch.{name}(host data, device=...)")  # a blocking copy
        # torch's optimizers keep their step counts on the host, made with device="cpu"
        host_made = host_made_literal(kwargs)
        is_host = (not on_device and host_made) if inputs else host_made
        for t in _tensors(out):
            if is_host and not isinstance(t, torch.nn.Parameter):
                t._host = True
        return out


def trainer(tmp_path, case):
    from selfsup.trainer import Trainer

    recipe, overrides, tiny = CASES[case]
    shards = write_shards(tmp_path / "s", n=32, shard_size=16)
    cfg = load_recipe(str(ROOT / "recipes" / recipe), [*tiny, *overrides, f"data.train={shards}",
                                                       f"run.dir={tmp_path / 'run'}", "train.max_steps=3",
                                                       "train.batch_size=8", "train.log_every=100"])
    return Trainer(cfg)


def pause_around(counter: HostSyncs, fn):
    def wrapped(*args, **kwargs):
        counter.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            counter.paused = False
    return wrapped


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_makes_no_host_sync(tmp_path, case):
    t = trainer(tmp_path, case)
    counter = HostSyncs()
    t._log = pause_around(counter, t._log)  # one deliberate sync per log window
    t.save = pause_around(counter, t.save)  # and per checkpoint (the weights' NaN check)
    with counter:
        t.train()
    assert t.state["step"] == 3
    assert counter.found == [], "\n".join(f"{what} at {where}" for what, where in counter.found)


def test_the_counter_sees_the_syncs_it_is_meant_to_see():
    """The counter itself: a blocking copy, .item() and bool() of a device tensor are found;
    reading host draws is not."""
    counter = HostSyncs()
    w = torch.nn.Parameter(torch.ones(3))
    with counter:
        u = torch.rand(3, generator=torch.Generator().manual_seed(0))
        idx = (u < 2).nonzero().flatten()  # host: free
        assert int(idx[0]) == 0 and len(u.tolist()) == 3
        d = u.to(torch.device("cpu"), non_blocking=True)
        y = (w * d).sum()
        assert counter.found == []
        y.item()
        bool(y > 0)
        idx.to(torch.device("cpu"))
        (w > 0).nonzero()
    assert [what for what, _ in counter.found] == ["item() of a device tensor", "__bool__() of a device tensor",
                                                   "blocking host->device to()", "nonzero() of a device tensor"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_a_cuda_training_step_makes_no_host_sync(tmp_path, case):
    """The real check where a GPU is present: CUDA raises on every synchronising call of the
    loop, logging and checkpoints left out as above."""
    t = trainer(tmp_path, case)

    def unchecked(fn):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return wrapped

    t._log, t.save = unchecked(t._log), unchecked(t.save)
    torch.cuda.set_sync_debug_mode("error")
    try:
        t.train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert t.state["step"] == 3
