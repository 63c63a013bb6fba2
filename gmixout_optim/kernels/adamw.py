r"""One fused sparse Adam/AdamW step on the support: gather, update the compact state, write.

With ``S = support[:n]``, ``v = residual[:n]`` and the compact moments ``m, s`` (torch AdamW's
``exp_avg``/``exp_avg_sq`` layout, so a checkpoint resumes with ``torch.optim.AdamW``):

.. math::
    a &= \mathrm{anchor}[:n] \text{ or } w_S - v / keep      \quad\text{(before the update)} \\
    g &= \mathrm{grad}_S / keep \\
    v &\leftarrow v (1 - lr\,wd) \ \text{(AdamW)} \quad\text{or}\quad g \leftarrow g + wd\, v \ \text{(Adam)} \\
    m &\leftarrow \mathrm{lerp}(m, g, 1-\beta_1), \qquad s \leftarrow \beta_2 s + (1-\beta_2) g^2 \\
    v &\leftarrow v - \frac{lr}{1-\beta_1^t} \cdot \frac{m}{\sqrt{s}/\sqrt{1-\beta_2^t} + \epsilon} \\
    w_S &\leftarrow a + v / keep

``step`` is the step count *after* this step (torch increments ``state['step']`` first).
The PyTorch path runs torch's single-tensor AdamW ops on the compact tensors, so it matches
``torch.optim.AdamW(foreach=False)`` on ``v`` bit for bit; the kernel follows the same order
of operations (a few ulp apart where the compiler fuses a multiply-add).
"""
from __future__ import annotations

import torch

from ._common import cast_to, compute_dtype, grid, launch, scatter_, tl_dtype
from ._dispatch import HAS_TRITON, check_flat, check_n, check_vec, tl, triton, use_triton


def _check(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step):
    check_flat("param_flat", param_flat)
    check_flat("grad_flat", grad_flat)
    if grad_flat.numel() != param_flat.numel():
        raise ValueError(f"grad_flat has {grad_flat.numel()} elements, param_flat {param_flat.numel()}")
    n = check_n(n, support)
    for name, t in (("residual", residual), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_vec(name, t, n)
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32, got {t.dtype}")
    if anchor is not None:
        check_vec("anchor", anchor, n)
    if int(step) < 1:
        raise ValueError(f"step must be >= 1 (the count after this step), got {step}")
    return n


def fused_adamw_step_torch(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor,
                           *, step, lr, beta1, beta2, eps, weight_decay, decoupled, keep):
    """PyTorch reference: torch's ``_single_tensor_adam`` ops on the compact tensors."""
    n = _check(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step)
    s_idx = support[:n]
    v, m, s = residual[:n], exp_avg[:n], exp_avg_sq[:n]
    a = anchor[:n] if anchor is not None else param_flat.index_select(0, s_idx) - v / keep
    g = grad_flat.index_select(0, s_idx).float() / keep
    if weight_decay != 0:
        if decoupled:
            v.mul_(1 - lr * weight_decay)
        else:
            g = g.add(v, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    s.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = (s.sqrt() / bc2 ** 0.5).add_(eps)
    v.addcdiv_(m, denom, value=-(lr / bc1))
    scatter_(param_flat, s_idx, a + v / keep)


if HAS_TRITON:

    @triton.jit
    def _adamw_kernel(param, grad, support, residual, exp_avg, exp_avg_sq, anchor, n,
                      keep, wd, wd_factor, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step,
                      HAS_ANCHOR: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr,
                      LERP_SMALL: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        msk = i < n
        idx = tl.load(support + i, mask=msk, other=0)
        v = tl.load(residual + i, mask=msk, other=0.0)
        m = tl.load(exp_avg + i, mask=msk, other=0.0)
        s = tl.load(exp_avg_sq + i, mask=msk, other=0.0)
        if HAS_ANCHOR:
            a = tl.load(anchor + i, mask=msk, other=0.0).to(CDT)
        else:
            a = tl.load(param + idx, mask=msk, other=0.0).to(CDT) - tl.math.div_rn(v, keep).to(CDT)
        g = tl.math.div_rn(tl.load(grad + idx, mask=msk, other=0.0).to(tl.float32), keep)
        if HAS_WD:
            if DECOUPLED:
                v = v * wd_factor
            else:
                g = g + wd * v
        # torch's lerp: start + w*(end-start) for |w| < 0.5, else end + (w-1)*(end-start)
        if LERP_SMALL:
            m = m + lerp_w * (g - m)
        else:
            m = g + (lerp_w - 1.0) * (g - m)
        s = s * beta2 + one_minus_beta2 * g * g
        denom = tl.math.div_rn(tl.math.sqrt_rn(s), bc2_sqrt) + eps
        v = v + tl.math.div_rn(neg_step * m, denom)
        tl.store(residual + i, v, mask=msk)
        tl.store(exp_avg + i, m, mask=msk)
        tl.store(exp_avg_sq + i, s, mask=msk)
        w = a + tl.math.div_rn(v, keep).to(CDT)
        tl.store(param + idx, cast_to(w, param.dtype.element_ty), mask=msk)


def fused_adamw_step_triton(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor,
                            *, step, lr, beta1, beta2, eps, weight_decay, decoupled, keep):
    """Triton kernel: the whole step in one pass over the support."""
    n = _check(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step)
    if not n:
        return
    src = anchor if anchor is not None else param_flat
    lerp_w = 1 - beta1
    block, warps = launch("adamw")
    _adamw_kernel[grid(n, block)](
        param_flat, grad_flat, support, residual, exp_avg, exp_avg_sq, src, n,
        float(keep), float(weight_decay), float(1 - lr * weight_decay), float(lerp_w), float(beta2),
        float(1 - beta2), float((1 - beta2 ** step) ** 0.5), float(eps), float(-(lr / (1 - beta1 ** step))),
        HAS_ANCHOR=anchor is not None, DECOUPLED=bool(decoupled), HAS_WD=weight_decay != 0,
        LERP_SMALL=abs(lerp_w) < 0.5, CDT=tl_dtype(compute_dtype(src.dtype)), BLOCK=block, num_warps=warps)


def fused_adamw_step(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor,
                     *, step, lr, beta1, beta2, eps, weight_decay, decoupled, keep):
    """Dispatching fused sparse Adam/AdamW step (CUDA -> Triton, else PyTorch)."""
    impl = fused_adamw_step_triton if use_triton(param_flat) else fused_adamw_step_torch
    impl(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step=step, lr=lr,
         beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, keep=keep)
