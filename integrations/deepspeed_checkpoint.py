"""DeepSpeed checkpoints across world sizes: :func:`load_checkpoint` (re-exported by
:mod:`gmixout_optim.integrations.deepspeed`).

Same world size: DeepSpeed's own load. Another world size, after ``consolidate(engine)``:
DeepSpeed loads the weights only, from a view of the checkpoint folder in which the tag loads as
on the saving world size; the fp32 master weights are then set to the saved ones (read with
DeepSpeed's ``zero_to_fp32``) and each GMixout group restarts at the saved episode.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from gmixout_optim.checkpoint import find_state_dict, restart_episodes_of
from gmixout_optim.engine_internals import require_import

__all__ = ["load_checkpoint"]


def load_checkpoint(engine: Any, load_dir: str, tag: str | None = None, **kwargs: Any):
    """``engine.load_checkpoint`` that also changes world size after :func:`.deepspeed.consolidate`.

    Same world size: DeepSpeed's own load (exact resume, mid-episode included). Another
    world size: DeepSpeed loads the weights only (it refuses optimizer state then), from a
    view of ``load_dir`` in which ``tag`` is the newest tag and every rank finds a
    model-states file (DeepSpeed's ZeRO-3 load would otherwise read the weights of the newest
    tag, whatever ``tag`` says, and fail on more ranks than saved); then the fp32 master
    weights are set to the saved ones exactly (DeepSpeed rebuilds them from the 16-bit
    weights of a bf16 run) and each GMixout tensor restarts at the saved episode, so the next
    step starts the next episode. The checkpoint must have been saved after
    :func:`.deepspeed.consolidate` (no running episode), else ``ValueError``. Dense groups restart
    their inner optimizer state, as with any DeepSpeed world-size change.
    """
    from .deepspeed import _master_groups, _world  # (imported here: deepspeed.py imports this module)

    if tag is None:
        with open(os.path.join(load_dir, "latest")) as f:
            tag = f.read().strip()
    saved_world = len(_optim_files(load_dir, tag))  # one optimizer-state file per rank
    if saved_world in (0, _world()):
        return engine.load_checkpoint(load_dir, tag, **kwargs)
    episodes = _saved_episodes(load_dir, tag)
    masters = _saved_masters(load_dir, tag)
    kwargs["load_optimizer_states"] = False
    with _tag_view(load_dir, tag) as view:
        load_path, client_state = engine.load_checkpoint(view, tag, **kwargs)
        if isinstance(load_path, str):
            load_path = load_path.replace(view, os.path.abspath(load_dir), 1)
    if masters is not None:
        _write_masters(engine, masters)
    with _master_groups(engine) as opt:
        for g, number in episodes.items():
            opt.restart_episodes(number, g)
    return load_path, client_state


@contextmanager
def _tag_view(load_dir: str, tag: str) -> Iterator[str]:
    """A private folder of links in which DeepSpeed loads ``tag`` as on the saving world size:
    ``latest`` names ``tag``, and a rank without a ZeRO-3 model-states file gets a link to rank
    0's (client state, lr scheduler and step counters are the same on every rank)."""
    from .deepspeed import _world

    view = tempfile.mkdtemp(prefix="gmixout_ds_load_")
    try:
        src = os.path.abspath(os.path.join(load_dir, tag))
        dst = os.path.join(view, tag)
        os.makedirs(dst)
        for name in os.listdir(src):
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
        for first in glob.glob(os.path.join(src, "zero_pp_rank_0_mp_rank_*_model_states.pt")):
            for rank in range(1, _world()):
                name = os.path.basename(first).replace("zero_pp_rank_0_", f"zero_pp_rank_{rank}_", 1)
                if not os.path.exists(os.path.join(dst, name)):
                    os.symlink(first, os.path.join(dst, name))
        with open(os.path.join(view, "latest"), "w") as f:
            f.write(tag)
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def _saved_masters(load_dir: str, tag: str) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights saved at ``tag`` (parameter name -> full tensor), read by
    DeepSpeed's ``zero_to_fp32``; None, with a warning, for a checkpoint it cannot read
    (DeepSpeed's BF16_Optimizer)."""
    read = require_import("deepspeed.utils.zero_to_fp32", "get_fp32_state_dict_from_zero_checkpoint",
                          engine="deepspeed", purpose="read the fp32 master weights of a checkpoint")
    try:
        return read(load_dir, tag=tag)
    except Exception as err:  # noqa: BLE001 - zero_to_fp32 raises assorted errors on formats it cannot read
        warnings.warn(f"the fp32 master weights of {load_dir}/{tag} cannot be read ({type(err).__name__}: {err}); "
                      "training goes on from the masters DeepSpeed rebuilt from the model's weights (rounded to "
                      "16 bits in a bf16 run)", RuntimeWarning, stacklevel=3)
        return None


@torch.no_grad()
def _write_masters(engine: Any, masters: dict[str, torch.Tensor]) -> None:
    """Set every fp32 master partition from the saved full weights, then the model's weights."""
    from .deepspeed import _SOURCES, _master_groups, _sync_model_weights

    full = {id(prm): masters[name].float() for name, prm in engine.module.named_parameters() if name in masters}
    with _master_groups(engine) as opt:
        source = _SOURCES.get(opt)
        if source is None:
            raise RuntimeError("the engine's GMixoutOptimizer has no DeepSpeed locator: build it as "
                               "DeepSpeedGMixout, or call install_locator before deepspeed.initialize")
        for gi, group in enumerate(opt.param_groups):
            for i, w in enumerate(group["params"]):
                segments, keyed = source(w, gi, i, full)
                flat = w.detach().view(-1)
                for seg in segments:
                    values = keyed[seg.key].reshape(-1)[seg.offset:seg.offset + seg.length]
                    flat[seg.start:seg.start + values.numel()].copy_(values)
    _sync_model_weights(engine)


def _optim_files(load_dir: str, tag: str) -> list[str]:
    return sorted(glob.glob(os.path.join(load_dir, tag, "*optim_states.pt")))


def _saved_episodes(load_dir: str, tag: str) -> dict[int, int]:
    """Per GMixout group: the episode the next step starts, read from rank 0's saved state."""
    blob = torch.load(_optim_files(load_dir, tag)[0], map_location="cpu", weights_only=False)
    sd = find_state_dict(blob)
    if sd is None:
        raise ValueError(f"{load_dir}/{tag} holds no GMixoutOptimizer state")
    try:
        return restart_episodes_of(sd)
    except ValueError as err:
        raise ValueError(f"checkpoint {tag}: {err} (consolidate(engine) in this module)") from None
