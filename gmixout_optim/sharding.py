"""Where a tensor's elements sit in the logical model, and which ranks must agree on a step.

- :func:`local`: this rank's elements of a tensor (a DTensor's local shard, as a view).
- :func:`memory_order`, :func:`flat`, :func:`flat_grad`: a local tensor's elements in memory
  order as a writable 1-D view (channels_last and transposed weights included), its gradient
  in the same order; :func:`memory_positions` maps row-major indices to positions in it.
- :func:`default_key`: the logical-tensor key of a parameter: its position in ``param_groups``
  (computed here only; locators of the integrations use it too).
- :func:`dtensor_segments`: the global element offsets of a DTensor's local shard.
- :func:`default_segments`: what the optimizer uses when no locator is set (DTensors included,
  so FSDP2 needs no extra call).
- :func:`sync_group` / :func:`agree`: the process group whose ranks take the same step decisions.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from .engine_internals import require_import
from .kernels import Segment

__all__ = ["is_dtensor", "local", "memory_order", "check_layout", "flat", "flat_grad", "memory_positions", "default_key", "shard_mesh_dim", "dtensor_segments", "default_segments",
           "check_segments", "shard_group", "sync_group", "agrees_alone", "agree", "vote_device", "SYNC_SETTINGS"]

try:  # FSDP2 parameters are DTensors: the optimizer works on their local shards.
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # pragma: no cover - torch built without distributed
    _DTensor = None

# set_sync_group's named settings; "auto" (the default) is "shards" when a parameter is a DTensor.
SYNC_SETTINGS = ("auto", "shards", "world")


def is_dtensor(t: Any) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's elements of ``t``: a DTensor's local shard (a view: in-place writes reach
    the parameter, e.g. FSDP2's sharded storage), any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def memory_order(t: torch.Tensor) -> list[int] | None:
    """The dimensions of ``t`` from outermost to innermost in memory; None when row-major.

    Supports are sets of logical (row-major) elements, so a weight in any memory layout trains
    like its contiguous twin; the kernels address it through :func:`flat`. That needs the
    elements to fill their memory span densely without overlap (contiguous, channels_last, a
    transposed leaf: a permutation of a contiguous tensor); ValueError otherwise.
    """
    if t.is_contiguous():
        return None
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    if not t.permute(dims).is_contiguous():
        raise ValueError(f"a tensor of shape {tuple(t.shape)} with strides {tuple(t.stride())} does not fill its "
                         "memory densely (a view with gaps or overlaps), so it cannot be updated in place through "
                         "a flat view")
    return dims


def check_layout(w: torch.Tensor, gi: int, i: int) -> None:
    """:func:`memory_order` of parameter ``i`` of param group ``gi``, its ValueError saying what to pass."""
    try:
        memory_order(local(w))
    except ValueError as err:
        raise ValueError(f"param group {gi}, parameter {i}: {err}; pass a dense copy, e.g. "
                         "nn.Parameter(w.detach().contiguous())") from None


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in memory order as a 1-D view (in-place writes reach ``t``)."""
    dims = memory_order(t)
    return t.view(-1) if dims is None else t.permute(dims).view(-1)


def flat_grad(w: torch.Tensor) -> torch.Tensor:
    """``w.grad``'s local elements in the order of ``flat(local(w))`` (a copy when the
    gradient's layout differs from the weight's, e.g. a non-contiguous gradient)."""
    dims = memory_order(local(w))
    grad = local(w.grad)
    return grad.reshape(-1) if dims is None else grad.permute(dims).reshape(-1)


def memory_positions(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Positions in ``flat(t)`` of the row-major flat ``indices`` of ``t`` (int64)."""
    rest, pos = indices.long(), torch.zeros_like(indices, dtype=torch.int64)
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        pos += (rest % size) * stride
        rest = rest // size
    return pos


def default_key(param_groups: list[dict], group_index: int, index: int) -> int:
    """The key of parameter ``index`` of group ``group_index``: its position over all groups."""
    return sum(len(g["params"]) for g in param_groups[:group_index]) + index


def shard_mesh_dim(p: Any) -> tuple[int, int]:
    """(mesh dim, tensor dim) of the one ``Shard`` placement of DTensor ``p``; (-1, -1) if none."""
    from torch.distributed.tensor import Shard
    shards = [(m, pl.dim) for m, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(shards) > 1:
        raise ValueError(f"GMixout supports one Shard placement per DTensor parameter (FSDP or HSDP), "
                         f"got placements {p.placements}")
    return shards[0] if shards else (-1, -1)


def dtensor_segments(p: Any, key: int) -> list[Segment]:
    """Segments of DTensor ``p``'s local shard (row-major, contiguous) in the global flat tensor.

    The local block spans ``local_shape`` at global index ``offset``; the elements it holds
    form ``prod(local_shape[:k])`` runs of ``local_shape[k] * prod(shape[k+1:])`` elements,
    ``k`` the last dimension the shard does not cover fully (one run for ``Shard(0)``).
    """
    compute = require_import("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset",
                             engine="torch", purpose="place a DTensor shard's elements in the logical tensor")
    shape = tuple(p.shape)
    local_shape, offset = compute(shape, p.device_mesh, p.placements)
    if math.prod(local_shape) == 0:
        return []
    if len(shape) == 0:
        return [Segment(0, 1, key, 0)]
    shard = p.to_local()
    if not shard.is_contiguous():
        raise ValueError(f"GMixout needs contiguous local shards; a DTensor of shape {shape} with placements "
                         f"{p.placements} has a strided local shard {tuple(shard.stride())}")
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    partial = [d for d in range(len(shape)) if local_shape[d] != shape[d]]
    k = partial[-1] if partial else 0
    run = local_shape[k] * strides[k]
    segments = []
    for r, outer in enumerate(itertools.product(*(range(n) for n in local_shape[:k]))):
        start = sum((offset[d] + outer[d]) * strides[d] for d in range(k)) + offset[k] * strides[k]
        segments.append(Segment(r * run, run, key, start))
    return segments


def default_segments(w: torch.Tensor, param_groups: list[dict], group_index: int, index: int) -> list[Segment]:
    """One segment keyed by :func:`default_key`; a DTensor's shard at its global offsets."""
    key = default_key(param_groups, group_index, index)
    if is_dtensor(w):
        return dtensor_segments(w, key)
    return [Segment(0, w.numel(), key, 0)]


def check_segments(segments: list[Segment], w: torch.Tensor) -> list[Segment]:
    numel = local(w).numel()
    for seg in segments:
        if seg.start < 0 or seg.length < 0 or seg.start + seg.length > numel or seg.offset < 0:
            raise ValueError(f"locator returned {seg} for a tensor of {numel} elements")
    return segments


def shard_group(t: Any) -> Any:
    """The process group over which DTensor ``t`` is sharded (None if it is only replicated)."""
    mesh_dim, _ = shard_mesh_dim(t)
    return t.device_mesh.get_group(mesh_dim) if mesh_dim >= 0 else None


_NO_AGREEMENT = object()


def sync_group(setting: Any, param_groups: list[dict]) -> Any:
    """The process group a step's decisions are agreed over (``None``: the default group),
    or :data:`_NO_AGREEMENT` when this rank decides alone (see ``set_sync_group``)."""
    if setting is None:
        return _NO_AGREEMENT
    if setting in ("auto", "shards"):
        first = next((w for g in param_groups for w in g["params"] if is_dtensor(w)), None)
        group = shard_group(first) if first is not None else None
        return _NO_AGREEMENT if group is None else group
    if setting == "world":
        import torch.distributed as dist
        return None if dist.is_initialized() and dist.get_world_size() > 1 else _NO_AGREEMENT
    return setting


def agrees_alone(group: Any) -> bool:
    return group is _NO_AGREEMENT


def agree(group: Any, init_only: bool, finite: bool) -> tuple[bool, bool]:
    """The step decisions, agreed over ``group``: any rank's non-finite gradient skips the step
    on all; an init-only step happens only when it is one on every rank."""
    if group is _NO_AGREEMENT:
        return init_only, finite
    import torch.distributed as dist
    votes = torch.tensor([float(not init_only), float(not finite)], device=vote_device(group))
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return votes[0].item() == 0.0, votes[1].item() == 0.0


def vote_device(group: Any) -> torch.device:
    """Where the ranks' votes are all-reduced: the current CUDA device under NCCL, else the CPU
    (the grouped step votes there too, with the same two values, so the ranks' calls match)."""
    import torch.distributed as dist
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
