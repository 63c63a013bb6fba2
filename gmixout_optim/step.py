"""The step's functional core and the one resolver of its implementations.

:func:`resolve` decides, per GMixout tensor, how its step runs:

- ``"fused"``: one fused Triton kernel does the gather, the Adam/AdamW update of the residual
  and the write-back (CUDA or a forced Triton backend, inner optimizer ``Adam``/``AdamW``
  without amsgrad/maximize/capturable/differentiable);
- ``"triton"`` or ``"torch"``: per-op kernels (gather, write, anchor, merge, draw) of that
  implementation, the inner optimizer stepping the residual.

Triton runs when ``kernels.set_backend`` / ``GMIXOUT_BACKEND`` says so, or on CUDA tensors under
``"auto"`` (see docs/kernels.md). Every kernel call of the optimizer goes through
:func:`kernels_for` or :func:`resolve`, never through the per-call dispatchers.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import MutableMapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple

import torch

from .kernels import adamw as _adamw
from .kernels import gather as _gather
from .kernels import merge as _merge
from .kernels import support as _support
from .kernels import write as _write
from .kernels._dispatch import use_triton
from .sharding import flat, flat_grad, local
from .state import SUPPORT_SIZE, anchor, positions

__all__ = ["Kernels", "TORCH", "TRITON", "kernels_for", "resolve", "collect", "Work", "gather_grads", "all_finite",
           "gmixout_step", "inner_step", "initialize_inner", "clear_unstepped"]


class Kernels(NamedTuple):
    """One implementation of every per-tensor op (same signatures as ``kernels``' dispatchers)."""

    draw_support: Callable
    gather_grad: Callable
    support_anchor: Callable
    write_weights: Callable
    merge_episode: Callable
    fused_adamw_step: Callable


TORCH = Kernels(_support.draw_support_torch, _gather.gather_grad_torch, _write.support_anchor_torch,
                _write.write_weights_torch, _merge.merge_episode_torch, _adamw.fused_adamw_step_torch)
TRITON = Kernels(_support.draw_support_triton, _gather.gather_grad_triton, _write.support_anchor_triton,
                 _write.write_weights_triton, _merge.merge_episode_triton, _adamw.fused_adamw_step_triton)

_NOT_FUSABLE = ("amsgrad", "maximize", "capturable", "differentiable")


def kernels_for(t: torch.Tensor | torch.device) -> Kernels:
    """The implementation for tensors on ``t``'s device under the current kernel backend."""
    return TRITON if use_triton(t) else TORCH


def resolve(w: torch.Tensor, group: dict, inner: torch.optim.Optimizer) -> tuple[str, Kernels]:
    """``("fused" | "triton" | "torch", kernels)`` for GMixout tensor ``w`` of ``group``."""
    kernels = kernels_for(local(w))
    if kernels is TRITON:
        adam = type(inner) in (torch.optim.Adam, torch.optim.AdamW)
        if adam and not any(group.get(k) for k in _NOT_FUSABLE):
            return "fused", kernels
        return "triton", kernels
    return "torch", kernels


def collect(param_groups: list[dict]) -> tuple[list, list]:
    """``(sparse, dense)``: ``(w, group, group index, index)`` of each GMixout tensor with a
    gradient, and the other parameters with one."""
    sparse, dense = [], []
    for gi, group in enumerate(param_groups):
        for i, w in enumerate(group["params"]):
            if w.grad is None:
                continue
            if w.grad.is_sparse:
                raise TypeError(f"GMixoutOptimizer does not support sparse gradients "
                                f"(param group {gi}, parameter {i}, layout {w.grad.layout})")
            if group["gmixout"]:
                sparse.append((w, group, gi, i))
            else:
                dense.append(w)
    return sparse, dense


class Work(NamedTuple):
    """One GMixout tensor with a gradient this step."""

    w: torch.Tensor
    st: dict
    group: dict
    impl: str
    kernels: Kernels


def _keep(group: dict) -> float:
    return 1.0 - group["p"]


def gather_grads(unfused: list[Work]) -> None:
    """``residual.grad = grad[S] / keep`` for the tensors the inner optimizer steps."""
    for item in unfused:
        residual = item.st["residual"]
        residual.grad = torch.empty_like(residual)
        item.kernels.gather_grad(flat_grad(item.w), positions(item.w, item.st), item.st[SUPPORT_SIZE],
                                 _keep(item.group), residual.grad)


def all_finite(unfused: list[Work], fused: list[Work], dense: list[torch.Tensor]) -> bool:
    """Whether every gradient the step uses (support gradients, dense gradients) is finite."""
    grads = [item.st["residual"].grad for item in unfused]
    grads += [flat_grad(item.w)[positions(item.w, item.st)[: item.st[SUPPORT_SIZE]].long()] for item in fused]
    grads += [local(w.grad) for w in dense]
    grads = [g for g in grads if g.numel()]  # the inf-norm of an empty tensor is undefined
    if not grads:
        return True
    # max |g| per tensor is inf or nan iff the tensor holds one: one foreach op, one sync per device.
    by_device: dict[torch.device, list] = defaultdict(list)
    for norm in torch._foreach_norm(grads, float("inf")):
        by_device[norm.device].append(norm.float())
    return all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in by_device.values())


def _support_anchor(item: Work) -> torch.Tensor:
    return anchor(item.w, item.st, _keep(item.group), item.kernels.support_anchor)[: item.st[SUPPORT_SIZE]]


class ResidualGroup(MutableMapping):
    """A param group as the inner optimizer sees it during a step: ``params`` are residuals,
    every other key reads and writes the user's group (so scheduler / engine edits of lr,
    betas, ... apply, and what the inner optimizer writes persists)."""

    def __init__(self, group: dict, residuals: list[torch.Tensor]) -> None:
        self.group, self.residuals = group, residuals

    def __getitem__(self, key: str) -> Any:
        return self.residuals if key == "params" else self.group[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "params":
            raise KeyError("the residual view's params are the optimizer's to choose")
        self.group[key] = value

    def __delitem__(self, key: str) -> None:
        del self.group[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.group)

    def __len__(self) -> int:
        return len(self.group)


@contextmanager
def _inner_sees(inner: torch.optim.Optimizer, views: list) -> Iterator[None]:
    # The inner optimizer's own list is the user's param_groups (shared): show it the views for
    # the length of one call; the user's group dicts are never modified.
    groups = inner.param_groups
    inner.param_groups = views
    try:
        yield
    finally:
        inner.param_groups = groups


def inner_step(inner: torch.optim.Optimizer, state: dict, skip: set = frozenset()) -> None:
    """Step the inner optimizer on the residuals (GMixout groups) and the dense parameters."""
    views = []
    for group in inner.param_groups:
        if group["gmixout"]:
            residuals = [state[w]["residual"] for w in group["params"]
                         if w not in skip and "residual" in state.get(w, {})]
            views.append(ResidualGroup(group, residuals))
        else:
            views.append(group)
    with _inner_sees(inner, views):
        inner.step()


def adam_state(state: dict, residual: torch.Tensor) -> dict:
    """The inner (torch AdamW layout) state of a fused residual, created at its first step."""
    inner_state = state[residual]
    if not inner_state:
        inner_state["step"] = torch.tensor(0.0)
        inner_state["exp_avg"] = torch.zeros_like(residual)
        inner_state["exp_avg_sq"] = torch.zeros_like(residual)
    return inner_state


def adam_hyperparameters(group: dict, inner: torch.optim.Optimizer) -> dict:
    """The fused kernels' Adam/AdamW keywords of ``group`` (all but ``step`` and ``lr``)."""
    beta1, beta2 = group["betas"]
    decoupled = isinstance(inner, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    return dict(beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), decoupled=bool(decoupled))


def _fused_adamw(item: Work, state: dict, inner: torch.optim.Optimizer) -> None:
    st, group = item.st, item.group
    residual = st["residual"]
    inner_state = adam_state(state, residual)
    inner_state["step"] += 1
    item.kernels.fused_adamw_step(
        flat(local(item.w)), flat_grad(item.w), positions(item.w, st), st[SUPPORT_SIZE], residual,
        inner_state["exp_avg"], inner_state["exp_avg_sq"],
        anchor(item.w, st, _keep(group), item.kernels.support_anchor),
        step=int(inner_state["step"].item()), lr=float(group["lr"]), keep=_keep(group),
        **adam_hyperparameters(group, inner))


def gmixout_step(inner: torch.optim.Optimizer, state: dict, unfused: list[Work], fused: list[Work],
                 dense: list[torch.Tensor]) -> None:
    """One decided step: the inner optimizer updates the unfused residuals (their gradients
    gathered) and the dense parameters, ``W = A + v/keep`` is written on their supports, and the
    fused kernel steps the rest."""
    anchors = [_support_anchor(item) for item in unfused]  # A[S] before v changes
    if unfused or dense:
        inner_step(inner, state, skip={item.w for item in fused})
    for item, values in zip(unfused, anchors):
        st = item.st
        item.kernels.write_weights(flat(local(item.w)), positions(item.w, st), st[SUPPORT_SIZE], values,
                                   st["residual"], _keep(item.group))
        st["residual"].grad = None
    for item in fused:
        _fused_adamw(item, state, inner)


def initialize_inner(inner: torch.optim.Optimizer, state: dict, work: list[Work],
                     dense: list[torch.Tensor], unstepped: set) -> None:
    """Lay out the inner state without changing a weight or counting a step.

    Engines probe an optimizer with an all-zero-gradient step (DeepSpeed ZeRO-3 at init, DCP's
    ``_init_optim_state``) to lay out its state, which DCP then loads into in place. The inner
    optimizer steps with lr 0 and zero residual gradients, so every entry exists; dense weights
    are restored and step counters zeroed. What else that update wrote is not a first step's
    state (Rprop's step sizes and ASGD's eta start from the lr, 0 here; NAdam's mu_product;
    Adam's coupled weight decay in the moments; SGD's momentum buffer with dampening), so the
    entries are added to ``unstepped``: the next real step that reaches them clears them first
    (:func:`clear_unstepped`) and the inner optimizer creates them as in a fresh run.
    """
    for item in work:
        residual = item.st["residual"]
        residual.grad = torch.zeros_like(residual)
    saved_weights = [w.detach().clone() for w in dense]
    saved_lrs = []
    for group in inner.param_groups:
        saved_lrs.append(group.get("lr"))
        if "lr" in group:
            group["lr"] = torch.zeros_like(group["lr"]) if torch.is_tensor(group["lr"]) else 0.0
    try:
        inner_step(inner, state)
    finally:
        for group, lr in zip(inner.param_groups, saved_lrs):
            if lr is not None:
                group["lr"] = lr
        for item in work:
            item.st["residual"].grad = None
    for w, saved in zip(dense, saved_weights):
        w.copy_(saved)
    for item in work:
        item.st["residual"].zero_()  # v = 0 at an episode start, whatever the update did
    for t in [item.st["residual"] for item in work] + list(dense):
        inner_state = state.get(t, {})
        step = inner_state.get("step")
        if torch.is_tensor(step):
            step.zero_()
        elif step is not None:
            inner_state["step"] = 0
        unstepped.add(t)


def clear_unstepped(state: dict, unstepped: set, tensors: list[torch.Tensor]) -> None:
    """Drop the probe's layout of the inner state of ``tensors`` (see :func:`initialize_inner`)
    before their first real step."""
    for t in tensors:
        if t in unstepped:
            unstepped.discard(t)
            state.pop(t, None)
