"""End of an episode: fold the residual into the anchor and set the weights to it.

``A = anchor[:n]`` (16-bit weights) or ``w[S] - v[:n]/keep`` (fp32/fp64 weights), then
``w[S] = A + coeff * v[:n]``, cast to ``w``'s dtype, so ``w`` equals the new anchor everywhere.
The caller picks ``coeff``: ``(1-lam)/keep`` for the EMA merge, ``1-lam`` for the authors'
residual merge. The residual itself is not cleared here.
"""
from __future__ import annotations

import torch

from ._common import cast_to, compute_dtype, grid, launch, scatter_, tl_dtype, tl_type
from ._dispatch import HAS_TRITON, check_vec, note, tl, triton, use_triton
from ._table import TensorGroup, check_anchors, upload
from .write import _check as _check_write


def _check(param_flat, support, n, residual, anchor):
    n = _check_write(param_flat, support, n, residual)
    if anchor is not None:
        check_vec("anchor", anchor, n)
    return n


def merge_episode_torch(param_flat, support, n, residual, anchor, keep, coeff):
    """PyTorch reference of ``merge_episode``."""
    n = _check(param_flat, support, n, residual, anchor)
    s = support[:n]
    a = anchor[:n] if anchor is not None else param_flat.index_select(0, s) - residual[:n] / keep
    scatter_(param_flat, s, a + coeff * residual[:n])


if HAS_TRITON:

    @triton.jit
    def merge_block(param, support, residual, anchor, i, m, keep, coeff, HAS_ANCHOR: tl.constexpr,
                    CDT: tl.constexpr):
        idx = tl.load(support + i, mask=m, other=0)
        v = tl.load(residual + i, mask=m, other=0.0)
        if HAS_ANCHOR:
            a = tl.load(anchor + i, mask=m, other=0.0).to(CDT)
        else:
            a = tl.load(param + idx, mask=m, other=0.0).to(CDT) - tl.math.div_rn(v, keep).to(CDT)
        val = a + (coeff * v).to(CDT)
        tl.store(param + idx, cast_to(val, param.dtype.element_ty), mask=m)

    @triton.jit
    def _merge_kernel(param, support, residual, anchor, n, keep, coeff,
                      HAS_ANCHOR: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        merge_block(param, support, residual, anchor, i, i < n, keep, coeff, HAS_ANCHOR, CDT)

    @triton.jit
    def _merge_grouped_kernel(blk_tensor, blk_start, params, supports, residuals, anchors, ns, keeps, coeffs,
                              HAS_ANCHOR: tl.constexpr, WDT: tl.constexpr, SDT: tl.constexpr, CDT: tl.constexpr,
                              BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(blk_tensor + b)
        i = tl.load(blk_start + b) + tl.arange(0, BLOCK)
        param = tl.load(params + t).to(tl.pointer_type(WDT))
        if HAS_ANCHOR:
            anchor = tl.load(anchors + t).to(tl.pointer_type(WDT))
        else:
            anchor = param
        merge_block(param, tl.load(supports + t).to(tl.pointer_type(SDT)),
                    tl.load(residuals + t).to(tl.pointer_type(tl.float32)), anchor, i, i < tl.load(ns + t),
                    tl.load(keeps + t), tl.load(coeffs + t), HAS_ANCHOR, CDT)


def merge_episode_triton(param_flat, support, n, residual, anchor, keep, coeff):
    """Triton kernel of ``merge_episode``."""
    n = _check(param_flat, support, n, residual, anchor)
    if n:
        src = anchor if anchor is not None else param_flat
        cdt = compute_dtype(src.dtype)
        block, warps = launch("merge")
        note("launch", "merge")
        _merge_kernel[grid(n, block)](param_flat, support, residual, src, n, float(keep), float(coeff),
                                      HAS_ANCHOR=anchor is not None, CDT=tl_dtype(cdt),
                                      BLOCK=block, num_warps=warps)


def merge_episode(param_flat, support, n, residual, anchor, keep, coeff):
    """Dispatching ``w[S] = A + coeff * v[:n]`` (CUDA -> Triton, else PyTorch)."""
    if use_triton(param_flat):
        return merge_episode_triton(param_flat, support, n, residual, anchor, keep, coeff)
    return merge_episode_torch(param_flat, support, n, residual, anchor, keep, coeff)


def merge_episode_grouped_torch(group: TensorGroup, residuals, anchors, coeffs):
    """Reference of the grouped merge: :func:`merge_episode_torch` per tensor."""
    for t, n in enumerate(group.sizes()):
        merge_episode_torch(group.params[t], group.supports[t], n, residuals[t], anchors[t], group.keeps[t], coeffs[t])


def merge_episode_grouped_triton(group: TensorGroup, residuals, anchors, coeffs):
    """``w_t[S_t] = A_t + coeff_t * v_t`` for every tensor in one launch."""
    check_anchors(anchors)
    caps = lambda t: group.capacities[t]  # noqa: E731
    res_tab = group.table(residuals, "residuals", caps, torch.float32)
    has_anchor = anchors[0] is not None
    anc_tab = group.table(anchors, "anchors", caps, group.dtype) if has_anchor else group.param_ptr
    coeff = upload([float(c) for c in coeffs], torch.float32, group.device)
    if group.blocks.num_blocks:
        note("launch", "merge")
        _merge_grouped_kernel[(group.blocks.num_blocks,)](
            group.blocks.tensor, group.blocks.start, group.param_ptr, group.support_ptr, res_tab, anc_tab, group.n,
            group.keep, coeff, HAS_ANCHOR=has_anchor, WDT=tl_type(group.dtype), SDT=tl_type(group.index_dtype),
            CDT=tl_dtype(compute_dtype(group.dtype)), BLOCK=group.blocks.block, num_warps=launch("merge")[1])


def merge_episode_grouped(group: TensorGroup, residuals, anchors, coeffs):
    """Dispatching grouped merge: ``coeffs`` one float per tensor, ``anchors`` all None or all given."""
    if use_triton(group.device):
        return merge_episode_grouped_triton(group, residuals, anchors, coeffs)
    return merge_episode_grouped_torch(group, residuals, anchors, coeffs)
