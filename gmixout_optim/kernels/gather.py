"""Gather the residual's gradient: ``out[:n] = grad[S].float() / keep``; ``out[n:] = 0``.

``grad`` may be fp32, bf16, fp16 (or fp64); ``out`` is fp32 of length ``capacity``.
The division (not a multiplication by ``1/keep``) is what autograd does for ``v / keep``.
"""
from __future__ import annotations

import torch

from ._common import grid, launch
from ._dispatch import HAS_TRITON, check_flat, check_n, tl, triton, use_triton


def _check(grad_flat, support, n, out):
    check_flat("grad_flat", grad_flat)
    check_flat("out", out)
    n = check_n(n, support)
    if out.dtype != torch.float32 or out.numel() != support.numel():
        raise ValueError(f"out must be fp32 with the support's length {support.numel()}, "
                         f"got {out.dtype} of length {out.numel()}")
    return n


def gather_grad_torch(grad_flat, support, n, keep, out):
    """PyTorch reference (see the module docstring). Returns ``out``."""
    n = _check(grad_flat, support, n, out)
    out[:n] = grad_flat.index_select(0, support[:n]).float() / keep
    out[n:] = 0
    return out


if HAS_TRITON:

    @triton.jit
    def _gather_kernel(grad, support, out, n, capacity, keep, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ins = i < n
        idx = tl.load(support + i, mask=ins, other=0)
        g = tl.load(grad + idx, mask=ins, other=0.0).to(tl.float32)
        tl.store(out + i, tl.where(ins, tl.math.div_rn(g, keep), 0.0), mask=i < capacity)


def gather_grad_triton(grad_flat, support, n, keep, out):
    """Triton kernel: one pass over the support's capacity."""
    n = _check(grad_flat, support, n, out)
    if out.numel():
        block, warps = launch("gather")
        _gather_kernel[grid(out.numel(), block)](grad_flat, support, out, n, out.numel(), float(keep),
                                                 BLOCK=block, num_warps=warps)
    return out


def gather_grad(grad_flat, support, n, keep, out):
    """Dispatching gather (CUDA -> Triton, else PyTorch; see ``set_backend``)."""
    if use_triton(out):
        return gather_grad_triton(grad_flat, support, n, keep, out)
    return gather_grad_torch(grad_flat, support, n, keep, out)
