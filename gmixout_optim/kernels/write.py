"""Read the anchor on the support and write the training weights there.

- ``support_anchor``: ``a = w[S] - v[:n] / keep`` (fp32; fp64 for fp64 weights). Only for
  fp32/fp64 weights, whose anchor is not stored: ``w[S] = a + v/keep`` was written last step.
- ``write_weights``: ``w[S] = (a + v[:n] / keep)`` cast to ``w``'s dtype, with ``a`` the
  stored anchor (weight dtype) or ``support_anchor``'s result. Elements outside ``S`` are
  left untouched (they hold the anchor already).
"""
from __future__ import annotations

import torch

from ._common import cast_to, compute_dtype, grid, launch, scatter_, tl_dtype
from ._dispatch import HAS_TRITON, check_flat, check_n, check_vec, tl, triton, use_triton


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
    def _anchor_kernel(param, support, residual, out, n, keep, CDT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        idx = tl.load(support + i, mask=m, other=0)
        w = tl.load(param + idx, mask=m, other=0.0).to(CDT)
        v = tl.load(residual + i, mask=m, other=0.0)
        tl.store(out + i, w - tl.math.div_rn(v, keep).to(CDT), mask=m)

    @triton.jit
    def _write_kernel(param, support, anchor, residual, n, keep, CDT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        idx = tl.load(support + i, mask=m, other=0)
        a = tl.load(anchor + i, mask=m, other=0.0).to(CDT)
        v = tl.load(residual + i, mask=m, other=0.0)
        val = a + tl.math.div_rn(v, keep).to(CDT)
        tl.store(param + idx, cast_to(val, param.dtype.element_ty), mask=m)


def support_anchor_triton(param_flat, support, n, residual, keep):
    """Triton kernel of ``support_anchor``."""
    n = _check(param_flat, support, n, residual)
    cdt = compute_dtype(param_flat.dtype)
    out = torch.empty(n, dtype=cdt, device=param_flat.device)
    if n:
        block, warps = launch("anchor")
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
