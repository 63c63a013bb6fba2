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

from .sharding import agrees_alone, flat_grad, is_dtensor, local
from .state import GRAD, GRAD_STATUS, SUPPORT_SIZE, ensure_grad_buffer, positions

__all__ = ["EMPTY", "SUMMED", "SCALED", "check_tensor", "check_world", "install_hook", "install_dense_hook", "add",
           "scale", "clear", "status", "total_norm"]

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


_OWNER = "_gmixout_capture_owner"  # on a captured tensor: a weak reference to the optimizer capturing it


def install_hook(opt: Any, w: torch.Tensor, where: str) -> Any:
    """Register the capture hook on ``w``. The hook holds the optimizer weakly and acts only while
    that optimizer is the tensor's owner: the newest capturing optimizer of a tensor takes its
    gradients (a rebuilt optimizer replaces the old one; warned if the old one is still alive)."""
    old = getattr(w, _OWNER, None)
    if old is not None and old() is not None and old() is not opt:
        warnings.warn(f"the parameter{where} was captured by another live GMixoutOptimizer(capture_grads=True); "
                      "this one takes its gradients from now on", UserWarning, stacklevel=4)
    ref = weakref.ref(opt)
    setattr(w, _OWNER, ref)

    def hook(param: torch.Tensor) -> None:
        owner = ref()
        if owner is not None and getattr(param, _OWNER, None) is ref:
            owner._capture(param)

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
    buf[:n] = buf[:n] / keep
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

    device = total.device
    if "nccl" in str(dist.get_backend(sync)) and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if math.isinf(norm_type):
        out = total.to(device, torch.float32)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=sync)
    else:  # the p-th powers add up over shards
        out = total.to(device, torch.float32) ** norm_type
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=sync)
        out = out ** (1.0 / norm_type)
    return out.to(total.device)
