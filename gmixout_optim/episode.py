"""Episodes of one GMixout tensor: draw a support, carry the inner state across it, merge.

The math is in ``GMixoutOptimizer``'s docstring; these functions act on one tensor's
per-tensor state ``st`` (see :mod:`gmixout_optim.state`) and the shared state mapping;
:func:`open_episode` and :func:`start_episode` are the optimizer's entry (they locate the tensor).
"""
from __future__ import annotations

import warnings

import torch

from .sharding import check_layout, flat, local
from .state import (POSITIONS, SUPPORT_SIZE, anchor, capacity, drop_compact, ensure_buffers, per_element_keys,
                    positions)
from .step import kernels_for

__all__ = ["open_episode", "start_episode", "start", "remap_inner_state", "merge_coefficient", "merge", "close"]


def open_episode(opt, w: torch.Tensor, group: dict, gi: int, i: int) -> dict:
    """``w``'s state with its counters and running episode (support drawn) in place."""
    st = opt._state[w]
    if "episode" not in st:
        st.update(episode=0, episode_step=0)
    if "support" not in st:
        start_episode(opt, w, st, group, gi, i)
    return st


def start_episode(opt, w: torch.Tensor, st: dict, group: dict, gi: int, i: int) -> None:
    """:func:`start` for parameter ``i`` of param group ``gi`` of ``opt``, located first."""
    check_layout(w, gi, i)  # again: a weight may be swapped after construction (w.data = ...)
    if "segments" not in st:
        st["segments"] = opt.locate(w, gi, i)
    start(opt._state, w, st, group, opt._seed, opt._state_policy)


def start(state: dict, w: torch.Tensor, st: dict, group: dict, seed: int, policy: str) -> None:
    """Draw the support of episode ``st['episode']``; zero the residual; apply the state policy.

    ``st['segments']`` must be set (the optimizer locates the tensor first).
    """
    shard = local(w)
    keep = 1.0 - group["p"]
    kernels = kernels_for(shard)
    length = capacity(shard.numel(), keep)
    support, n = kernels.draw_support(st["segments"], seed, st["episode"], keep, length, w.device)
    if n > length:  # ~1e-9 per draw: grow rather than fail, and say so
        warnings.warn(f"support of {n} elements exceeds the buffer capacity {length}: "
                      "buffers grow (their shapes now differ from a fresh optimizer's)", RuntimeWarning)
        length = n
        support, n = kernels.draw_support(st["segments"], seed, st["episode"], keep, length, w.device)
    old_support, old_n = st.get("support"), st.get(SUPPORT_SIZE)
    ensure_buffers(state, w, st, length)
    residual = st["residual"]
    inner_state = state.get(residual)
    if inner_state:
        remap_inner_state(inner_state, residual.numel(), policy, old_support, old_n, support, n)
    st["support"] = support
    st[SUPPORT_SIZE] = n
    st.pop(POSITIONS, None)
    residual.zero_()
    # W = A at an episode start: A[S] is stored exactly, never re-derived from rounded sums.
    st["anchor"].zero_()
    st["anchor"][:n] = flat(shard)[positions(w, st)[:n].long()]


def remap_inner_state(inner_state: dict, length: int, policy: str, old_support, old_n, support, n) -> None:
    """Carry the inner state of the residual across a redraw (see ``state_policy``)."""
    if policy == "reset" or old_support is None:
        inner_state.clear()
        return
    per_element = per_element_keys(inner_state, length)
    if policy == "carry":
        for k in per_element:
            inner_state[k][n:] = 0
        return
    # remap: state follows the coordinates present in both supports.
    old = old_support[:old_n].long()
    new = support[:n].long()
    pos = torch.searchsorted(old, new).clamp_(max=max(old_n - 1, 0))
    found = old[pos] == new if old_n else torch.zeros_like(new, dtype=torch.bool)
    for k in per_element:
        value = inner_state[k]
        carried = torch.where(found, value[pos], torch.zeros((), dtype=value.dtype, device=value.device))
        value.zero_()
        value[:n] = carried


def merge_coefficient(group: dict, rule: str) -> float:
    """The factor of ``v`` added to ``A[S]`` at the end of an episode (``merge`` rule)."""
    lam, keep = group["ema_decay"], 1.0 - group["p"]
    return (1.0 - lam) / keep if rule == "ema" else (1.0 - lam)


def merge(w: torch.Tensor, st: dict, group: dict, coeff: float) -> None:
    """``A[S] += coeff * v`` and ``W = A`` on the support (``coeff`` 0: just ``W = A``)."""
    shard = local(w)
    kernels = kernels_for(shard)
    keep = 1.0 - group["p"]
    kernels.merge_episode(flat(shard), positions(w, st), st[SUPPORT_SIZE], st["residual"],
                          anchor(w, st, keep, kernels.support_anchor), keep, coeff)


def close(state: dict, w: torch.Tensor, st: dict, group: dict, coeff: float) -> None:
    """End the running episode now (merge with ``coeff``), drop its buffers, count it."""
    merge(w, st, group, coeff)
    drop_compact(state, st)
    st["episode"] += 1
    st["episode_step"] = 0
