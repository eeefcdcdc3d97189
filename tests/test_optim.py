"""The recipe's optimizer and initial weights against what each method's official code builds:
MoCo v2's and JigClu's ``torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)``
(classical momentum, every parameter decayed) on a torchvision-initialised ResNet, while the other
recipes keep timm's exemption of biases and norms and its zero-initialised last norms."""

import copy

import pytest
import torch
from torch import nn

from conftest import ROOT
from selfsup.config import load_recipe
from selfsup.optim import create_optimizer


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))


def steps(net, optimizer, n=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(8, 3, 6, 6, generator=g)
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


def built(net, recipe, *overrides):
    cfg = load_recipe(str(ROOT / "recipes" / recipe), list(overrides))
    return create_optimizer(net, cfg.optim, 0.05, "cpu"), cfg.optim


@pytest.mark.parametrize("recipe", ["moco.yaml", "jigclu.yaml", "mochi.yaml", "moco_hallucinator.yaml"])
def test_moco_and_jigclu_train_with_the_official_sgd(recipe):
    net = small_net()
    net(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer
    ref_net = copy.deepcopy(net)
    optimizer, o = built(net, recipe)
    assert (o.name, o.momentum, o.weight_decay) == ("sgd", 0.9, 1e-4)
    reference = torch.optim.SGD(ref_net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for ours, theirs in zip(steps(net, optimizer), steps(ref_net, reference)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_timms_defaults_stay_where_they_are_the_methods():
    """Without the keys, timm's sgd is Nesterov and biases/norms are not decayed: a different
    update from the official MoCo one, so the test above would catch the keys going missing."""
    net = small_net()
    net(torch.zeros(1, 3, 6, 6))
    ref_net = copy.deepcopy(net)
    optimizer, _ = built(net, "moco.yaml", "optim.nesterov=null", "optim.decay_bias_and_norm=false")
    assert all(g["nesterov"] for g in optimizer.param_groups)
    decayed = {p.ndim for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert 1 not in decayed and decayed == {2, 4}
    reference = torch.optim.SGD(ref_net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ours, theirs = steps(net, optimizer), steps(ref_net, reference)
    assert not all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(ours, theirs))


def test_a_resume_keeps_the_checkpoints_state_but_the_recipes_settings():
    """torch's load_state_dict brings back each group's settings as saved: a MoCo run started
    with timm's Nesterov SGD and bias/norm exemption, resumed under the recipe that now says
    otherwise, kept them. Both settings build the same groups, so the state loads; the trainer
    then re-applies the recipe's settings."""
    from selfsup.optim import reapply_hyperparameters, recipe_hyperparameters

    net = small_net()
    net(torch.zeros(1, 3, 6, 6))
    old, _ = built(net, "moco.yaml", "optim.nesterov=null", "optim.decay_bias_and_norm=false")
    steps(net, old, 2)
    new, o = built(net, "moco.yaml")
    wanted = recipe_hyperparameters(new)
    new.load_state_dict(old.state_dict())
    assert any(g["nesterov"] for g in new.param_groups)  # what torch alone leaves
    reapply_hyperparameters(new, wanted)
    assert not any(g["nesterov"] for g in new.param_groups)
    assert all(g["weight_decay"] == g["initial_weight_decay"] == o.weight_decay for g in new.param_groups)
    for p in net.parameters():  # the momentum buffers are the checkpoint's
        torch.testing.assert_close(new.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"])


def test_nesterov_is_left_to_optimizers_that_have_it():
    net = small_net()
    net(torch.zeros(1, 3, 6, 6))
    optimizer, _ = built(net, "moco.yaml", "optim.name=adamw")  # moco.yaml's nesterov: false ignored
    assert isinstance(optimizer, torch.optim.AdamW)


def test_the_nesterov_switch_reaches_every_optimizer_that_has_one():
    net = small_net()
    net(torch.zeros(1, 3, 6, 6))
    for name in ("sgd", "momentum", "lars", "sgdw"):
        optimizer, _ = built(net, "moco.yaml", f"optim.name={name}", "optim.nesterov=true")
        assert all(g["nesterov"] for g in optimizer.param_groups), name


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet10t", "regnetx_002", "resnest14d"])
def test_zero_init_last_false_starts_every_norm_at_one_as_torchvision(name):
    """timm zeroes each residual block's last norm weight; MoCo v2's and JigClu's official
    (torchvision) ResNets do not. With model.zero_init_last=false no norm weight starts at zero,
    and nothing else changes."""
    from selfsup.models import create_backbone

    def norms(model):
        return {f"{name}.weight": m.weight.detach() for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is not None}

    torch.manual_seed(0)
    timm_init = create_backbone(name)
    torch.manual_seed(0)
    theirs = create_backbone(name, zero_init_last=False)
    zeroed = [k for k, v in norms(timm_init).items() if not v.any()]
    assert zeroed  # timm's default did zero some
    assert all(v.any() and torch.equal(v, torch.ones_like(v)) for v in norms(theirs).values())
    a, b = timm_init.state_dict(), theirs.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k not in zeroed)  # the same draw otherwise


def test_moco_and_jigclu_recipes_use_torchvisions_init_and_the_bench_timms():
    for recipe in ("moco.yaml", "jigclu.yaml", "mochi.yaml"):
        assert load_recipe(str(ROOT / "recipes" / recipe)).model.zero_init_last is False
    assert load_recipe(str(ROOT / "recipes" / "jigclu_small.yaml")).model.zero_init_last is None
