"""GMixout under PyTorch FSDP2 (``fully_shard``) and FSDP1, with distributed checkpoints.

One call, after the model is sharded and the optimizer built (FSDP2 through Accelerate: any
time, everything here is looked up lazily from the parameters)::

    from gmixout_optim.integrations import fsdp
    fsdp.attach(opt)            # FSDP2 / plain / DDP
    fsdp.attach(opt, model)     # FSDP1 (flat parameters need the wrapped model)

**Where elements live.** Supports are drawn per logical element (see ``set_locator``). A
tensor's local piece is described by segments ``Segment(start, length, key, offset)``:
``key`` is the parameter's position in ``param_groups`` (the default key of a plain
single-process optimizer over the same parameters), ``offset`` the global flat index of the
piece's first element. An FSDP2 ``Shard(0)`` shard of a ``(rows, ...)`` tensor holding rows
``[r0, r1)`` is one segment with ``offset = r0 * numel/rows``; a size-0 shard has none. So a
1-rank and a 2-rank run draw the same supports and differ only by gradient-reduction rounding.

**Checkpoints (DCP).** The optimizer's per-tensor compact state (support indices, residual,
16-bit anchor, the inner optimizer's vectors) is rank-local: it is not a slice of a dense
tensor, and DCP would keep one rank's copy of a plain tensor (it treats plain tensors as
replicated). The ``state_dict`` post-hook therefore wraps each compact vector of length
``c_r`` as a DTensor of global shape ``(shards, C)``, ``Shard(0)`` over the parameter's shard
mesh dimension (``Replicate`` elsewhere), each rank padding its row to the common capacity
``C = support_capacity(padded shard numel, 1-p)`` (padding -1 for indices, 0 otherwise).
The load pre-hook strips the padding and recomputes the segments (they depend on the rank,
and DCP keeps one rank's copy of non-tensor values). Consequences:

- same world size: exact resume mid-episode with plain ``dcp.save`` / ``dcp.load``;
- another world size: ``opt.consolidate()`` before saving (no compact state is left) and load
  with ``DefaultLoadPlanner(allow_partial_load=True)`` (the fresh target holds compact keys
  that the checkpoint lacks); :func:`load` does this. A mid-episode checkpoint on another
  world size fails in DCP with a size mismatch naming the key;
- DCP's initialisation step (``_init_optim_state``: zero gradients, lr 0) creates state and
  changes no weight nor counter (handled by the core optimizer). Compact state that is still
  at its initial value (episode step 0, residual and inner state zero) is dropped on load and
  redrawn at the next step, which draws the same support.

FSDP1 flat parameters train with the same locator; their checkpoints go through the
optimizer's own ``state_dict()`` per rank (``FSDP.optim_state_dict`` expects state shaped
like the flat parameter and does not apply).
"""
from __future__ import annotations

import itertools
import json
import math
from typing import Any, Callable

import torch

from gmixout_optim.kernels import Segment, support_capacity
from gmixout_optim.optimizer import COMPACT_KEYS

__all__ = ["attach", "dtensor_segments", "locator", "install_dcp_hooks", "save", "load"]

_CONFIG_KEY = "gmixout_config"  # the core's top-level config block rides in param group 0 through DCP


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _shard_mesh_dim(p) -> tuple[int, int]:
    """(mesh dim, tensor dim) of the one ``Shard`` placement of DTensor ``p``."""
    from torch.distributed.tensor import Shard
    shards = [(m, pl.dim) for m, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(shards) > 1:
        raise ValueError(f"GMixout's FSDP glue supports one Shard placement per parameter (FSDP or HSDP), "
                         f"got placements {p.placements}")
    return shards[0] if shards else (-1, -1)


def dtensor_segments(p, key: int) -> list[Segment]:
    """Segments of DTensor ``p``'s local shard (row-major, contiguous) in the global flat tensor.

    The local block spans ``local_shape`` at global index ``offset``; the elements it holds
    form ``prod(local_shape[:k])`` runs of ``local_shape[k] * prod(shape[k+1:])`` elements,
    ``k`` the last dimension the shard does not cover fully (one run for ``Shard(0)``).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape = tuple(p.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
    numel = math.prod(local_shape)
    if numel == 0:
        return []
    if len(shape) == 0:
        return [Segment(0, 1, key, 0)]
    local = p.to_local()
    if not local.is_contiguous():
        raise ValueError(f"GMixout needs contiguous local shards; a DTensor of shape {shape} with placements "
                         f"{p.placements} has a strided local shard {tuple(local.stride())}")
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    partial = [d for d in range(len(shape)) if local_shape[d] != shape[d]]
    k = partial[-1] if partial else 0
    run = local_shape[k] * strides[k]
    segments = []
    for r, outer in enumerate(itertools.product(*(range(n) for n in local_shape[:k]))):
        start = sum((offset[d] + outer[d]) * strides[d] for d in range(k)) + offset[k] * strides[k]
        segments.append(Segment(r * run, run, key, start))
    return segments


def _fsdp1_pieces(model) -> dict:
    """FSDP1: tensor -> (length, offset) of its local piece in the logical tensor it belongs to.

    ``use_orig_params=False``: the optimizer holds each unit's sharded FlatParameter; rank
    ``r`` holds elements ``[r*c, r*c + c - pad)`` of the unsharded flat tensor, ``c`` the padded
    shard size. ``use_orig_params=True``: it holds each original parameter as a 1-D view of
    its piece ``[intra_param_start_idx, intra_param_end_idx]`` of the parameter (or a size-0
    tensor on ranks that hold none of it).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    pieces: dict = {}
    for unit in FSDP.fsdp_modules(model):
        handle = getattr(unit, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        size = flat._sharded_size.numel()
        pieces[flat] = (size - flat._shard_numel_padded, handle.rank * size)
        if flat._params is not None:
            for param, info in zip(flat._params, flat._shard_param_infos):
                pieces[param] = ((info.numel_in_shard, info.intra_param_start_idx) if info.in_shard else (0, 0))
    return pieces


def locator(opt, model=None) -> Callable:
    """A locator for ``opt.set_locator``: FSDP2 DTensor shards, FSDP1 pieces (needs ``model``),
    and plain tensors (one segment at offset 0, as the default)."""
    pieces = _fsdp1_pieces(model) if model is not None else {}

    def locate(t, group_index: int, index: int) -> list[Segment]:
        key = sum(len(g["params"]) for g in opt.param_groups[:group_index]) + index
        if _is_dtensor(t):
            return dtensor_segments(t, key)
        if t in pieces:
            length, offset = pieces[t]
            return [Segment(0, length, key, offset)] if length else []
        return [Segment(0, t.numel(), key, 0)]

    return locate


# -- DCP state hooks -------------------------------------------------------------------------

def _common_capacity(p, keep: float) -> int:
    """Support capacity of the largest (padded) shard: the same on every rank."""
    mesh_dim, dim = _shard_mesh_dim(p)
    if mesh_dim < 0:
        return support_capacity(p.numel(), keep)
    shape = list(p.shape)
    shape[dim] = -(-shape[dim] // p.device_mesh.size(mesh_dim))
    return support_capacity(math.prod(shape), keep)


def _wrap(value: torch.Tensor, p, capacity: int, local_capacity: int, name: str):
    """Rank-local vector -> DTensor ``(shards, capacity)``, this rank's row padded."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if value.numel() != local_capacity:
        raise ValueError(f"compact state {name!r} has {value.numel()} elements, expected the buffer capacity "
                         f"{local_capacity} (a grown support buffer cannot be checkpointed through DCP)")
    fill = -1 if not value.is_floating_point() else 0
    row = value.new_full((1, capacity), fill)
    row[0, :local_capacity] = value
    mesh_dim, _ = _shard_mesh_dim(p)
    placements = [Shard(0) if m == mesh_dim else Replicate() for m in range(p.device_mesh.ndim)]
    shards = p.device_mesh.size(mesh_dim) if mesh_dim >= 0 else 1
    return DTensor.from_local(row, p.device_mesh, placements, run_check=False,
                              shape=torch.Size((shards, capacity)), stride=(capacity, 1))


def _unwrap(value, local_capacity: int):
    if _is_dtensor(value):
        return value.to_local()[0, :local_capacity]
    return value


def _per_element(inner: dict, capacity: int) -> list[str]:
    return [k for k, v in inner.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() == capacity]


def _param_map(opt, state_dict: dict) -> dict:
    """State key -> (parameter, group, group index, index in group), by position as torch loads."""
    out = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, state_dict["param_groups"])):
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            out[pid] = (p, group, gi, i)
    return out


def install_dcp_hooks(opt, locate: Callable) -> None:
    """Register the ``state_dict`` post-hook and ``load_state_dict`` pre-hook described above
    (once; a later call only replaces the locator they recompute segments with)."""
    already = hasattr(opt, "_gmixout_locate")
    opt._gmixout_locate = locate
    if already:
        return

    def post_hook(optimizer, state_dict: dict) -> dict:
        params = _param_map(optimizer, state_dict)
        state = {}
        for pid, entry in state_dict["state"].items():
            p, group, _, _ = params[pid]
            entry = dict(entry)
            if group["gmixout"]:
                entry.pop("segments", None)  # rank-dependent; recomputed on load
                if _is_dtensor(p) and "support" in entry:
                    keep = 1.0 - group["p"]
                    cap, local_cap = _common_capacity(p, keep), support_capacity(p.to_local().numel(), keep)
                    for key in COMPACT_KEYS:
                        if key in entry:
                            entry[key] = _wrap(entry[key], p, cap, local_cap, key)
                    inner = dict(entry.get("inner", {}))
                    for key in _per_element(inner, local_cap):
                        inner[key] = _wrap(inner[key], p, cap, local_cap, "inner." + key)
                    entry["inner"] = inner
            state[pid] = entry
        groups = [dict(g) for g in state_dict["param_groups"]]
        if "gmixout" in state_dict and groups:
            groups[0][_CONFIG_KEY] = json.dumps(state_dict["gmixout"], sort_keys=True)
        out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
        out.update(state=state, param_groups=groups)
        return out

    def pre_hook(optimizer, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        groups = [dict(g) for g in state_dict["param_groups"]]
        config = groups[0].pop(_CONFIG_KEY, None) if groups else None
        if config is not None and "gmixout" not in state_dict:
            state_dict["gmixout"] = json.loads(config)
        state_dict["param_groups"] = groups
        params = _param_map(optimizer, state_dict)
        state = {}
        for pid, entry in state_dict["state"].items():
            if pid not in params:
                state[pid] = entry
                continue
            p, group, gi, i = params[pid]
            entry = dict(entry)
            if group["gmixout"]:
                entry["segments"] = [list(s) for s in optimizer._gmixout_locate(p, gi, i)]
                if "support" in entry:
                    local_cap = support_capacity(p.to_local().numel() if _is_dtensor(p) else p.numel(),
                                                 1.0 - group["p"])
                    for key in COMPACT_KEYS:
                        if key in entry:
                            entry[key] = _unwrap(entry[key], local_cap)
                    entry["inner"] = {k: _unwrap(v, local_cap) for k, v in entry.get("inner", {}).items()}
                    if _at_initial_value(entry):
                        for key in COMPACT_KEYS + ("inner",):
                            entry.pop(key, None)
                elif int(entry.get("episode_step", 0)) != 0:
                    raise ValueError(f"optimizer state {pid!r} is mid-episode (episode_step="
                                     f"{entry['episode_step']}) but holds no support: the compact state was "
                                     "not loaded (was the load target built without it?)")
            state[pid] = entry
        state_dict["state"] = state
        return state_dict

    opt.register_state_dict_post_hook(post_hook)
    opt.register_load_state_dict_pre_hook(pre_hook)


def _at_initial_value(entry: dict) -> bool:
    """True when the compact state equals what the next step would redraw: episode step 0,
    residual and every inner tensor zero (a fresh optimizer, or a consolidated checkpoint
    loaded into a fresh target)."""
    if int(entry.get("episode_step", 0)) != 0 or bool(entry["residual"].any()):
        return False
    return not any(bool(v.any()) if torch.is_tensor(v) else bool(v) for v in entry.get("inner", {}).values())


def attach(opt, model=None) -> Callable:
    """Set the sharding-aware locator and the DCP hooks on ``opt`` (a GMixoutOptimizer, or an
    Accelerate-wrapped one). Call before the first step. Returns the locator."""
    core = getattr(opt, "optimizer", opt)  # accelerate.AcceleratedOptimizer keeps it as .optimizer
    if not hasattr(core, "set_locator"):
        raise TypeError(f"attach expects a GMixoutOptimizer, got {type(core).__name__}")
    locate = locator(core, model)
    core.set_locator(locate)
    install_dcp_hooks(core, locate)
    # Each rank sees only its shard of the gradient: agree on skipping non-finite steps.
    core.set_sync_group(getattr(model, "process_group", None) if model is not None else "shards")
    return locate


# -- DCP convenience -------------------------------------------------------------------------

def save(model, opt, checkpoint_id, *, process_group=None) -> None:
    """``dcp.save`` of ``{"model", "optim"}`` (sharded state dicts) to ``checkpoint_id``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_id, process_group=process_group)


def load(model, opt, checkpoint_id, *, process_group=None) -> None:
    """Load a :func:`save` checkpoint into ``model``/``opt`` (any world size if it was saved
    after ``opt.consolidate()``; the same world size otherwise)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    model_part, optim_part = {"model": model_sd}, {"optim": optim_sd}
    dcp.load(model_part, checkpoint_id=checkpoint_id, process_group=process_group)  # strict
    # partial: a consolidated checkpoint has no compact state; the target keeps its own, which
    # the load hook recognises as initial and drops (see the module docstring)
    dcp.load(optim_part, checkpoint_id=checkpoint_id, process_group=process_group,
             planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, opt, model_state_dict=model_part["model"], optim_state_dict=optim_part["optim"])
