"""Carry the inner optimizer's per-slot state across a redraw (``state_policy="remap"``).

Slot ``i`` of the new support ``new[:n_new]`` takes the value of the old slot holding the same
element, or 0 if the element was not in the old support ``old[:n_old]``; slots ``>= n_new``
become 0. Both supports are sorted, so this is a merge of two sorted index lists.

- ``remap_state_torch``: one tensor, ``torch.searchsorted`` (the optimizer's own rule).
- ``remap_state_grouped``: every tensor in one launch. A program takes ``BLOCK`` new slots of
  one tensor, brackets the run of old slots that can match them with two scalar searches
  (the lower bounds of its first and last new element), then each slot finds its element by
  a binary search of that run only: about ``log2(BLOCK)`` steps, all in one cached stretch of
  the old support, instead of ``log2(n_old)`` steps over all of it. The state moves from
  ``src`` buffers to distinct ``dst`` buffers (in place, a slot could read a value another
  program already overwrote).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import launch
from ._dispatch import HAS_TRITON, note, tl, triton, use_triton
from ._table import SlotBlocks, pointers, upload


def remap_state_torch(old_support, old_n, new_support, new_n, values: Sequence[torch.Tensor],
                      out: Sequence[torch.Tensor] | None = None):
    """Reference for one tensor: ``out[k][:new_n] = values[k][pos]`` where found, else 0
    (``out`` defaults to ``values``, updated in place)."""
    # an overflowed draw reports n > capacity and stores the first capacity elements
    old_n, new_n = min(int(old_n), old_support.numel()), min(int(new_n), new_support.numel())
    old = old_support[:old_n].long()
    new = new_support[:new_n].long()
    pos = torch.searchsorted(old, new).clamp_(max=max(old_n - 1, 0))
    found = old[pos] == new if old_n else torch.zeros_like(new, dtype=torch.bool)
    out = values if out is None else out
    for value, dst in zip(values, out):
        carried = torch.where(found, value[pos], torch.zeros((), dtype=value.dtype, device=value.device))
        dst.zero_()
        dst[:new_n] = carried


class RemapPlan:
    """Tables of a grouped remap: the tensors' capacities (old and new supports share one flat
    layout, tensor ``t`` at ``offsets[t]``) and ``K`` state buffers per tensor."""

    def __init__(self, capacities: Sequence[int], device, block: int | None = None):
        self.device = torch.device(device)
        self.capacities = [int(c) for c in capacities]
        self.offsets = [0]
        for c in self.capacities:
            self.offsets.append(self.offsets[-1] + c)
        self.blocks = SlotBlocks(self.capacities, block or launch("remap")[0], self.device)
        self.offset = upload(self.offsets[:-1], torch.int64, self.device)


def remap_state_grouped_torch(plan: RemapPlan, old_flat, old_n, new_flat, new_n, src, dst):
    """Reference of the grouped remap: :func:`remap_state_torch` per tensor. ``src[k][t]`` and
    ``dst[k][t]`` are state ``k`` of tensor ``t`` (fp32, ``capacity_t`` long)."""
    note("sync", "remap_state")
    old_n, new_n = old_n.tolist(), new_n.tolist()
    for t, (a, b) in enumerate(zip(plan.offsets, plan.offsets[1:])):
        remap_state_torch(old_flat[a:b], old_n[t], new_flat[a:b], new_n[t], [s[t] for s in src],
                          [d[t] for d in dst])


if HAS_TRITON:

    @triton.jit
    def _lower_bound(sup, lo, hi, x):
        """First position in ``sup[lo:hi]`` (sorted) whose value is not below ``x`` (scalars)."""
        while lo < hi:
            mid = (lo + hi) // 2
            below = tl.load(sup + mid).to(tl.int64) < x
            lo = tl.where(below, mid + 1, lo)
            hi = tl.where(below, hi, mid)
        return lo

    @triton.jit
    def _remap_kernel(blk_tensor, blk_start, caps, offs, old_ns, new_ns, old_flat, new_flat, src, dst, T,
                      K: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(blk_tensor + b)
        s0 = tl.load(blk_start + b)
        cap = tl.load(caps + t)
        off = tl.load(offs + t)
        # an overflowed draw reports n > capacity and stores the first capacity elements
        n_old = tl.minimum(tl.load(old_ns + t), cap)
        n_new = tl.minimum(tl.load(new_ns + t), cap)
        old = old_flat + off
        i = s0 + tl.arange(0, BLOCK)
        valid = i < n_new
        v = tl.load(new_flat + off + i, mask=valid, other=0).to(tl.int64)
        # the run of old slots that can hold this block's elements (empty past n_new)
        last = tl.minimum(s0 + BLOCK, n_new) - 1
        lo = n_old * 0  # int64 zeros: a loop-carried value keeps one type
        hi = n_old * 0
        if s0 < n_new:
            lo = _lower_bound(old, lo, n_old, tl.load(new_flat + off + s0).to(tl.int64))
            hi = _lower_bound(old, lo, n_old, tl.load(new_flat + off + last).to(tl.int64) + 1)
        # per slot: lower bound in [lo, hi), a vector binary search of the run
        left = tl.zeros([BLOCK], dtype=tl.int64) + lo
        right = tl.zeros([BLOCK], dtype=tl.int64) + hi
        width = hi - lo
        while width > 0:
            mid = (left + right) // 2
            go = left < right
            below = tl.load(old + mid, mask=go, other=0).to(tl.int64) < v
            left = tl.where(go & below, mid + 1, left)
            right = tl.where(go & ~below, mid, right)
            width = width // 2
        found = valid & (left < hi) & (tl.load(old + left, mask=valid & (left < hi), other=-1).to(tl.int64) == v)
        for k in tl.static_range(K):
            s = tl.load(src + k * T + t).to(tl.pointer_type(tl.float32))
            d = tl.load(dst + k * T + t).to(tl.pointer_type(tl.float32))
            val = tl.load(s + left, mask=found, other=0.0)
            tl.store(d + i, tl.where(found, val, 0.0), mask=i < cap)


def remap_state_grouped_triton(plan: RemapPlan, old_flat, old_n, new_flat, new_n, src, dst):
    """Triton grouped remap: one launch for every tensor and state buffer (see the module docstring)."""
    k = len(src)
    if k == 0 or not plan.blocks.num_blocks:
        return
    t = len(plan.capacities)
    src_tab = pointers([x for s in src for x in s], plan.device)
    dst_tab = pointers([x for d in dst for x in d], plan.device)
    warps = launch("remap")[1]
    note("launch", "remap_state")
    _remap_kernel[(plan.blocks.num_blocks,)](plan.blocks.tensor, plan.blocks.start, plan.blocks.capacity,
                                             plan.offset, old_n, new_n, old_flat, new_flat, src_tab, dst_tab, t,
                                             K=k, BLOCK=plan.blocks.block, num_warps=warps)


def remap_state_grouped(plan: RemapPlan, old_flat, old_n, new_flat, new_n, src, dst):
    """Dispatching grouped remap (CUDA -> Triton, else the PyTorch reference).

    ``old_flat``/``new_flat``: the supports before and after the redraw in ``plan``'s flat
    layout; ``old_n``/``new_n``: their sizes, int64 device tensors; ``src[k][t]``/``dst[k][t]``:
    state ``k`` (``exp_avg``, ``exp_avg_sq``, ...) of tensor ``t``, distinct fp32 buffers.
    """
    if use_triton(plan.device):
        return remap_state_grouped_triton(plan, old_flat, old_n, new_flat, new_n, src, dst)
    return remap_state_grouped_torch(plan, old_flat, old_n, new_flat, new_n, src, dst)
