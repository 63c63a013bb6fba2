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

Options (keywords, off by default): ``compact_grad`` is ``grad_S / keep`` already gathered
(by :func:`~.gather.gather_grad`, which can check it for inf/NaN on the way), read instead of
gathering ``grad_flat`` again; ``found_inf`` (one-element fp32) makes the step a no-op when it
is non-zero, read on the device (torch's fused AdamW honours its ``found_inf`` the same way),
so a step with a non-finite gradient changes nothing and the host never waits for the verdict.
The PyTorch path runs torch's single-tensor AdamW ops on the compact tensors, so it matches
``torch.optim.AdamW(foreach=False)`` on ``v`` bit for bit; the kernel follows the same order
of operations (a few ulp apart where the compiler fuses a multiply-add).
"""
from __future__ import annotations

import torch

from ._common import cast_to, compute_dtype, grid, launch, scatter_, tl_dtype, tl_type
from ._dispatch import HAS_TRITON, check_flat, check_n, check_vec, note, tl, triton, use_triton
from ._table import TensorGroup, check_anchors, upload
from .gather import check_flag


def _check(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step,
           compact_grad=None, found_inf=None):
    check_flat("param_flat", param_flat)
    check_flag(found_inf)
    if compact_grad is None:
        if grad_flat is None:
            raise ValueError("grad_flat may be None only when compact_grad is given")
        check_flat("grad_flat", grad_flat)
        if grad_flat.numel() != param_flat.numel():
            raise ValueError(f"grad_flat has {grad_flat.numel()} elements, param_flat {param_flat.numel()}")
    n = check_n(n, support)
    if compact_grad is not None:
        check_vec("compact_grad", compact_grad, n)
        if compact_grad.dtype != torch.float32:
            raise ValueError(f"compact_grad must be fp32, got {compact_grad.dtype}")
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
                           *, step, lr, beta1, beta2, eps, weight_decay, decoupled, keep,
                           compact_grad=None, found_inf=None):
    """PyTorch reference: torch's ``_single_tensor_adam`` ops on the compact tensors."""
    n = _check(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step,
               compact_grad, found_inf)
    if found_inf is not None:
        if found_inf.device.type == "cpu":
            if found_inf.item() != 0:
                return
        else:  # no host sync: step on copies, keep the old values where the flag is set
            saved = [t[:n].clone() for t in (residual, exp_avg, exp_avg_sq)]
            w_old = param_flat.index_select(0, support[:n])
            _adamw_torch(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step,
                         lr, beta1, beta2, eps, weight_decay, decoupled, keep, compact_grad)
            skip = found_inf.view(()) != 0
            for t, old in zip((residual, exp_avg, exp_avg_sq), saved):
                t[:n] = torch.where(skip, old, t[:n])
            scatter_(param_flat, support[:n], torch.where(skip, w_old, param_flat.index_select(0, support[:n])))
            return
    _adamw_torch(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step,
                 lr, beta1, beta2, eps, weight_decay, decoupled, keep, compact_grad)


def _adamw_torch(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step,
                 lr, beta1, beta2, eps, weight_decay, decoupled, keep, compact_grad):
    s_idx = support[:n]
    v, m, s = residual[:n], exp_avg[:n], exp_avg_sq[:n]
    a = anchor[:n] if anchor is not None else param_flat.index_select(0, s_idx) - v / keep
    if compact_grad is not None:
        g = compact_grad[:n]
    else:
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
    def adamw_block(param, grad, support, residual, exp_avg, exp_avg_sq, anchor, i, msk,
                    keep, wd, wd_factor, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step,
                    HAS_ANCHOR: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr,
                    LERP_SMALL: tl.constexpr, COMPACT: tl.constexpr, CDT: tl.constexpr):
        """The step on slots ``i`` where ``msk`` (shared with the grouped kernel). With
        ``COMPACT``, ``grad`` is the gathered ``grad_S / keep``, indexed by slot."""
        idx = tl.load(support + i, mask=msk, other=0)
        v = tl.load(residual + i, mask=msk, other=0.0)
        m = tl.load(exp_avg + i, mask=msk, other=0.0)
        s = tl.load(exp_avg_sq + i, mask=msk, other=0.0)
        if HAS_ANCHOR:
            a = tl.load(anchor + i, mask=msk, other=0.0).to(CDT)
        else:
            a = tl.load(param + idx, mask=msk, other=0.0).to(CDT) - tl.math.div_rn(v, keep).to(CDT)
        if COMPACT:
            g = tl.load(grad + i, mask=msk, other=0.0)
        else:
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

    @triton.jit
    def _adamw_kernel(param, grad, support, residual, exp_avg, exp_avg_sq, anchor, n, found_inf,
                      keep, wd, wd_factor, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step,
                      HAS_ANCHOR: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr,
                      LERP_SMALL: tl.constexpr, COMPACT: tl.constexpr, HONOUR_INF: tl.constexpr,
                      CDT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if HONOUR_INF:  # a masked-off block moves no bytes: a skipped step costs one load a program
            n = tl.where(tl.load(found_inf) != 0, 0, n)
        msk = i < n
        adamw_block(param, grad, support, residual, exp_avg, exp_avg_sq, anchor, i, msk,
                    keep, wd, wd_factor, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step,
                    HAS_ANCHOR, DECOUPLED, HAS_WD, LERP_SMALL, COMPACT, CDT)


    @triton.jit
    def _adamw_grouped_kernel(blk_tensor, blk_start, params, grads, supports, residuals, exp_avgs, exp_avg_sqs,
                              anchors, ns, keeps, steps, lrs, hp64, found_inf,
                              wd, lerp_w, beta2, one_minus_beta2, eps,
                              HAS_ANCHOR: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr,
                              LERP_SMALL: tl.constexpr, COMPACT: tl.constexpr, HONOUR_INF: tl.constexpr,
                              LR_PER_TENSOR: tl.constexpr, WDT: tl.constexpr, GDT: tl.constexpr,
                              SDT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(blk_tensor + b)
        i = tl.load(blk_start + b) + tl.arange(0, BLOCK)
        n = tl.load(ns + t)
        if HONOUR_INF:
            n = tl.where(tl.load(found_inf) != 0, 0, n)
        # The step- and lr-dependent scalars, from device values (so a step needs no host
        # value): in fp64 from the fp64 hyperparameters, rounded once to fp32, as the host
        # computes them for the per-tensor kernel in Python floats.
        step = tl.load(steps + t).to(tl.float64)
        if LR_PER_TENSOR:
            lr = tl.load(lrs + t).to(tl.float64)
        else:
            lr = tl.load(lrs).to(tl.float64)
        beta1_64 = tl.load(hp64)
        beta2_64 = tl.load(hp64 + 1)
        wd64 = tl.load(hp64 + 2)
        bc1 = 1.0 - tl.exp2(step * tl.log2(beta1_64))
        bc2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2_64))).to(tl.float32)
        neg_step = (-(lr / bc1)).to(tl.float32)
        wd_factor = (1.0 - lr * wd64).to(tl.float32)
        param = tl.load(params + t).to(tl.pointer_type(WDT))
        if HAS_ANCHOR:
            anchor = tl.load(anchors + t).to(tl.pointer_type(WDT))
        else:
            anchor = param
        if COMPACT:
            grad = tl.load(grads + t).to(tl.pointer_type(tl.float32))
        else:
            grad = tl.load(grads + t).to(tl.pointer_type(GDT))
        adamw_block(param, grad, tl.load(supports + t).to(tl.pointer_type(SDT)),
                    tl.load(residuals + t).to(tl.pointer_type(tl.float32)),
                    tl.load(exp_avgs + t).to(tl.pointer_type(tl.float32)),
                    tl.load(exp_avg_sqs + t).to(tl.pointer_type(tl.float32)), anchor, i, i < n,
                    tl.load(keeps + t), wd, wd_factor, lerp_w, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step,
                    HAS_ANCHOR, DECOUPLED, HAS_WD, LERP_SMALL, COMPACT, CDT)


def adamw_scalars(*, step, lr, beta1, beta2, eps, weight_decay, keep):
    """The kernel's fp32 scalars, in its argument order (shared with the grouped launcher)."""
    return (float(keep), float(weight_decay), float(1 - lr * weight_decay), float(1 - beta1), float(beta2),
            float(1 - beta2), float((1 - beta2 ** step) ** 0.5), float(eps), float(-(lr / (1 - beta1 ** step))))


def fused_adamw_step_triton(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor,
                            *, step, lr, beta1, beta2, eps, weight_decay, decoupled, keep,
                            compact_grad=None, found_inf=None):
    """Triton kernel: the whole step in one pass over the support."""
    n = _check(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step,
               compact_grad, found_inf)
    if not n:
        return
    src = anchor if anchor is not None else param_flat
    lerp_w = 1 - beta1
    block, warps = launch("adamw")
    note("launch", "adamw")
    _adamw_kernel[grid(n, block)](
        param_flat, grad_flat if compact_grad is None else compact_grad, support, residual, exp_avg,
        exp_avg_sq, src, n, residual if found_inf is None else found_inf,
        *adamw_scalars(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, keep=keep),
        HAS_ANCHOR=anchor is not None, DECOUPLED=bool(decoupled), HAS_WD=weight_decay != 0,
        LERP_SMALL=abs(lerp_w) < 0.5, COMPACT=compact_grad is not None, HONOUR_INF=found_inf is not None,
        CDT=tl_dtype(compute_dtype(src.dtype)), BLOCK=block, num_warps=warps)


def fused_adamw_step(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor,
                     *, step, lr, beta1, beta2, eps, weight_decay, decoupled, keep,
                     compact_grad=None, found_inf=None):
    """Dispatching fused sparse Adam/AdamW step (CUDA -> Triton, else PyTorch)."""
    impl = fused_adamw_step_triton if use_triton(param_flat) else fused_adamw_step_torch
    impl(param_flat, grad_flat, support, n, residual, exp_avg, exp_avg_sq, anchor, step=step, lr=lr,
         beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, keep=keep,
         compact_grad=compact_grad, found_inf=found_inf)


def _grouped_check(group, anchors, steps, found_inf):
    check_flag(found_inf)
    if steps.dtype != torch.float32 or steps.numel() != len(group):
        raise ValueError(f"steps must be fp32 with one count per tensor ({len(group)}), got {steps.dtype} "
                         f"of {steps.numel()}")
    check_anchors(anchors)


def fused_adamw_step_grouped_torch(group: TensorGroup, grads, residuals, exp_avgs, exp_avg_sqs, anchors, *,
                                   steps, lr, beta1, beta2, eps, weight_decay, decoupled,
                                   compact_grads=None, found_inf=None):
    """Reference of the grouped step: ``steps += 1 - found_inf``, then
    :func:`fused_adamw_step_torch` per tensor."""
    _grouped_check(group, anchors, steps, found_inf)
    steps.add_(1)
    if found_inf is not None:
        steps.sub_(found_inf)
    lrs = lr.flatten().tolist() if torch.is_tensor(lr) else [lr]
    for t, (n, step) in enumerate(zip(group.sizes(), steps.tolist())):
        fused_adamw_step_torch(group.params[t], None if grads is None else grads[t], group.supports[t], n,
                               residuals[t], exp_avgs[t], exp_avg_sqs[t], anchors[t], step=max(step, 1),
                               lr=lrs[t if len(lrs) > 1 else 0], beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=weight_decay, decoupled=decoupled, keep=group.keeps[t],
                               compact_grad=None if compact_grads is None else compact_grads[t],
                               found_inf=found_inf)


def fused_adamw_step_grouped_triton(group: TensorGroup, grads, residuals, exp_avgs, exp_avg_sqs, anchors, *,
                                    steps, lr, beta1, beta2, eps, weight_decay, decoupled,
                                    compact_grads=None, found_inf=None):
    """One launch for every tensor of ``group``; step counts, lr and sizes read on the device."""
    _grouped_check(group, anchors, steps, found_inf)
    caps = lambda t: group.capacities[t]  # noqa: E731
    state = [group.table(x, name, caps, torch.float32)
             for x, name in ((residuals, "residuals"), (exp_avgs, "exp_avgs"), (exp_avg_sqs, "exp_avg_sqs"))]
    if compact_grads is not None:
        grad_tab, gdt = group.table(compact_grads, "compact_grads", caps, torch.float32), torch.float32
    else:
        grad_tab, gdt = group.table(grads, "grads", lambda t: group.params[t].numel(), grads[0].dtype), grads[0].dtype
    has_anchor = anchors[0] is not None
    anchor_tab = group.table(anchors, "anchors", caps, group.dtype) if has_anchor else group.param_ptr
    # torch's fused AdamW: the count advances, then steps back where the step was skipped
    steps.add_(1)
    note("launch", "adamw")
    if found_inf is not None:
        steps.sub_(found_inf)
        note("launch", "adamw")
    if not torch.is_tensor(lr):  # uploaded when it changes (by bits: -0.0 is not 0.0), not every step
        key = float(lr).hex()
        last = group.cache.get("adamw_lr")
        if last is None or last[0] != key:
            last = group.cache["adamw_lr"] = (key, upload([lr], torch.float64, group.device))
        lr = last[1]
    # constant across steps: uploaded once per group and value, not every step
    key = ("adamw_hp64", float(beta1), float(beta2), float(weight_decay))
    hp64 = group.cache.get(key)
    if hp64 is None:
        hp64 = group.cache[key] = upload(key[1:], torch.float64, group.device)
    lerp_w = 1 - beta1
    if group.blocks.num_blocks:
        note("launch", "adamw")
        _adamw_grouped_kernel[(group.blocks.num_blocks,)](
            group.blocks.tensor, group.blocks.start, group.param_ptr, grad_tab, group.support_ptr, *state,
            anchor_tab, group.n, group.keep, steps, lr, hp64, steps if found_inf is None else found_inf,
            float(weight_decay), float(lerp_w), float(beta2), float(1 - beta2), float(eps),
            HAS_ANCHOR=has_anchor, DECOUPLED=bool(decoupled), HAS_WD=weight_decay != 0,
            LERP_SMALL=abs(lerp_w) < 0.5, COMPACT=compact_grads is not None, HONOUR_INF=found_inf is not None,
            LR_PER_TENSOR=lr.numel() > 1, WDT=tl_type(group.dtype), GDT=tl_type(gdt),
            SDT=tl_type(group.index_dtype), CDT=tl_dtype(compute_dtype(group.dtype)),
            BLOCK=group.blocks.block, num_warps=launch("adamw_grouped")[1])


def fused_adamw_step_grouped(group: TensorGroup, grads, residuals, exp_avgs, exp_avg_sqs, anchors, *,
                             steps, lr, beta1, beta2, eps, weight_decay, decoupled,
                             compact_grads=None, found_inf=None):
    """The fused step for every tensor of ``group`` in one launch, without a host sync.

    Per tensor ``t`` as :func:`fused_adamw_step` with ``keep = group.keeps[t]`` and
    ``n = group.n[t]``. ``steps``: fp32 device tensor, one count per tensor (before this step:
    it is incremented here, and not where ``found_inf`` is set, as in torch's fused AdamW);
    ``lr``: a float, or a device tensor of one value or one per tensor (a schedule can then
    change it without a host value: CUDA-graph friendly). ``grads``/``compact_grads``: one per
    tensor (``grads`` may be None when ``compact_grads`` is given); ``anchors``: all None
    (fp32 weights) or one buffer per tensor.
    """
    impl = fused_adamw_step_grouped_triton if use_triton(group.device) else fused_adamw_step_grouped_torch
    impl(group, grads, residuals, exp_avgs, exp_avg_sqs, anchors, steps=steps, lr=lr, beta1=beta1, beta2=beta2,
         eps=eps, weight_decay=weight_decay, decoupled=decoupled, compact_grads=compact_grads, found_inf=found_inf)
