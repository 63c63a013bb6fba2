"""GMixout inside DeepSpeed (ZeRO stages 0-3, fp32/bf16, optimizer offload).

Two routes, both ending in the same optimizer class, :class:`DeepSpeedGMixout`:

* JSON config: call :func:`register` on every rank before ``deepspeed.initialize``, then
  ``{"optimizer": {"type": "GMixout", "params": {"inner": "AdamW", "lr": 1e-5, "p": 0.9, ...}}}``.
* client optimizer: ``deepspeed.initialize(model, optimizer=DeepSpeedGMixout(groups, ...))``
  or ``optimizer=client_optimizer(...)`` (a callable ``f(model_parameters)``).

Where the supports come from. ZeRO hands the optimizer flat fp32 tensors instead of
parameters; a support must be drawn from where each element sits in the logical model
(``GMixoutOptimizer.set_locator``), or sharding would change the training. The locator
installed here maps a tensor ``W`` of param group ``g`` to segments:

* stage 0 (``W`` is a model parameter ``j`` of group ``g``): one segment, key = the
  parameter's position over all groups (the plain optimizer's default key), offset 0;
* ZeRO-1/2 (``W`` is rank ``r``'s slice of group ``g`` flattened, ``|W| = n``): one
  segment ``(0, n, key=g, offset=r*n)``. Group ``g`` is flattened in parameter order with
  padding only at its end, so element offsets, hence supports, do not depend on the world
  size (``round_robin_gradients`` would break this and is refused by :func:`check_config`);
* ZeRO-3 (``W`` is a sub-group: the concatenated rank-``r`` pieces of parameters
  ``j0..j1``, each piece ``ceil(numel/world)`` long): one segment per parameter piece,
  key = the parameter's position as in stage 0, offset = ``r * piece_length``; padding is
  in no segment, so it is never trained. ZeRO-3 and stage 0 therefore draw the supports
  of the plain, unsharded optimizer.

Episodes count training steps: ZeRO calls ``step()`` once per group (ZeRO-1/2) or per
sub-group (ZeRO-3) per training step, always on a different tensor, and the core keeps
its counters per tensor. Steps that DeepSpeed skips on overflow never reach the optimizer;
non-finite gradients that do reach it are skipped by the core (``skip_nonfinite``).

Weights outside ``step()``: :func:`finalize`, :func:`consolidate` and :func:`anchor_weights`
work on the fp32 master partitions and copy them back into the model's (16-bit) weights.
Checkpoints across world sizes: :func:`load_checkpoint` (in :mod:`.deepspeed_checkpoint`).
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from gmixout_optim import GMixoutOptimizer, Segment, find_gmixout
from gmixout_optim.engine_internals import require

from .deepspeed_checkpoint import _saved_episodes, load_checkpoint  # noqa: F401 (_saved_episodes: tests)
from .deepspeed_config import NAME, check_config, check_params

__all__ = [
    "DeepSpeedGMixout", "register", "unregister", "is_registered", "client_optimizer",
    "check_config", "install_locator", "zero12_layout_locator", "finalize", "consolidate",
    "anchor_weights", "load_checkpoint", "gmixout_optimizer", "build_comm_op",
]

_ZERO3_SUBGROUP_ID = re.compile(r"^(\d+)_(\d+)$")  # ZeRO-3 flat sub-group ds_id: "firstid_lastid"


def _ds(obj: Any, name: str, purpose: str) -> Any:
    """A DeepSpeed internal, or a clear error naming it and the version tested."""
    return require(obj, name, engine="deepspeed", purpose=purpose)


# -- the optimizer class and its locator -------------------------------------------------

class DeepSpeedGMixout(GMixoutOptimizer):
    """``GMixoutOptimizer`` with the DeepSpeed locator installed (see the module docstring).

    Build it before ``deepspeed.initialize`` (DeepSpeed does so for the config route):
    the locator records each param group's parameters while they are still the model's.
    """

    def __init__(self, params: Any, inner: Any = None, **kwargs: Any) -> None:
        if kwargs.get("capture_grads"):
            raise ValueError(
                "capture_grads=True is not supported under DeepSpeed: DeepSpeed owns the gradient buffers (it "
                "reduces and partitions the gradients itself and hands the optimizer flat partitions that "
                "autograd never fills), so there is no backward hook to capture from; use capture_grads=False")
        _check_building_engine_config()
        super().__init__(params, inner, **kwargs)
        install_locator(self)


# The DeepSpeedEngine methods that build an optimizer from the config (the registered route)
# and from a client callable; the engine is the `self` of their frame.
_BUILDERS = {"_configure_basic_optimizer": False, "_configure_optimizer": True}  # name -> client route


def _check_building_engine_config() -> None:
    """:func:`check_config` on the config of the DeepSpeed engine that is building this optimizer.

    DeepSpeed gives an optimizer it builds no config, and a config GMixout cannot work with
    (stage 0 with bf16) would only fail at the first step; this finds the engine in the
    calling frames and refuses the config inside ``deepspeed.initialize``. An optimizer built
    before ``deepspeed.initialize`` (the instance route) is not checked here.
    """
    if "deepspeed.runtime.engine" not in sys.modules:
        return  # not built by DeepSpeed
    engine_cls = sys.modules["deepspeed.runtime.engine"].DeepSpeedEngine
    for name in _BUILDERS:  # a rename would silently skip the check: fail loudly instead
        _ds(engine_cls, name, "check the engine's config when it builds GMixout")
    frame = inspect.currentframe()
    try:
        while frame is not None:
            client = _BUILDERS.get(frame.f_code.co_name)
            engine = frame.f_locals.get("self")
            if client is not None and isinstance(engine, engine_cls):
                config = _ds(_ds(engine, "_config", "read the engine's config"), "_param_dict",
                             "read the engine's config")
                if client:  # a client callable: the config names no optimizer
                    check_config(config, client=True)
                else:
                    check_config(config, name=(config.get("optimizer") or {}).get("type", NAME))
                return
            frame = frame.f_back
    finally:
        del frame


def install_locator(opt: GMixoutOptimizer) -> None:
    """Install the DeepSpeed locator on ``opt``; call before ``deepspeed.initialize``."""
    groups = list(opt.param_groups)
    owners: list[list[torch.Tensor]] = []
    first_key = [opt.tensor_key(g, 0) for g in range(len(groups))]
    for gi, group in enumerate(groups):
        for t in group["params"]:
            if hasattr(t, "ds_id") and not hasattr(t, "ds_tensor"):
                raise RuntimeError(f"param group {gi} already holds DeepSpeed flat partitions: install the "
                                   "locator (build the optimizer) before deepspeed.initialize")
        owners.append(list(group["params"]))

    def group_of(gi: int) -> int:
        group = opt.param_groups[gi]
        for g, known in enumerate(groups):
            if known is group:  # ZeRO-1/2 shows one group at a time: find it by identity
                return g
        raise RuntimeError(f"param group {gi} was not in the optimizer when its locator was installed")

    def locate(w: torch.Tensor, gi: int, i: int) -> list[Segment]:
        g = group_of(gi)
        params = owners[g]
        for j, prm in enumerate(params):
            if prm is w:  # stage 0: the optimizer steps the model's own parameters
                return [Segment(0, w.numel(), first_key[g] + j, 0)]
        ds_id = getattr(w, "ds_id", None)
        if isinstance(ds_id, str):  # ZeRO-3 sub-group "firstid_lastid"
            return _zero3_segments(w, ds_id, params, first_key[g], g)
        return _zero12_segments(w, g, params)

    def source(w: torch.Tensor, gi: int, i: int, full: dict[int, torch.Tensor]):
        """``locate(w, gi, i)`` and, per segment key, the logical flat tensor it indexes, built
        from ``full`` (id of a model parameter -> its full fp32 value)."""
        g = group_of(gi)
        segments = locate(w, gi, i)
        if any(prm is w for prm in owners[g]) or isinstance(getattr(w, "ds_id", None), str):
            keyed = {first_key[g] + j: full[id(prm)] for j, prm in enumerate(owners[g]) if id(prm) in full}
        else:  # ZeRO-1/2: key g is the group flattened in parameter order
            keyed = {g: torch.cat([full[id(prm)].reshape(-1) for prm in owners[g] if prm.requires_grad])}
        return segments, keyed

    opt.set_locator(locate)
    _SOURCES[opt] = source
    # ZeRO shows each rank only its partition of the gradient: agree on skipping non-finite steps.
    opt.set_sync_group("world")


# optimizer -> its DeepSpeed layout (`source` in install_locator): writes saved fp32 masters back.
_SOURCES: "weakref.WeakKeyDictionary[GMixoutOptimizer, Callable]" = weakref.WeakKeyDictionary()


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _zero12_segments(w: torch.Tensor, g: int, params: list[torch.Tensor]) -> list[Segment]:
    # All ZeRO-1/2 partitions of a group have the same length n (the last one padded at its
    # end); data-parallel rank r holds elements [r*n, (r+1)*n) of the flattened group.
    n = w.numel()
    total = sum(p.numel() for p in params if p.requires_grad)
    if w.dim() != 1 or n * _world() < total:
        raise RuntimeError(f"param group {g}: a tensor of shape {tuple(w.shape)} is neither one of its "
                           f"parameters nor a ZeRO-1/2 flat partition of its {total} elements")
    return [Segment(0, n, g, _rank() * n)]


def _zero3_segments(w: torch.Tensor, ds_id: str, params: list[torch.Tensor], first_key: int,
                    g: int) -> list[Segment]:
    match = _ZERO3_SUBGROUP_ID.match(ds_id)
    if match is None:
        from gmixout_optim.engine_internals import EngineInternalsError, TESTED
        raise EngineInternalsError(f"a ZeRO-3 flat sub-group has ds_id {ds_id!r}; GMixout reads it as "
                                   f"'firstid_lastid' (deepspeed {TESTED['deepspeed']}) to locate its pieces")
    first, last = int(match[1]), int(match[2])
    ids = [getattr(p, "ds_id", None) for p in params]
    if first not in ids or last not in ids:
        raise RuntimeError(f"ZeRO-3 sub-group {ds_id} does not belong to param group {g}")
    j0, j1 = ids.index(first), ids.index(last)
    segments, start = [], 0
    for j in range(j0, j1 + 1):
        p = params[j]
        piece = _ds(p, "partition_numel", "locate ZeRO-3 parameter pieces")()
        rank = getattr(p, "ds_zero_partition_rank", None)
        rank = _rank() if rank is None else rank
        length = max(0, min(piece, _ds(p, "ds_numel", "locate ZeRO-3 parameter pieces") - rank * piece))
        if length:
            segments.append(Segment(start, length, first_key + j, rank * piece))
        start += piece
    if start != w.numel():
        raise RuntimeError(f"ZeRO-3 sub-group {ds_id}: pieces add up to {start} elements, "
                           f"the flat tensor has {w.numel()}")
    return segments


def zero12_layout_locator(opt: GMixoutOptimizer) -> Callable[[torch.Tensor, int, int], list[Segment]]:
    """Locator for a plain (unsharded) optimizer that draws ZeRO-1/2's supports.

    Parameter ``j`` of group ``g`` gets ``Segment(0, numel, key=g, offset=sum of the
    numels before it in g)``: the element offsets of DeepSpeed's flattened group. Use it to
    reproduce a ZeRO-1/2 run on one device (``opt.set_locator(zero12_layout_locator(opt))``).
    """
    offsets = []
    for group in opt.param_groups:
        acc, offs = 0, []
        for p in group["params"]:
            offs.append(acc)
            acc += p.numel()
        offsets.append(offs)
    return lambda w, gi, i: [Segment(0, w.numel(), gi, offsets[gi][i])]


# -- registration (the one patch) -------------------------------------------------------

def register(name: str = NAME) -> type:
    """Make ``{"optimizer": {"type": name}}`` resolve to :class:`DeepSpeedGMixout`.

    THIS IS THE ONLY PATCHING THIS LIBRARY DOES. DeepSpeed has no optimizer registry: a
    config type outside its own names is looked up as ``getattr(torch.optim, type)`` (case-
    sensitive), so this sets the attribute ``torch.optim.<name>``, nothing else. Call it on
    every rank (e.g. at import time of the training script) before ``deepspeed.initialize``.
    Idempotent; :func:`unregister` removes it. Refuses to shadow an existing torch.optim name.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a Python identifier, got {name!r}")
    current = getattr(torch.optim, name, None)
    if current is DeepSpeedGMixout:
        return DeepSpeedGMixout
    if current is not None:
        raise ValueError(f"torch.optim.{name} already exists ({current!r}); register under another name")
    setattr(torch.optim, name, DeepSpeedGMixout)
    return DeepSpeedGMixout


def unregister(name: str = NAME) -> None:
    """Undo :func:`register` (a no-op when ``torch.optim.<name>`` is not ours)."""
    if getattr(torch.optim, name, None) is DeepSpeedGMixout:
        delattr(torch.optim, name)


def is_registered(name: str = NAME) -> bool:
    return getattr(torch.optim, name, None) is DeepSpeedGMixout


def client_optimizer(**params: Any) -> Callable[[Any], DeepSpeedGMixout]:
    """A callable for ``deepspeed.initialize(optimizer=...)``: ``f(model_parameters)``.

    ``params`` are those of the config's ``"params"`` block; they are checked now.
    """
    check_params(params, where="client_optimizer")

    def build(model_parameters: Any) -> DeepSpeedGMixout:
        return DeepSpeedGMixout(model_parameters, **params)

    build.__name__ = build.__qualname__ = "GMixout"
    return build


# -- weights outside step(): finalize, consolidate, anchor_weights ----------------------

def gmixout_optimizer(engine: Any) -> GMixoutOptimizer:
    """The ``GMixoutOptimizer`` inside a DeepSpeed engine: :func:`gmixout_optim.find_gmixout`."""
    return find_gmixout(engine)


def _zero_stage(engine: Any) -> int:
    return int(_ds(engine, "zero_optimization_stage", "tell the ZeRO stage")())


@contextmanager
def _master_groups(engine: Any) -> Iterator[GMixoutOptimizer]:
    """Put the fp32 master tensors into ``param_groups`` (ZeRO-3 empties them outside step)."""
    opt = gmixout_optimizer(engine)
    zero = engine.optimizer
    if _zero_stage(engine) != 3:
        yield opt
        return
    purpose = "show the optimizer ZeRO-3's fp32 partitions outside step()"
    _ds(zero, "_set_fp32_optimizer_param_groups", purpose)()
    try:
        yield opt
    finally:
        _ds(zero, "_clear_fp32_optimizer_param_groups", purpose)()


def _sync_model_weights(engine: Any) -> None:
    """Copy the fp32 master partitions into the model's weights (all ranks)."""
    zero = engine.optimizer
    if _zero_stage(engine) == 3:
        purpose = "copy the merged fp32 partitions into ZeRO-3's model weights"
        reassign = _ds(zero, "_reassign_or_swap_out_partitioned_parameters", purpose)
        for sub_group_id in range(len(_ds(zero, "fp32_partitioned_groups_flat", purpose))):
            reassign(sub_group_id)
    elif zero is not gmixout_optimizer(engine):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer hold masters
        _ds(zero, "update_lp_params", "copy the merged fp32 partitions into the model's 16-bit weights")()
    # stage 0 without a wrapper: the optimizer holds the model's parameters themselves


def finalize(engine: Any, merge_running: bool = True) -> None:
    """``GMixoutOptimizer.finalize`` on every rank; the model then holds the anchor (a plain model)."""
    with _master_groups(engine) as opt:
        opt.finalize(merge_running=merge_running)
    _sync_model_weights(engine)


def consolidate(engine: Any) -> None:
    """``GMixoutOptimizer.consolidate`` on every rank: afterwards a checkpoint loads on any world size."""
    with _master_groups(engine) as opt:
        opt.consolidate()
    _sync_model_weights(engine)


@contextmanager
def anchor_weights(engine: Any) -> Iterator[Any]:
    """Within the block the model holds the anchor; training weights come back afterwards."""
    with _master_groups(engine) as opt:
        ctx = opt.anchor_weights()
        ctx.__enter__()
    _sync_model_weights(engine)
    try:
        yield engine
    finally:
        with _master_groups(engine):
            ctx.__exit__(None, None, None)
        _sync_model_weights(engine)


# -- the shared-memory comm op ----------------------------------------------------------

def build_comm_op() -> Any:
    """Build (once) DeepSpeed's CPU shared-memory comm op into ``TORCH_EXTENSIONS_DIR``.

    Every ``deepspeed.initialize`` on a CPU accelerator loads it; the first load compiles
    it (about 40-70 s on 2 cores) and later ones reuse the cached build (about 0.1 s).
    Run ``python -m gmixout_optim.integrations.deepspeed`` once after installing.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    return None if builder is None else builder.load()


if __name__ == "__main__":
    print(build_comm_op())
