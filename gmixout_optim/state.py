"""The per-tensor state of a GMixout tensor: the one place where its buffers are born.

``opt.state[w]`` for a GMixout tensor ``w`` holds

- ``episode``, ``episode_step``: the counters (always, once ``w`` has had a gradient);
- ``segments``: where ``w``'s local elements sit in the logical model (see ``set_locator``);
- inside an episode, the compact buffers (:data:`COMPACT_KEYS`), all of length ``capacity``:
  ``support`` (sorted local indices, -1 padded), ``residual`` (fp32), ``anchor`` (16-bit
  tensors only: :math:`A[S]` in ``w``'s dtype), and ``support_size``, the number of used
  slots ``n`` (an int, derived from ``support`` on load, never saved);
- with ``capture_grads``: ``grad``, the compact gradient buffer (fp32, length ``capacity``,
  never saved; what its slots hold: :mod:`gmixout_optim.capture`), and ``grad_status``.

The inner optimizer's state of the residual is ``opt.state[st["residual"]]``; its entries
that are 1-D of length ``capacity`` follow the support (:func:`per_element_keys`).
"""
from __future__ import annotations

from typing import Any

import torch

from .kernels import support_capacity
from .sharding import local

__all__ = ["COMPACT_KEYS", "SUPPORT_SIZE", "GRAD", "capacity", "per_element_keys", "ensure_buffers",
           "ensure_grad_buffer", "drop_compact", "support_indices"]

# A GMixout tensor's per-episode buffers; consolidate()/finalize() drop them.
COMPACT_KEYS = ("support", "residual", "anchor")
SUPPORT_SIZE = "support_size"
# The captured gradient (capture_grads) and its status: transient, like param.grad, never saved.
GRAD, GRAD_STATUS = "grad", "grad_status"


def capacity(numel: int, keep: float) -> int:
    """The fixed support buffer length of a local tensor of ``numel`` elements."""
    return support_capacity(numel, keep)


def per_element_keys(inner_state: dict, length: int) -> list[str]:
    """The inner-state entries that hold one value per support slot (they follow the support)."""
    return [k for k, v in inner_state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() == length]


def ensure_buffers(state: dict, w: torch.Tensor, st: dict, length: int) -> None:
    """Give ``st`` a residual (and a 16-bit anchor) of ``length`` slots, zero.

    A residual of another length is replaced; the inner state keyed by the old one moves to
    the new one, its per-slot entries copied into the first slots (the support redrawn next
    decides what they mean, see the state policy).
    """
    old = st.get("residual")
    if old is not None and old.numel() == length:
        return
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
    if w.element_size() < 4:
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
    for key in COMPACT_KEYS + (SUPPORT_SIZE, GRAD, GRAD_STATUS):
        st.pop(key, None)


def support_indices(st: dict) -> torch.Tensor:
    """The used support slots as int64 local indices."""
    return st["support"][: st[SUPPORT_SIZE]].long()


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
    if "anchor" in saved:
        st["anchor"] = saved["anchor"].to(device=w.device, dtype=w.dtype, copy=True)
