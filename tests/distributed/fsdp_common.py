"""Shared pieces of the FSDP/Accelerate worker scripts: a tiny model, data, and the plain reference.

Data parallelism over ``world`` ranks is emulated in one process by back-propagating each
rank's half of the global batch separately with the loss divided by ``world``: the
accumulated gradient ``g_0/world + g_1/world`` is what DDP/FSDP compute (each rank's gradient
divided by the world size, then summed; dividing by 2 is exact in binary floating point and
a sum of two terms does not depend on the order). So the only expected difference between
the plain reference and a sharded run is the rounding of the reduction, if any.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from gmixout_optim import GMixoutOptimizer, gmixout_param_groups

IN, HIDDEN, MID, PER_RANK = 12, 24, 5, 4


def make_model(seed: int = 0) -> nn.Module:
    """Rows 24, 5 and 1: a 2-way Shard(0) splits them evenly, unevenly (3+2), and into a
    size-0 shard on rank 1 (the last layer's weight and bias)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, MID), nn.Tanh(), nn.Linear(MID, 1))


def make_opt(model: nn.Module, **overrides) -> GMixoutOptimizer:
    """GMixout on the weights, dense AdamW on the biases. ``eps=1e-4`` keeps Adam's update a
    smooth function of the gradient (|d update / d grad| <= 1/eps), so rounding differences in
    gradients cannot be amplified into sign flips of tiny coordinates."""
    kw = dict(inner="AdamW", p=0.5, ema_decay=0.3, resample_every=3, lr=1e-2, eps=1e-4, seed=7)
    kw.update(overrides)
    return GMixoutOptimizer(gmixout_param_groups(model, weight_decay=0.01), **kw)


def make_opt_flat(params) -> GMixoutOptimizer:
    """Every tensor in one GMixout group (the FSDP1 flat-parameter layout)."""
    return GMixoutOptimizer([{"params": list(params), "weight_decay": 0.01}], inner="AdamW", p=0.5,
                            ema_decay=0.3, resample_every=3, lr=1e-2, eps=1e-4, seed=7)


def global_batch(step: int, world: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(world * PER_RANK, IN, generator=g), torch.randn(world * PER_RANK, 1, generator=g)


def rank_batch(step: int, rank: int, world: int = 2):
    x, y = global_batch(step, world)
    return x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.float() - y) ** 2).mean()


def plain_step(model: nn.Module, opt, step: int, world: int = 2, shadow: nn.Module | None = None) -> None:
    """One step of the emulated ``world``-way data-parallel run (see the module docstring).

    ``shadow``: a bf16 copy of the model; forward/backward run on it (as FSDP2 with
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` does), each half's bf16
    gradient is cast to fp32 and divided by ``world`` before the sum.
    """
    for h in range(world):
        x, y = rank_batch(step, h, world)
        if shadow is None:
            (loss_fn(model(x), y) / world).backward()
            continue
        with torch.no_grad():
            for s, p in zip(shadow.parameters(), model.parameters()):
                s.copy_(p)
                s.grad = None
        loss_fn(shadow(x.to(torch.bfloat16)), y).backward()
        with torch.no_grad():
            for s, p in zip(shadow.parameters(), model.parameters()):
                g = s.grad.float() / world
                p.grad = g if p.grad is None else p.grad + g
    opt.step()
    opt.zero_grad(set_to_none=True)


def bf16_shadow(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16)


def flat_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 copies of the parameters; a collective for DTensors: call on all ranks."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().float().clone()
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)


def assert_same_support(a: dict, b: dict, start: dict, what: str) -> None:
    """Exactly the same elements moved away from ``start`` in both runs (the union of the
    supports drawn so far): a wrong global offset or key would move other elements."""
    for k in a:
        ma, mb = a[k] != start[k], b[k] != start[k]
        if not torch.equal(ma, mb):
            raise AssertionError(f"{what}: {k}: elements changed differ "
                                 f"({int((ma ^ mb).sum())} of {ma.numel()})")


def assert_close(a: dict, b: dict, atol: float, what: str) -> float:
    d = max_diff(a, b)
    if not d <= atol:
        raise AssertionError(f"{what}: max |diff| {d:.3e} > {atol:.1e}")
    return d
