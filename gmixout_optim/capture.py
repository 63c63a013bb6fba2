"""Gradient capture (``GMixoutOptimizer(..., capture_grads=True)``): no dense weight gradient kept.

A post-accumulate-grad hook on each GMixout tensor runs as soon as its gradient has been
accumulated (by autograd; under FSDP2 on the sharded parameter, after the reduce-scatter),
adds the gradient's support values to the tensor's compact gradient buffer and frees the
dense gradient (``param.grad = None``): during backward at most one dense weight gradient of
a GMixout tensor is alive at a time.

The buffer (``st["grad"]``, born in :func:`gmixout_optim.state.ensure_grad_buffer`; fp32,
one slot per support slot, never saved) holds, per slot ``j < n`` and its support index
``S[j]``:

- after backward (``EMPTY`` -> ``SUMMED``): ``sum over micro-batches of grad[S[j]]``, each
  addition rounded to the parameter's dtype as autograd rounds ``param.grad += g`` (bf16/fp16
  values are exact in fp32), so it equals ``grad[S]`` of the gradient autograd would have kept;
- once ``step()`` or ``clip_grad_norm_`` has used it (``SCALED``): that value ``/ keep``: the
  residual's gradient itself (``residual.grad`` is the buffer; no second buffer is made);

slots ``j >= n`` are 0. So a captured run is bitwise the run without capture (same dtype, same
micro-batching). ``step()`` consumes the buffers (the next backward starts a new sum, as after
``zero_grad()``); ``zero_grad()`` empties them. A gradient found in ``param.grad`` of a captured
tensor at ``step()`` (written by code that bypasses autograd) is added to the buffer with a
warning. ``torch.nn.utils.clip_grad_norm_`` over the model does not see captured gradients:
use ``opt.clip_grad_norm_``.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch

from .episode import open_episode
from .sharding import agrees_alone, flat_grad, is_dtensor, local, sync_group, vote_device
from .state import GRAD, GRAD_STATUS, SUPPORT_SIZE, ensure_grad_buffer, positions
from .step import collect as collect_grads
from .step import kernels_for

__all__ = ["EMPTY", "SUMMED", "SCALED", "check_tensor", "check_world", "check_group", "install_hook",
           "install_dense_hook", "install_hooks", "on_grad", "add", "scale", "clear", "status", "total_norm", "collect",
           "fold_left_grad", "clear_all", "clip_grad_norm"]

# st[GRAD_STATUS]: what the gradient of the residual holds this step (absent: EMPTY).
EMPTY, SUMMED, SCALED = 0, 1, 2


def status(st: dict) -> int:
    return st.get(GRAD_STATUS, EMPTY)


def check_tensor(w: torch.Tensor, where: str) -> None:
    """Capture needs a tensor autograd accumulates into, in a dtype the fp32 buffer holds exactly."""
    if not (w.is_leaf and w.requires_grad):
        raise ValueError(f"capture_grads=True needs GMixout tensors that autograd fills (leaf tensors with "
                         f"requires_grad=True); the parameter{where} is not")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"capture_grads=True supports fp32, bf16 and fp16 parameters; the parameter{where} "
                         f"has dtype {w.dtype}")


def check_world(w: torch.Tensor, where: str) -> None:
    """Refuse a multi-rank run whose tensor is not an FSDP2 shard: the hook would see the local gradient."""
    import torch.distributed as dist

    if is_dtensor(w) or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    raise ValueError(
        f"capture_grads=True on {dist.get_world_size()} ranks needs FSDP2 (DTensor) parameters; the parameter"
        f"{where} is a plain tensor. Under DDP (or any data parallelism that averages gradients after "
        "backward) the hook would capture this rank's local gradient before the all-reduce; DDP's buckets "
        "keep a dense gradient anyway, so use capture_grads=False with DDP, or shard with FSDP2")


def check_group(opt: Any, group: dict, where: str) -> None:
    """Before ``opt`` adds ``group`` (its ``params`` a list): every GMixout tensor can be captured."""
    if group["gmixout"] and opt._capture_grads:
        for i, prm in enumerate(group["params"]):
            check_tensor(prm, f"{where}, index {i}")
            check_world(prm, f"{where}, index {i}")


_OWNER = "_gmixout_capture_owner"  # on a captured tensor: a weak reference to the optimizer capturing it


def install_hook(opt: Any, w: torch.Tensor, where: str) -> Any:
    """Register the capture hook on ``w``. The hook holds the optimizer weakly and acts only while
    that optimizer is the tensor's owner: the newest capturing optimizer of a tensor takes its
    gradients (a rebuilt optimizer replaces the old one; warned if the old one is still alive)."""
    old = getattr(w, _OWNER, None)
    if old is not None and old() is not None and old() is not opt:
        warnings.warn(f"the parameter{where} was captured by another live GMixoutOptimizer(capture_grads=True); "
                      "this one takes its gradients from now on", UserWarning, stacklevel=5)
    ref = weakref.ref(opt)
    setattr(w, _OWNER, ref)

    def hook(param: torch.Tensor) -> None:
        owner = ref()
        if owner is not None and getattr(param, _OWNER, None) is ref:
            on_grad(owner, param)

    return w.register_post_accumulate_grad_hook(hook)


def install_dense_hook(w: torch.Tensor) -> Any:
    """On a dense parameter of a capturing optimizer that is an FSDP2 shard: FSDP2 writes every
    shard gradient of a block as a view of ONE reduce-scatter buffer, so a single dense gradient
    (a bias, a norm weight) would keep the whole block's buffer alive after the captured weight
    gradients were freed. The hook gives that gradient its own storage (a copy of a small tensor)."""

    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        if grad is not None:
            shard = local(grad)
            if shard.untyped_storage().nbytes() > shard.numel() * shard.element_size():
                param.grad = grad.clone()

    return w.register_post_accumulate_grad_hook(hook)


def install_hooks(opt: Any, group: dict, where: str) -> None:
    """After ``opt`` added ``group``: the capture hooks of its GMixout tensors, or the dense hooks
    of its FSDP2 shards (:func:`install_dense_hook`), each tensor's once."""
    if group["gmixout"] and opt._capture_grads:
        for i, prm in enumerate(group["params"]):
            if prm not in opt._capture_hooks:
                opt._capture_hooks[prm] = install_hook(opt, prm, f"{where}, index {i}")
    elif opt._capture_grads:
        for prm in group["params"]:
            if is_dtensor(prm) and prm.requires_grad and prm not in opt._capture_hooks:
                opt._capture_hooks[prm] = install_dense_hook(prm)


@torch.no_grad()
def on_grad(opt: Any, w: torch.Tensor) -> None:
    """The post-accumulate-grad hook: ``grad[S]`` into the compact buffer, dense gradient freed."""
    if w.grad is None:
        return
    where = opt._capture_index.get(w)
    if where is None or not _is_at(opt.param_groups, w, *where):
        opt._capture_index = {p: (gi, i) for gi, g in enumerate(opt.param_groups) if g["gmixout"]
                              for i, p in enumerate(g["params"])}
        where = opt._capture_index.get(w)
        if where is None:  # no longer in a GMixout group: leave its gradient to autograd
            return
    gi, i = where
    st = open_episode(opt, w, opt.param_groups[gi], gi, i)
    add(st, w)
    w.grad = None


def _is_at(groups: list[dict], w: torch.Tensor, gi: int, i: int) -> bool:
    return gi < len(groups) and groups[gi]["gmixout"] and i < len(groups[gi]["params"]) \
        and groups[gi]["params"][i] is w


@torch.no_grad()
def add(st: dict, w: torch.Tensor) -> None:
    """Add ``w.grad[S]`` (its local shard's) to the buffer, read as the step's gather reads it."""
    buf = ensure_grad_buffer(w, st)
    n = st[SUPPORT_SIZE]
    values = flat_grad(w).index_select(0, positions(w, st)[:n].long())
    mode = status(st)
    if mode == SCALED:
        raise RuntimeError("a gradient arrived for a captured tensor after clip_grad_norm_ used the captured "
                           "gradients and before step(): call clip_grad_norm_ after the last backward")
    if mode == EMPTY:
        buf[:n] = values
        buf[n:] = 0
    elif w.dtype == torch.float32:
        buf[:n] += values
    else:  # round the sum to the parameter's dtype, as autograd's accumulation does
        buf[:n] = buf[:n].to(w.dtype).add_(values)
    st[GRAD_STATUS] = SUMMED


@torch.no_grad()
def scale(st: dict, keep: float) -> torch.Tensor:
    """Turn the summed support gradients (status ``SUMMED``) into the residual's gradient,
    ``/ keep`` in place (the division the gather does); returns the buffer."""
    buf = st[GRAD]
    n = st[SUPPORT_SIZE]
    buf[:n].div_(keep)
    st[GRAD_STATUS] = SCALED
    return buf


def clear(st: dict) -> None:
    """Nothing captured or gathered for this step (the buffer itself is kept for reuse)."""
    st.pop(GRAD_STATUS, None)
    if "residual" in st:
        st["residual"].grad = None


def total_norm(grads: list[torch.Tensor], norm_type: float, sync: Any, foreach: bool | None) -> torch.Tensor:
    """The ``norm_type``-norm of all ``grads`` together; over every rank of ``sync`` when the
    step's decisions are agreed there (each rank holds other shards' gradients)."""
    if grads:
        total = torch.nn.utils.get_total_norm(grads, norm_type, False, foreach)
    else:
        total = torch.zeros(())
    if agrees_alone(sync):
        return total
    import torch.distributed as dist

    device = vote_device(sync)  # the GPU under NCCL; otherwise where the norm is
    if device.type == "cpu":
        device = total.device
    if math.isinf(norm_type):
        out = total.to(device, torch.float32)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=sync)
    else:  # the p-th powers add up over shards
        out = total.to(device, torch.float32) ** norm_type
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=sync)
        out = out ** (1.0 / norm_type)
    return out.to(total.device)


# -- the optimizer's side: collect, fold, zero, clip -----------------------------------------

def collect(opt: Any) -> tuple[list, list]:
    """``step.collect``, plus the GMixout tensors whose gradient is captured or already gathered."""
    sparse, dense = collect_grads(opt.param_groups)
    seen = {w for w, *_ in sparse}
    for gi, group in enumerate(opt.param_groups):
        if group["gmixout"]:
            for i, w in enumerate(group["params"]):
                st = opt._state.get(w)
                if w not in seen and st and status(st) != EMPTY:
                    sparse.append((w, group, gi, i))
    return sparse, dense


def fold_left_grad(opt: Any, w: torch.Tensor, st: dict, stacklevel: int) -> None:
    """A ``param.grad`` on a captured tensor (written outside backward): warn, and use it as
    autograd would have: added to what was captured (alone, it is gathered as without capture)."""
    if not opt._capture_grads or w.grad is None:
        return
    warnings.warn("GMixoutOptimizer(capture_grads=True) found a param.grad on a captured tensor (written "
                  "outside backward?); it is used as if backward had accumulated it", UserWarning,
                  stacklevel=stacklevel)
    if status(st) != EMPTY:
        add(st, w)
        w.grad = None


def clear_all(opt: Any) -> None:
    """``zero_grad``'s part: no captured / already gathered support gradient left."""
    for group in opt.param_groups:
        if group["gmixout"]:
            for w in group["params"]:
                st = opt._state.get(w)
                if st:
                    clear(st)


def clip_grad_norm(opt: Any, max_norm: float, norm_type: float, error_if_nonfinite: bool,
                   foreach: bool | None) -> torch.Tensor:
    """``GMixoutOptimizer.clip_grad_norm_`` (see there); called under ``torch.no_grad``."""
    max_norm = float(max_norm)
    norm_type = float(norm_type)
    if not max_norm >= 0.0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}")
    if not norm_type > 0.0:
        raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type!r}")
    sparse, dense = collect(opt)
    grads = []
    for w, group, gi, i in sparse:
        st = open_episode(opt, w, group, gi, i)
        fold_left_grad(opt, w, st, stacklevel=4)  # the caller's frame, through the method
        keep = 1.0 - group["p"]
        residual = st["residual"]
        if status(st) == SUMMED:
            residual.grad = scale(st, keep)
        elif status(st) == EMPTY:
            residual.grad = torch.empty_like(residual)
            kernels_for(local(w)).gather_grad(flat_grad(w), positions(w, st), st[SUPPORT_SIZE], keep, residual.grad)
            st[GRAD_STATUS] = SCALED
            if opt._capture_grads:  # a left-over gradient, now held compactly like a captured one
                w.grad = None
        grads.append(residual.grad[: st[SUPPORT_SIZE]])
    grads += [local(w.grad) for w in dense]
    sync = sync_group(opt._sync_group, opt.param_groups)
    total = total_norm(grads, norm_type, sync, foreach)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total})")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total
