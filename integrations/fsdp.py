"""GMixout under PyTorch FSDP2 (``fully_shard``) and FSDP1, with distributed checkpoints.

**FSDP2 needs nothing but the optimizer line.** ``GMixoutOptimizer`` recognises DTensor
parameters: it works in place on each local shard, draws supports from the shard's global
element offsets (``Segment(start, length, key, offset)``, ``key`` the parameter's position in
``param_groups``, ``offset`` the global flat index; an FSDP2 ``Shard(0)`` shard of a
``(rows, ...)`` tensor holding rows ``[r0, r1)`` is one segment at ``r0 * numel/rows``, a size-0
shard has none), has the ranks of a shard group agree on skipping non-finite steps, and writes
its compact state for DCP as DTensors (see :mod:`gmixout_optim.checkpoint`). So a 1-rank and a
2-rank run draw the same supports, and plain ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` / ``dcp.save`` / ``dcp.load`` checkpoint it:

- same world size: exact resume mid-episode;
- another world size: ``opt.consolidate()`` before saving (no compact state is left) and load
  with ``DefaultLoadPlanner(allow_partial_load=True)`` (the fresh target holds compact keys
  that the checkpoint lacks); :func:`load` does this. A mid-episode checkpoint on another
  world size fails in DCP with a size mismatch naming the key;
- DCP's initialisation step (zero gradients, lr 0) creates state and changes no weight nor
  counter (handled by the core optimizer).

**FSDP1** flat parameters need the wrapped model to be located: call :func:`attach`
``(opt, model)`` after wrapping (it is also a harmless, idempotent call for FSDP2 and plain
optimizers). FSDP1 checkpoints go through the optimizer's own ``state_dict()`` per rank
(``FSDP.optim_state_dict`` expects state shaped like the flat parameter and does not apply).
"""
from __future__ import annotations

from typing import Callable

from gmixout_optim import Segment, find_gmixout
from gmixout_optim.engine_internals import require
from gmixout_optim.sharding import default_segments, dtensor_segments

__all__ = ["attach", "dtensor_segments", "locator", "save", "load"]


def _fsdp1_pieces(model) -> dict:
    """FSDP1: tensor -> (length, offset) of its local piece in the logical tensor it belongs to.

    ``use_orig_params=False``: the optimizer holds each unit's sharded FlatParameter; rank
    ``r`` holds elements ``[r*c, r*c + c - pad)`` of the unsharded flat tensor, ``c`` the padded
    shard size. ``use_orig_params=True``: it holds each original parameter as a 1-D view of
    its piece ``[intra_param_start_idx, intra_param_end_idx]`` of the parameter (or a size-0
    tensor on ranks that hold none of it).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def field(obj, name):
        return require(obj, name, engine="torch", purpose="locate FSDP1 flat-parameter shards")

    pieces: dict = {}
    for unit in FSDP.fsdp_modules(model):
        handle = field(unit, "_handle")
        if handle is None:  # a unit that owns no parameters
            continue
        flat = field(handle, "flat_param")
        size = field(flat, "_sharded_size").numel()
        pieces[flat] = (size - field(flat, "_shard_numel_padded"), field(handle, "rank") * size)
        params = field(flat, "_params")
        if params is not None:
            for param, info in zip(params, field(flat, "_shard_param_infos")):
                pieces[param] = ((field(info, "numel_in_shard"), field(info, "intra_param_start_idx"))
                                 if field(info, "in_shard") else (0, 0))
    return pieces


def locator(opt, model=None) -> Callable:
    """A locator for ``opt.set_locator``: FSDP1 pieces (needs ``model``), otherwise the
    optimizer's default (DTensor shards at their global offsets, plain tensors at offset 0)."""
    core = find_gmixout(opt)
    pieces = _fsdp1_pieces(model) if model is not None else {}

    def locate(t, group_index: int, index: int) -> list[Segment]:
        if t in pieces:
            length, offset = pieces[t]
            return [Segment(0, length, core.tensor_key(group_index, index), offset)] if length else []
        return default_segments(t, core.param_groups, group_index, index)

    return locate


def attach(opt, model=None) -> Callable:
    """Make ``opt`` (a GMixoutOptimizer, or one inside an Accelerate wrapper) sharding-aware.

    FSDP2 and plain optimizers need no call (this one then changes nothing that matters);
    FSDP1 needs ``attach(opt, model)`` after wrapping, before the first step: it sets the
    locator of the flat-parameter pieces and agrees step decisions over the model's process
    group. Returns the locator.
    """
    core = find_gmixout(opt)
    locate = locator(core, model)
    core.set_locator(locate)
    # Each rank sees only its shard of the gradient: agree on skipping non-finite steps.
    core.set_sync_group(getattr(model, "process_group", None) if model is not None else "auto")
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
