"""The per-tensor state of a GMixout tensor: the one place where its buffers are born.

``opt.state[w]`` for a GMixout tensor ``w`` holds

- ``episode``, ``episode_step``: the counters (always, once ``w`` has had a gradient);
- ``segments``: where ``w``'s local elements sit in the logical model (see ``set_locator``);
- inside an episode, the compact buffers (:data:`COMPACT_KEYS`), all of length ``capacity``:
  ``support`` (sorted local row-major indices, -1 padded), ``residual`` (fp32), ``anchor``
  (:math:`A[S]`, stored exactly, in the dtype ``w`` had when the episode started; a checkpoint
  of format 2 or older lacks it for fp32/fp64 tensors, see :func:`anchor`), and
  ``support_size``, the number of used slots ``n`` (an int, derived from ``support`` on load,
  never saved); for a weight not in row-major memory order (channels_last, transposed)
  ``support_positions``, where the support sits in memory (derived, never saved).
- with ``capture_grads``: ``grad``, the compact gradient buffer (fp32, length ``capacity``,
  never saved; what its slots hold: :mod:`gmixout_optim.capture`), and ``grad_status``.

The inner optimizer's state of the residual is ``opt.state[st["residual"]]``; its entries
that are 1-D of length ``capacity`` follow the support (:func:`per_element_keys`).
"""
from __future__ import annotations

from typing import Any

import torch

from .kernels import support_capacity
from .sharding import flat, local, memory_positions

__all__ = ["COMPACT_KEYS", "SUPPORT_SIZE", "GRAD", "capacity", "per_element_keys", "ensure_buffers",
           "ensure_grad_buffer", "drop_compact", "positions", "anchor"]

# A GMixout tensor's per-episode buffers; consolidate()/finalize() drop them.
COMPACT_KEYS = ("support", "residual", "anchor")
SUPPORT_SIZE = "support_size"
POSITIONS = "support_positions"
# The captured gradient (capture_grads) and its status: transient, like param.grad, never saved.
GRAD, GRAD_STATUS = "grad", "grad_status"


def capacity(numel: int, keep: float) -> int:
    """The fixed support buffer length of a local tensor of ``numel`` elements."""
    return support_capacity(numel, keep)


def per_element_keys(inner_state: dict, length: int) -> list[str]:
    """The inner-state entries that hold one value per support slot (they follow the support)."""
    return [k for k, v in inner_state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() == length]


def ensure_buffers(state: dict, w: torch.Tensor, st: dict, length: int) -> None:
    """Give ``st`` a residual and an anchor of ``length`` slots (the anchor in ``w``'s dtype).

    A residual of another length is replaced; the inner state keyed by the old one moves to
    the new one, its per-slot entries copied into the first slots (the support redrawn next
    decides what they mean, see the state policy). An anchor of another length or dtype
    (``w`` became bf16 mid-run: ``model.to``, an fp32 checkpoint) is replaced.
    """
    old = st.get("residual")
    if old is None or old.numel() != length:
        residual = torch.zeros(length, dtype=torch.float32, device=w.device)
        if old is not None:
            inner_state = state.pop(old, {})
            for key in per_element_keys(inner_state, old.numel()):
                grown = inner_state[key].new_zeros(length)
                m = min(length, old.numel())
                grown[:m] = inner_state[key][:m]
                inner_state[key] = grown
            if inner_state:
                state[residual] = inner_state
        st["residual"] = residual
    kept = st.get("anchor")
    if kept is None or kept.numel() != length or kept.dtype != w.dtype:
        st["anchor"] = torch.zeros(length, dtype=w.dtype, device=w.device)


def ensure_grad_buffer(w: torch.Tensor, st: dict) -> torch.Tensor:
    """The compact gradient buffer of a captured tensor (``capture_grads``): fp32, as long as
    the residual (it becomes the residual's gradient at the step: no second buffer)."""
    length = st["residual"].numel()
    buf = st.get(GRAD)
    if buf is None or buf.numel() != length:
        buf = st[GRAD] = torch.zeros(length, dtype=torch.float32, device=st["residual"].device)
    return buf


def drop_compact(state: dict, st: dict) -> None:
    """Forget the episode's buffers and the inner state of its residual (counters stay)."""
    if "residual" in st:
        state.pop(st["residual"], None)
    for key in COMPACT_KEYS + (SUPPORT_SIZE, POSITIONS, GRAD, GRAD_STATUS):
        st.pop(key, None)


def positions(w: torch.Tensor, st: dict) -> torch.Tensor:
    """Where the support sits in ``sharding.flat(local(w))``, the index the kernels take: the
    support itself for a row-major tensor, else its memory positions (-1 padded like it,
    derived once per episode and kept as ``support_positions``)."""
    shard = local(w)
    if shard.is_contiguous():
        return st["support"]
    if POSITIONS not in st:
        n = st[SUPPORT_SIZE]
        pos = torch.full(st["support"].shape, -1, dtype=torch.int64, device=st["support"].device)
        pos[:n] = memory_positions(shard, st["support"][:n])
        st[POSITIONS] = pos
    return st[POSITIONS]


def anchor(w: torch.Tensor, st: dict, keep: float, support_anchor) -> torch.Tensor:
    """The stored anchor ``A[S]`` (all slots). A checkpoint of format 2 or older has none for
    fp32/fp64 tensors: it is derived here, once, at its first use after the load, as
    ``w[S] - v/keep`` (not at load: optimizer state is often loaded before the weights), and
    kept exactly from then on. ``support_anchor`` is the kernel that derives it."""
    if "anchor" not in st:
        n = st[SUPPORT_SIZE]
        values = torch.zeros(st["residual"].numel(), dtype=w.dtype, device=w.device)
        values[:n] = support_anchor(flat(local(w)), positions(w, st), n, st["residual"], keep)
        st["anchor"] = values
    return st["anchor"]


def load_compact(w: torch.Tensor, st: dict, saved: dict[str, Any], keep: float) -> None:
    """Install saved compact buffers into ``st`` (copies next to ``w``), checking they fit ``w``."""
    support = saved["support"]
    if support.is_floating_point():
        raise ValueError(f"state_dict holds support indices of dtype {support.dtype}; "
                         "they must be integers (was it cast by a generic loader?)")
    n_saved = int((support >= 0).sum())
    numel = local(w).numel()
    length = capacity(numel, keep)
    fits = support.numel() == length or support.numel() == n_saved > length
    if not fits or (n_saved and int(support[:n_saved].max()) >= numel):
        raise ValueError(
            f"state_dict holds a support of {support.numel()} slots ({n_saved} used) for a tensor of "
            f"{numel} elements, whose capacity is {length}: was it saved from another model?")
    st["support"] = support.to(device=w.device, copy=True)
    st[SUPPORT_SIZE] = n_saved
    st["residual"] = saved["residual"].to(device=w.device, dtype=torch.float32, copy=True)
    if "anchor" in saved:  # in its saved dtype: exact until the next episode start re-makes it
        st["anchor"] = saved["anchor"].to(device=w.device, copy=True)
