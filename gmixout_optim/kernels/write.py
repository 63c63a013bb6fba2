"""Read the anchor on the support and write the training weights there.

- ``support_anchor``: ``a = w[S] - v[:n] / keep`` (fp32; fp64 for fp64 weights). Only for
  fp32/fp64 weights, whose anchor is not stored: ``w[S] = a + v/keep`` was written last step.
- ``write_weights``: ``w[S] = (a + v[:n] / keep)`` cast to ``w``'s dtype, with ``a`` the
  stored anchor (weight dtype) or ``support_anchor``'s result. Elements outside ``S`` are
  left untouched (they hold the anchor already).
"""
from __future__ import annotations

import torch

from ._common import cast_to, compute_dtype, grid, launch, scatter_, tl_dtype, tl_type
from ._dispatch import HAS_TRITON, check_flat, check_n, check_vec, note, tl, triton, use_triton
from ._table import TensorGroup


def _check(param_flat, support, n, residual):
    """Checks shared by the ops that read or write ``w[S]`` from ``v[:n]`` (here and merge)."""
    check_flat("param_flat", param_flat)
    n = check_n(n, support)
    check_vec("residual", residual, n)
    return n


def support_anchor_torch(param_flat, support, n, residual, keep):
    """PyTorch reference of ``support_anchor``."""
    n = _check(param_flat, support, n, residual)
    return param_flat.index_select(0, support[:n]) - residual[:n] / keep


def write_weights_torch(param_flat, support, n, anchor_values, residual, keep):
    """PyTorch reference of ``write_weights``."""
    n = _check(param_flat, support, n, residual)
    check_vec("anchor_values", anchor_values, n)
    val = anchor_values[:n] + residual[:n] / keep
    scatter_(param_flat, support[:n], val)


if HAS_TRITON:

    @triton.jit
    def anchor_block(param, support, residual, out, i, m, keep, CDT: tl.constexpr):
        idx = tl.load(support + i, mask=m, other=0)
        w = tl.load(param + idx, mask=m, other=0.0).to(CDT)
        v = tl.load(residual + i, mask=m, other=0.0)
        tl.store(out + i, w - tl.math.div_rn(v, keep).to(CDT), mask=m)

    @triton.jit
    def write_block(param, support, anchor, residual, i, m, keep, CDT: tl.constexpr):
        idx = tl.load(support + i, mask=m, other=0)
        a = tl.load(anchor + i, mask=m, other=0.0).to(CDT)
        v = tl.load(residual + i, mask=m, other=0.0)
        val = a + tl.math.div_rn(v, keep).to(CDT)
        tl.store(param + idx, cast_to(val, param.dtype.element_ty), mask=m)

    @triton.jit
    def _anchor_kernel(param, support, residual, out, n, keep, CDT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        anchor_block(param, support, residual, out, i, i < n, keep, CDT)

    @triton.jit
    def _write_kernel(param, support, anchor, residual, n, keep, CDT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        write_block(param, support, anchor, residual, i, i < n, keep, CDT)

    @triton.jit
    def _anchor_grouped_kernel(blk_tensor, blk_start, params, supports, residuals, outs, ns, keeps,
                               WDT: tl.constexpr, SDT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(blk_tensor + b)
        i = tl.load(blk_start + b) + tl.arange(0, BLOCK)
        anchor_block(tl.load(params + t).to(tl.pointer_type(WDT)), tl.load(supports + t).to(tl.pointer_type(SDT)),
                     tl.load(residuals + t).to(tl.pointer_type(tl.float32)),
                     tl.load(outs + t).to(tl.pointer_type(CDT)), i, i < tl.load(ns + t), tl.load(keeps + t), CDT)

    @triton.jit
    def _read_anchor_grouped_kernel(blk_tensor, blk_start, params, supports, anchors, ns, caps,
                                    WDT: tl.constexpr, SDT: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(blk_tensor + b)
        i = tl.load(blk_start + b) + tl.arange(0, BLOCK)
        m = i < tl.load(ns + t)
        idx = tl.load(tl.load(supports + t).to(tl.pointer_type(SDT)) + i, mask=m, other=0)
        w = tl.load(tl.load(params + t).to(tl.pointer_type(WDT)) + idx, mask=m, other=0.0)
        tl.store(tl.load(anchors + t).to(tl.pointer_type(WDT)) + i, tl.where(m, w, 0.0), mask=i < tl.load(caps + t))

    @triton.jit
    def _write_grouped_kernel(blk_tensor, blk_start, params, supports, anchors, residuals, ns, keeps,
                              WDT: tl.constexpr, ADT: tl.constexpr, SDT: tl.constexpr, CDT: tl.constexpr,
                              BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(blk_tensor + b)
        i = tl.load(blk_start + b) + tl.arange(0, BLOCK)
        write_block(tl.load(params + t).to(tl.pointer_type(WDT)), tl.load(supports + t).to(tl.pointer_type(SDT)),
                    tl.load(anchors + t).to(tl.pointer_type(ADT)), tl.load(residuals + t).to(tl.pointer_type(tl.float32)),
                    i, i < tl.load(ns + t), tl.load(keeps + t), CDT)


def support_anchor_triton(param_flat, support, n, residual, keep):
    """Triton kernel of ``support_anchor``."""
    n = _check(param_flat, support, n, residual)
    cdt = compute_dtype(param_flat.dtype)
    out = torch.empty(n, dtype=cdt, device=param_flat.device)
    if n:
        block, warps = launch("anchor")
        note("launch", "anchor")
        _anchor_kernel[grid(n, block)](param_flat, support, residual, out, n, float(keep),
                                       CDT=tl_dtype(cdt), BLOCK=block, num_warps=warps)
    return out


def write_weights_triton(param_flat, support, n, anchor_values, residual, keep):
    """Triton kernel of ``write_weights``."""
    n = _check(param_flat, support, n, residual)
    check_vec("anchor_values", anchor_values, n)
    if n:
        cdt = compute_dtype(anchor_values.dtype)
        block, warps = launch("write")
        note("launch", "write")
        _write_kernel[grid(n, block)](param_flat, support, anchor_values, residual, n, float(keep),
                                      CDT=tl_dtype(cdt), BLOCK=block, num_warps=warps)


def support_anchor(param_flat, support, n, residual, keep):
    """Dispatching ``w[S] - v[:n]/keep`` (CUDA -> Triton, else PyTorch)."""
    if use_triton(param_flat):
        return support_anchor_triton(param_flat, support, n, residual, keep)
    return support_anchor_torch(param_flat, support, n, residual, keep)


def write_weights(param_flat, support, n, anchor_values, residual, keep):
    """Dispatching ``w[S] = a + v[:n]/keep`` (CUDA -> Triton, else PyTorch)."""
    if use_triton(param_flat):
        return write_weights_triton(param_flat, support, n, anchor_values, residual, keep)
    return write_weights_torch(param_flat, support, n, anchor_values, residual, keep)


def support_anchor_grouped_torch(group: TensorGroup, residuals, outs):
    """Reference of the grouped ``support_anchor``: per tensor, into ``outs[t][:n_t]``."""
    for t, n in enumerate(group.sizes()):
        outs[t][:n] = support_anchor_torch(group.params[t], group.supports[t], n, residuals[t], group.keeps[t])
    return outs


def support_anchor_grouped_triton(group: TensorGroup, residuals, outs):
    """``outs[t][:n_t] = w_t[S_t] - v_t / keep_t`` for every tensor in one launch."""
    cdt = compute_dtype(group.dtype)
    caps = lambda t: group.capacities[t]  # noqa: E731
    res_tab = group.table(residuals, "residuals", caps, torch.float32)
    out_tab = group.table(outs, "outs", caps, cdt)
    if group.blocks.num_blocks:
        note("launch", "anchor")
        _anchor_grouped_kernel[(group.blocks.num_blocks,)](
            group.blocks.tensor, group.blocks.start, group.param_ptr, group.support_ptr, res_tab, out_tab, group.n,
            group.keep, WDT=tl_type(group.dtype), SDT=tl_type(group.index_dtype), CDT=tl_dtype(cdt),
            BLOCK=group.blocks.block, num_warps=launch("anchor")[1])
    return outs


def write_weights_grouped_torch(group: TensorGroup, anchors, residuals):
    """Reference of the grouped ``write_weights``."""
    for t, n in enumerate(group.sizes()):
        write_weights_torch(group.params[t], group.supports[t], n, anchors[t], residuals[t], group.keeps[t])


def write_weights_grouped_triton(group: TensorGroup, anchors, residuals):
    """``w_t[S_t] = a_t + v_t / keep_t`` for every tensor in one launch."""
    caps = lambda t: group.capacities[t]  # noqa: E731
    anc_tab = group.table(anchors, "anchors", caps, anchors[0].dtype)
    res_tab = group.table(residuals, "residuals", caps, torch.float32)
    if group.blocks.num_blocks:
        note("launch", "write")
        _write_grouped_kernel[(group.blocks.num_blocks,)](
            group.blocks.tensor, group.blocks.start, group.param_ptr, group.support_ptr, anc_tab, res_tab, group.n,
            group.keep, WDT=tl_type(group.dtype), ADT=tl_type(anchors[0].dtype), SDT=tl_type(group.index_dtype),
            CDT=tl_dtype(compute_dtype(anchors[0].dtype)), BLOCK=group.blocks.block, num_warps=launch("write")[1])


def support_anchor_grouped(group: TensorGroup, residuals, outs):
    """Dispatching grouped ``support_anchor`` (``outs[t]``: fp32, or fp64 for fp64 weights)."""
    if use_triton(group.device):
        return support_anchor_grouped_triton(group, residuals, outs)
    return support_anchor_grouped_torch(group, residuals, outs)


def write_weights_grouped(group: TensorGroup, anchors, residuals):
    """Dispatching grouped ``write_weights``."""
    if use_triton(group.device):
        return write_weights_grouped_triton(group, anchors, residuals)
    return write_weights_grouped_torch(group, anchors, residuals)


def read_anchor_grouped_torch(group: TensorGroup, anchors):
    """Reference of :func:`read_anchor_grouped`."""
    for t, n in enumerate(group.sizes()):
        anchors[t].zero_()
        anchors[t][:n] = group.params[t].index_select(0, group.supports[t][:n])
    return anchors


def read_anchor_grouped_triton(group: TensorGroup, anchors):
    """``anchors[t][:n_t] = w_t[S_t]`` (weight dtype, exact), 0 up to the capacity, in one launch."""
    anc_tab = group.table(anchors, "anchors", lambda t: group.capacities[t], group.dtype)
    if group.blocks.num_blocks:
        note("launch", "read_anchor")
        _read_anchor_grouped_kernel[(group.blocks.num_blocks,)](
            group.blocks.tensor, group.blocks.start, group.param_ptr, group.support_ptr, anc_tab, group.n,
            group.blocks.capacity, WDT=tl_type(group.dtype), SDT=tl_type(group.index_dtype),
            BLOCK=group.blocks.block, num_warps=launch("write")[1])
    return anchors


def read_anchor_grouped(group: TensorGroup, anchors):
    """The stored anchor of 16-bit weights after a redraw: ``anchor[:n] = w[S]`` (``w`` equals the
    anchor everywhere after the merge), for every tensor in one launch."""
    if use_triton(group.device):
        return read_anchor_grouped_triton(group, anchors)
    return read_anchor_grouped_torch(group, anchors)
