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

from ._common import grid, launch, tl_type
from ._dispatch import HAS_TRITON, check_flat, check_n, note, tl, triton, use_triton
from ._table import TensorGroup


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
    """``found_inf = 1`` if ``values`` holds an inf/NaN, without a host sync (PyTorch path).

    GradScaler's own check (``_amp_foreach_non_finite_check_and_unscale_`` with a scale of 1:
    ``x * 1`` is ``x`` bit for bit) is one vectorised pass; ``~isfinite(x).any()`` was ~80x
    slower on one CPU core."""
    if not values.numel():
        return
    torch._amp_foreach_non_finite_check_and_unscale_([values], found_inf,
                                                     torch.ones(1, dtype=torch.float32, device=values.device))


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


    @triton.jit
    def _gather_grouped_kernel(blk_tensor, blk_start, grads, supports, outs, ns, caps, keeps, found_inf,
                               GDT: tl.constexpr, SDT: tl.constexpr, CHECK: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(blk_tensor + b)
        i = tl.load(blk_start + b) + tl.arange(0, BLOCK)
        gather_block(tl.load(grads + t).to(tl.pointer_type(GDT)), tl.load(supports + t).to(tl.pointer_type(SDT)),
                     tl.load(outs + t).to(tl.pointer_type(tl.float32)), i, tl.load(ns + t), tl.load(caps + t),
                     tl.load(keeps + t), found_inf, CHECK)


def gather_grad_grouped_torch(group: TensorGroup, grads, outs, found_inf=None):
    """Reference of the grouped gather: :func:`gather_grad_torch` per tensor."""
    check_flag(found_inf)
    for t, n in enumerate(group.sizes()):
        gather_grad_torch(grads[t], group.supports[t], n, group.keeps[t], outs[t], found_inf)
    return outs


def gather_grad_grouped_triton(group: TensorGroup, grads, outs, found_inf=None):
    """One launch for every tensor of ``group`` (see :class:`~._table.TensorGroup`)."""
    check_flag(found_inf)
    grad_tab = group.table(grads, "grads", lambda t: group.params[t].numel(), grads[0].dtype)
    out_tab = group.table(outs, "outs", lambda t: group.capacities[t], torch.float32)
    if group.blocks.num_blocks:
        note("launch", "gather")
        _gather_grouped_kernel[(group.blocks.num_blocks,)](
            group.blocks.tensor, group.blocks.start, grad_tab, group.support_ptr, out_tab, group.n,
            group.blocks.capacity, group.keep, outs[0] if found_inf is None else found_inf,
            GDT=tl_type(grads[0].dtype), SDT=tl_type(group.index_dtype), CHECK=found_inf is not None,
            BLOCK=group.blocks.block, num_warps=launch("gather")[1])
    return outs


def gather_grad_grouped(group: TensorGroup, grads, outs, found_inf=None):
    """``outs[t][:n_t] = grads[t][S_t] / keep_t`` (zeros up to the capacity) for every tensor
    of ``group`` in one launch, sizes read on the device; ``found_inf`` as in :func:`gather_grad`."""
    if use_triton(group.device):
        return gather_grad_grouped_triton(group, grads, outs, found_inf)
    return gather_grad_grouped_torch(group, grads, outs, found_inf)


def gather_grad_triton(grad_flat, support, n, keep, out, found_inf=None):
    """Triton kernel: one pass over the support's capacity."""
    n = _check(grad_flat, support, n, out, found_inf)
    if out.numel():
        block, warps = launch("gather")
        note("launch", "gather")
        _gather_kernel[grid(out.numel(), block)](grad_flat, support, out, n, out.numel(), float(keep),
                                                 out if found_inf is None else found_inf,
                                                 CHECK=found_inf is not None, BLOCK=block, num_warps=warps)
    return out


def gather_grad(grad_flat, support, n, keep, out, found_inf=None):
    """Dispatching gather (CUDA -> Triton, else PyTorch; see ``set_backend``)."""
    if use_triton(out):
        return gather_grad_triton(grad_flat, support, n, keep, out, found_inf)
    return gather_grad_torch(grad_flat, support, n, keep, out, found_inf)
