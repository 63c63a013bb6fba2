"""Gather the residual's gradient: ``out[:n] = grad[S].float() / keep``; ``out[n:] = 0``.

``grad`` may be fp32, bf16, fp16 (or fp64); ``out`` is fp32 of length ``capacity``.
The division (not a multiplication by ``1/keep``) is what autograd does for ``v / keep``.

Non-finite check on the device: with ``found_inf`` (a one-element fp32 tensor, torch's
``found_inf`` convention) the gather also sets ``found_inf = 1`` when ``out[:n]`` holds an
inf or NaN, and never clears it, so one flag zeroed per step collects every tensor's verdict
without a host sync; :func:`~.adamw.fused_adamw_step` honours it. The value checked is the
gathered one, after ``/ keep`` (what the inner optimizer would see).
"""
from __future__ import annotations

import torch

from ._common import grid, launch
from ._dispatch import HAS_TRITON, check_flat, check_n, tl, triton, use_triton


def check_flag(found_inf) -> None:
    """``found_inf`` is None or a one-element fp32 tensor (torch's ``found_inf`` convention)."""
    if found_inf is not None and (found_inf.numel() != 1 or found_inf.dtype != torch.float32):
        raise ValueError(f"found_inf must be a one-element fp32 tensor, got {found_inf.dtype} "
                         f"of shape {tuple(found_inf.shape)}")


def _check(grad_flat, support, n, out, found_inf=None):
    check_flat("grad_flat", grad_flat)
    check_flat("out", out)
    check_flag(found_inf)
    n = check_n(n, support)
    if out.dtype != torch.float32 or out.numel() != support.numel():
        raise ValueError(f"out must be fp32 with the support's length {support.numel()}, "
                         f"got {out.dtype} of length {out.numel()}")
    return n


def mark_nonfinite_(values: torch.Tensor, found_inf: torch.Tensor) -> None:
    """``found_inf = max(found_inf, any(values is inf/nan))`` without a host sync (PyTorch path)."""
    bad = (~torch.isfinite(values)).any().to(found_inf.dtype)
    torch.maximum(found_inf.view(()), bad, out=found_inf.view(()))


def gather_grad_torch(grad_flat, support, n, keep, out, found_inf=None):
    """PyTorch reference (see the module docstring). Returns ``out``."""
    n = _check(grad_flat, support, n, out, found_inf)
    out[:n] = grad_flat.index_select(0, support[:n]).float() / keep
    out[n:] = 0
    if found_inf is not None:
        mark_nonfinite_(out[:n], found_inf)
    return out


if HAS_TRITON:

    @triton.jit
    def flag_nonfinite(x, msk, found_inf):
        """Set ``*found_inf = 1`` if a masked-in element of the block ``x`` is inf or NaN.

        A plain store, not an atomic: every program that stores writes the same 1.0."""
        bad = msk & ((x != x) | (tl.abs(x) == float("inf")))
        tl.store(found_inf, 1.0, mask=tl.max(bad.to(tl.int32), axis=0) > 0)

    @triton.jit
    def gather_block(grad, support, out, i, n, capacity, keep, found_inf, CHECK: tl.constexpr):
        """``out[i] = grad[S[i]] / keep`` for ``i < n``, 0 up to ``capacity`` (shared with the grouped kernel)."""
        ins = i < n
        idx = tl.load(support + i, mask=ins, other=0)
        g = tl.math.div_rn(tl.load(grad + idx, mask=ins, other=0.0).to(tl.float32), keep)
        if CHECK:
            flag_nonfinite(g, ins, found_inf)
        tl.store(out + i, tl.where(ins, g, 0.0), mask=i < capacity)

    @triton.jit
    def _gather_kernel(grad, support, out, n, capacity, keep, found_inf, CHECK: tl.constexpr,
                       BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        gather_block(grad, support, out, i, n, capacity, keep, found_inf, CHECK)


def gather_grad_triton(grad_flat, support, n, keep, out, found_inf=None):
    """Triton kernel: one pass over the support's capacity."""
    n = _check(grad_flat, support, n, out, found_inf)
    if out.numel():
        block, warps = launch("gather")
        _gather_kernel[grid(out.numel(), block)](grad_flat, support, out, n, out.numel(), float(keep),
                                                 out if found_inf is None else found_inf,
                                                 CHECK=found_inf is not None, BLOCK=block, num_warps=warps)
    return out


def gather_grad(grad_flat, support, n, keep, out, found_inf=None):
    """Dispatching gather (CUDA -> Triton, else PyTorch; see ``set_backend``)."""
    if use_triton(out):
        return gather_grad_triton(grad_flat, support, n, keep, out, found_inf)
    return gather_grad_torch(grad_flat, support, n, keep, out, found_inf)
