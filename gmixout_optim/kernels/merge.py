"""End of an episode: fold the residual into the anchor and set the weights to it.

``A = anchor[:n]`` (16-bit weights) or ``w[S] - v[:n]/keep`` (fp32/fp64 weights), then
``w[S] = A + coeff * v[:n]``, cast to ``w``'s dtype, so ``w`` equals the new anchor everywhere.
The caller picks ``coeff``: ``(1-lam)/keep`` for the EMA merge, ``1-lam`` for the authors'
residual merge. The residual itself is not cleared here.
"""
from __future__ import annotations

from ._common import cast_to, compute_dtype, grid, launch, scatter_, tl_dtype
from ._dispatch import HAS_TRITON, check_vec, tl, triton, use_triton
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
    def _merge_kernel(param, support, residual, anchor, n, keep, coeff,
                      HAS_ANCHOR: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        idx = tl.load(support + i, mask=m, other=0)
        v = tl.load(residual + i, mask=m, other=0.0)
        if HAS_ANCHOR:
            a = tl.load(anchor + i, mask=m, other=0.0).to(CDT)
        else:
            a = tl.load(param + idx, mask=m, other=0.0).to(CDT) - tl.math.div_rn(v, keep).to(CDT)
        val = a + (coeff * v).to(CDT)
        tl.store(param + idx, cast_to(val, param.dtype.element_ty), mask=m)


def merge_episode_triton(param_flat, support, n, residual, anchor, keep, coeff):
    """Triton kernel of ``merge_episode``."""
    n = _check(param_flat, support, n, residual, anchor)
    if n:
        src = anchor if anchor is not None else param_flat
        cdt = compute_dtype(src.dtype)
        block, warps = launch("merge")
        _merge_kernel[grid(n, block)](param_flat, support, residual, src, n, float(keep), float(coeff),
                                      HAS_ANCHOR=anchor is not None, CDT=tl_dtype(cdt),
                                      BLOCK=block, num_warps=warps)


def merge_episode(param_flat, support, n, residual, anchor, keep, coeff):
    """Dispatching ``w[S] = A + coeff * v[:n]`` (CUDA -> Triton, else PyTorch)."""
    if use_triton(param_flat):
        return merge_episode_triton(param_flat, support, n, residual, anchor, keep, coeff)
    return merge_episode_torch(param_flat, support, n, residual, anchor, keep, coeff)
