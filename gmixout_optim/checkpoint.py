"""GMixoutOptimizer's checkpoint format and its sharded (DCP) view.

``state_dict()`` is torch's layout (state keyed by position in ``param_groups``) plus a
``gmixout`` block ``{format, merge, state_policy, seed, inner, skipped_steps, unstepped}``,
also stored as JSON under ``param_groups[0]["gmixout_config"]`` because
``torch.distributed.checkpoint.state_dict`` keeps only ``state`` and ``param_groups``.
``skipped_steps`` is the optimizer's count of skipped non-finite steps; ``unstepped`` lists the
parameter ids whose inner state an init-only step laid out and no real step has reached yet
(see ``step.initialize_inner``); both default to none when a checkpoint lacks them. A GMixout
tensor's entry holds ``episode``, ``episode_step`` and, inside an episode, ``support`` /
``residual`` / ``anchor`` and the inner optimizer's state of the residual under ``inner``.

Formats: **3** (written now) stores the anchor for every dtype, ``skipped_steps`` and
``unstepped``. **2** stored the anchor of 16-bit tensors only: an fp32/fp64 tensor's anchor is
derived once, at its first use after the load, as ``W[S] - v/keep`` (``state.anchor``). Both
leave out ``segments``: they are where this rank's elements sit, recomputed on load by the
optimizer's locator (``GMixoutOptimizer.locate``). **1** saved them; a format-1 entry with
``segments`` loads as saved (anchors as in format 2).

**Sharded view.** For a DTensor (FSDP2) parameter the compact vectors are rank-local, not
slices of a dense tensor, and DCP keeps one rank's copy of a plain tensor. Each compact vector
of length ``c_r`` is therefore saved as a DTensor of global shape ``(shards, C)``, ``Shard(0)``
over the parameter's shard mesh dimension (``Replicate`` elsewhere), every rank padding its row
to the common capacity ``C`` (that of the largest, padded shard; padding -1 for indices, 0
otherwise). Loading strips the padding. An entry without ``segments`` may come from DCP's
partial load into a fresh target, which keeps the target's own episode-0 compact state: compact
state still at its initial value (episode step 0, residual and inner state zero) is dropped and
redrawn at the next step, which draws the support of the loaded episode.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import torch

from . import grouped, hparams
from .kernels import Segment
from .sharding import is_dtensor, local, shard_mesh_dim
from .state import COMPACT_KEYS, capacity, drop_compact, load_compact, per_element_keys

__all__ = ["FORMAT", "READABLE_FORMATS", "CONFIG_KEY", "state_dict", "load_state_dict", "save", "load",
           "find_state_dict", "restart_episodes_of", "restart_episodes", "copy_state", "restore_inner"]

FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
CONFIG_KEY = "gmixout_config"


def config(opt) -> dict:
    return {"format": FORMAT, "merge": opt.merge_rule, "state_policy": opt.state_policy,
            "seed": opt.seed, "inner": type(opt.inner).__name__}


# -- the sharded view ------------------------------------------------------------------------

def _common_capacity(p: Any, keep: float) -> int:
    """Support capacity of the largest (padded) shard: the same on every rank."""
    mesh_dim, dim = shard_mesh_dim(p)
    if mesh_dim < 0:
        return capacity(p.numel(), keep)
    shape = list(p.shape)
    shape[dim] = -(-shape[dim] // p.device_mesh.size(mesh_dim))
    return capacity(math.prod(shape), keep)


def _wrap(value: torch.Tensor, p: Any, common: int, length: int, name: str) -> Any:
    """Rank-local vector -> DTensor ``(shards, common)``, this rank's row padded."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if value.numel() != length:
        raise ValueError(f"compact state {name!r} has {value.numel()} elements, expected the buffer capacity "
                         f"{length} (a grown support buffer cannot be checkpointed through DCP)")
    row = value.new_full((1, common), -1 if not value.is_floating_point() else 0)
    row[0, :length] = value
    mesh_dim, _ = shard_mesh_dim(p)
    placements = [Shard(0) if m == mesh_dim else Replicate() for m in range(p.device_mesh.ndim)]
    shards = p.device_mesh.size(mesh_dim) if mesh_dim >= 0 else 1
    return DTensor.from_local(row, p.device_mesh, placements, run_check=False,
                              shape=torch.Size((shards, common)), stride=(common, 1))


def _unwrap(value: Any, length: int) -> Any:
    return value.to_local()[0, :length] if is_dtensor(value) else value


def _sharded_entry(entry: dict, p: Any, keep: float) -> dict:
    common, length = _common_capacity(p, keep), capacity(local(p).numel(), keep)
    for key in COMPACT_KEYS:
        if key in entry:
            entry[key] = _wrap(entry[key], p, common, length, key)
    inner = dict(entry.get("inner", {}))
    for key in per_element_keys(inner, length):
        inner[key] = _wrap(inner[key], p, common, length, "inner." + key)
    entry["inner"] = inner
    return entry


# -- save ------------------------------------------------------------------------------------

def state_dict(opt, unstepped: set) -> dict[str, Any]:
    """The optimizer's checkpoint (see the module docstring); ``unstepped``: the tensors whose
    inner state is only laid out (residuals, dense parameters)."""
    packed_groups, state, index, unstepped_ids = [], {}, 0, []
    for group in opt.param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = list(range(index, index + len(group["params"])))
        for w, pid in zip(group["params"], packed["params"]):
            st = opt.state.get(w)
            if not st:
                continue
            if (st.get("residual") if group["gmixout"] else w) in unstepped:
                unstepped_ids.append(pid)
            if not group["gmixout"]:
                state[pid] = dict(st)
                continue
            entry = {"episode": st["episode"], "episode_step": st["episode_step"]}
            if "residual" in st:
                entry.update((k, st[k]) for k in COMPACT_KEYS if k in st)
                entry["inner"] = dict(opt.state.get(st["residual"], {}))
                if is_dtensor(w):
                    entry = _sharded_entry(entry, w, 1.0 - group["p"])
            state[pid] = entry
        index += len(group["params"])
        packed_groups.append(packed)
    block = dict(config(opt), skipped_steps=opt.skipped_steps, unstepped=unstepped_ids)
    if packed_groups:
        packed_groups[0][CONFIG_KEY] = json.dumps(block, sort_keys=True)
    return {"state": state, "param_groups": packed_groups, "gmixout": block}


def save(opt) -> dict[str, Any]:
    """``GMixoutOptimizer.state_dict``'s work: :func:`state_dict` between torch's state-dict hooks."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    sd = state_dict(opt, opt._unstepped)
    for hook in opt._optimizer_state_dict_post_hooks.values():
        result = hook(opt, sd)
        if result is not None:
            sd = result
    return sd


# -- load ------------------------------------------------------------------------------------

def load(opt, sd: dict[str, Any]) -> None:
    """``GMixoutOptimizer.load_state_dict``'s work: :func:`load_state_dict` between torch's hooks."""
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, sd)
        if result is not None:
            sd = result
    opt._unstepped = load_state_dict(opt, sd)
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def load_state_dict(opt, state_dict: dict[str, Any]) -> set:
    """Load a ``state_dict()`` of a readable format (possibly through DCP) into ``opt``; returns
    the tensors whose inner state is only laid out (the saved ``unstepped``)."""
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"not a GMixoutOptimizer state_dict (top-level keys: {keys})")
    saved_groups = [dict(g) for g in state_dict["param_groups"]]
    block_json = saved_groups[0].pop(CONFIG_KEY, None) if saved_groups else None
    block = state_dict.get("gmixout")
    if block is None and block_json is not None:
        block = json.loads(block_json)
    _check_compatible(opt, block, saved_groups)
    index = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        index.update((pid, (w, group, gi, i)) for i, (pid, w) in enumerate(zip(saved["params"], group["params"])))
    opt.state = defaultdict(dict)  # the setter shares it with the inner optimizer
    saved_unstepped, unstepped = set(block.get("unstepped", ())), set()
    for pid, entry in state_dict["state"].items():
        if pid not in index:
            raise ValueError(f"state_dict has state for parameter id {pid}, which no param group lists")
        w, group, gi, i = index[pid]
        if group["gmixout"]:
            _load_gmixout_entry(opt, w, dict(entry), group, gi, i, pid)
        else:
            opt.state[w] = {k: _to_like(v, w, k, group) for k, v in entry.items()}
        if pid in saved_unstepped:
            unstepped.add(opt.state[w].get("residual") if group["gmixout"] else w)
    opt.skipped_steps = int(block.get("skipped_steps", 0))
    for group, saved in zip(opt.param_groups, saved_groups):
        for key, value in saved.items():
            if key != "params":
                group[key] = value
    unstepped.discard(None)
    return unstepped


def _load_gmixout_entry(opt, w: torch.Tensor, entry: dict, group: dict, gi: int, i: int, pid: Any) -> None:
    st = {"episode": int(entry["episode"]), "episode_step": int(entry["episode_step"])}
    keep = 1.0 - group["p"]
    if "segments" in entry:  # format 1: as saved
        st["segments"] = [Segment(*map(int, s)) for s in entry["segments"]]
    else:
        st["segments"] = opt.locate(w, gi, i)
        if "support" in entry:
            length = capacity(local(w).numel(), keep)
            for key in COMPACT_KEYS:
                if key in entry:
                    entry[key] = _unwrap(entry[key], length)
            entry["inner"] = {k: _unwrap(v, length) for k, v in entry.get("inner", {}).items()}
            if _at_initial_value(entry):
                for key in COMPACT_KEYS + ("inner",):
                    entry.pop(key, None)
        elif st["episode_step"] != 0:
            raise ValueError(f"optimizer state {pid!r} is mid-episode (episode_step={st['episode_step']}) but "
                             "holds no support: the compact state was not loaded (was the load target built "
                             "without it?)")
    if "support" in entry:
        load_compact(w, st, entry, keep)
        inner = entry.get("inner", {})
        if inner:
            residual = st["residual"]
            opt.state[residual] = {k: _to_like(v, residual, k, group) for k, v in inner.items()}
    opt.state[w] = st


def _at_initial_value(entry: dict) -> bool:
    """True when the compact state equals what the next step would redraw: episode step 0,
    residual and every inner tensor zero."""
    if int(entry.get("episode_step", 0)) != 0 or bool(entry["residual"].any()):
        return False
    return not any(bool(v.any()) if torch.is_tensor(v) else bool(v) for v in entry.get("inner", {}).values())


def _check_compatible(opt, block: Any, saved_groups: list[dict]) -> None:
    if not isinstance(block, dict):
        raise ValueError("not a GMixoutOptimizer state_dict: it has no 'gmixout' block (nor a "
                         f"'{CONFIG_KEY}' in param group 0)")
    if block.get("format") not in READABLE_FORMATS:
        raise ValueError(f"state_dict has format {block.get('format')!r}; this version of gmixout_optim reads "
                         f"formats {READABLE_FORMATS}: load it with the version that wrote it")
    mine = config(opt)
    for key in mine:
        if key != "format" and block.get(key) != mine[key]:
            raise ValueError(f"state_dict was saved with {key}={block.get(key)!r}, "
                             f"this optimizer has {key}={mine[key]!r}")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                         f"{len(opt.param_groups)}")
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"param group {gi}: state_dict has {len(saved['params'])} parameters, "
                             f"this optimizer has {len(group['params'])}")
        for key in hparams.GROUP_KEYS:
            value = hparams.check(key, saved.get(key), f" of saved param group {gi}")
            if value != group[key]:
                raise ValueError(f"param group {gi} was saved with {key}={saved.get(key)!r}, "
                                 f"this optimizer has {key}={group[key]!r}")


def _to_like(value: Any, like: torch.Tensor, key: str, group: dict) -> Any:
    """Copy a loaded state value next to ``like`` as torch's loader would, but never cast integers.

    Floating values take ``like``'s dtype and device; ``step`` stays where it was saved
    unless the group is fused or capturable (then it lives on ``like``'s device, fp32).
    """
    if not torch.is_tensor(value):
        return value
    if key == "step":
        if group.get("fused") or group.get("capturable"):
            return value.to(dtype=torch.float32, device=like.device, copy=True)
        return value.clone()
    if not value.is_floating_point():
        return value.to(device=like.device, copy=True)
    return value.to(device=like.device, dtype=like.dtype, copy=True)


# -- reading a saved checkpoint without an optimizer -------------------------------------------

def find_state_dict(obj: Any, depth: int = 0) -> dict | None:
    """The GMixoutOptimizer state_dict inside an engine's saved blob (searched 3 levels deep)."""
    if isinstance(obj, dict):
        if "gmixout" in obj and "state" in obj and "param_groups" in obj:
            return obj
        if depth < 3:
            for value in obj.values():
                found = find_state_dict(value, depth + 1)
                if found is not None:
                    return found
    return None


def restart_episodes_of(state_dict: dict) -> dict[int, int]:
    """Per GMixout param group: the episode its next step starts, for a checkpoint saved
    between episodes (after ``consolidate()``); ``ValueError`` if one is running."""
    episodes: dict[int, int] = {}
    for g, group in enumerate(state_dict["param_groups"]):
        if not group.get("gmixout"):
            continue
        entries = [state_dict["state"][pid] for pid in group["params"] if pid in state_dict["state"]]
        seen = {(e["episode"], e["episode_step"], "residual" in e) for e in entries}
        if any(step or running for _, step, running in seen):
            raise ValueError(f"the checkpoint was saved inside an episode (param group {g}); call "
                             "consolidate() before saving a checkpoint to load on another world size")
        if len({e for e, _, _ in seen}) > 1:
            raise ValueError(f"param group {g} holds tensors at different episodes: {sorted(seen)}")
        episodes[g] = next(iter(seen))[0] if seen else 0
    return episodes


def restart_episodes(opt, episode_number: int, group_index: int | None) -> None:
    """``GMixoutOptimizer.restart_episodes`` (see there) after its argument check."""
    for gi, group in enumerate(opt.param_groups):
        if group["gmixout"] and group_index in (None, gi):
            for w in group["params"]:
                opt._unstepped.discard(opt._state.get(w, {}).get("residual"))
                drop_compact(opt._state, opt._state.get(w, {}))
                opt._state[w] = {"episode": episode_number, "episode_step": 0}


# -- copies (copy.deepcopy, pickle) -------------------------------------------------------------

def copy_state(opt) -> dict:
    """``GMixoutOptimizer.__getstate__`` (see there)."""
    if opt._locator is not None:
        raise TypeError("a GMixoutOptimizer with a locator (set by an engine integration: DeepSpeed, FSDP1) "
                        "cannot be copied: the locator refers to the original tensors. Copy it before the "
                        "engine takes it, or save and load its state_dict()")
    grouped.settle(opt)  # the copy's cache starts empty (its tables point at our tensors)
    state = dict(opt.__dict__)
    state.pop(grouped.CACHE_ATTR, None)
    # The inner optimizer travels as its class and attributes: its own __setstate__ would
    # "upgrade" the state of every parameter it lists, which for a GMixout tensor is
    # GMixout's entry, not the inner optimizer's.
    state["_inner"] = (type(opt._inner), dict(opt._inner.__dict__))
    return state


def restore_inner(state: dict) -> dict:
    """``state`` (a :func:`copy_state`) with its inner optimizer rebuilt, for ``Optimizer.__setstate__``."""
    cls, attrs = state["_inner"]
    inner = cls.__new__(cls)
    inner.__dict__.update(attrs)
    inner._patch_step_function()
    state["_inner"] = inner
    return state
