"""In-process checks of the FSDP glue's state hooks and argument errors (no process group).

The DTensor paths run in the 2-process launch of test_fsdp.py; here the hooks act on plain
tensors, where they must leave a round trip exact and restore what DCP drops.
"""
import copy

import pytest
import torch
from torch import nn

from gmixout_optim import GMixoutOptimizer, Segment
from gmixout_optim.integrations import fsdp


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _opt(model):
    return GMixoutOptimizer(model.parameters(), p=0.5, resample_every=3, lr=1e-2, eps=1e-4, seed=3)


def _step(model, opt, s):
    g = torch.Generator().manual_seed(s)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _attached(model):
    opt = _opt(model)
    fsdp.attach(opt)
    return opt


def _assert_same_training(model, opt, twin, twin_opt, steps):
    """Train both on the same batches; the weights must stay bitwise equal."""
    for s in steps:
        _step(model, opt, s)
        _step(twin, twin_opt, s)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_hooks_keep_a_mid_episode_round_trip_exact():
    model = _model()
    opt = _attached(model)
    for s in range(1, 5):  # step 4: episode 1, step 1 of 3
        _step(model, opt, s)
    sd = copy.deepcopy(opt.state_dict())
    assert all("segments" not in e for e in sd["state"].values()), "rank-dependent segments must not be saved"
    assert "gmixout_config" in sd["param_groups"][0]
    sd.pop("gmixout")  # DCP's get_optimizer_state_dict keeps only state and param_groups
    twin = copy.deepcopy(model)
    twin_opt = _attached(twin)
    twin_opt.load_state_dict(sd)
    assert "gmixout_config" not in twin_opt.param_groups[0]
    _assert_same_training(model, opt, twin, twin_opt, range(5, 9))


def test_fresh_compact_state_is_redrawn_for_the_loaded_episode():
    """A consolidated checkpoint loaded into a fresh target (DCP with allow_partial_load keeps
    the target's own episode-0 compact state): training must follow the source exactly."""
    model = _model()
    opt = _attached(model)
    for s in range(1, 6):
        _step(model, opt, s)
    opt.consolidate()
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = _attached(twin)
    for p in twin.parameters():  # DCP's _init_optim_state: zero gradients on an empty state
        p.grad = torch.zeros_like(p)
    twin_opt.step()
    target = twin_opt.state_dict()
    assert all("support" in e for e in target["state"].values())
    for pid, entry in target["state"].items():  # what the partial load leaves: counters from the checkpoint
        entry.update(episode=saved["state"][pid]["episode"], episode_step=0)
    twin_opt.load_state_dict(target)
    _assert_same_training(model, opt, twin, twin_opt, range(6, 12))


def test_mid_episode_state_without_support_is_refused():
    model = _model()
    opt = _attached(model)
    _step(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        for key in ("support", "residual", "inner"):
            entry.pop(key, None)
    fresh = _attached(copy.deepcopy(model))
    with pytest.raises(ValueError, match="mid-episode"):
        fresh.load_state_dict(sd)


def test_locator_of_plain_tensors_is_the_default():
    model = _model()
    opt = _opt(model)
    locate = fsdp.locator(opt)
    params = list(model.parameters())
    assert locate(params[2], 0, 2) == [Segment(0, params[2].numel(), 2, 0)]


def test_attach_rejects_other_optimizers():
    with pytest.raises(TypeError, match="GMixoutOptimizer"):
        fsdp.attach(torch.optim.SGD(_model().parameters(), lr=0.1))


def test_accelerate_prepare_needs_one_gmixout_optimizer():
    from gmixout_optim.integrations.accelerate import prepare, unwrap_optimizer
    with pytest.raises(ValueError, match="exactly one GMixoutOptimizer"):
        prepare(object(), _model(), torch.optim.SGD(_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="no GMixoutOptimizer"):
        unwrap_optimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
