"""GMixout under Hugging Face Accelerate (plain DDP, FSDP2, FSDP1 and DeepSpeed plugins).

``accelerator.prepare(model, GMixoutOptimizer(...))`` works as is for single-process and DDP
runs. Sharding plugins need the supports located in the logical model and checkpoints that
keep every rank's compact state; :func:`prepare` does both around ``accelerator.prepare``::

    from gmixout_optim.integrations.accelerate import prepare
    model, opt, loader = prepare(accelerator, model, opt, loader)

- FSDP2 / DDP: nothing (the optimizer places DTensor shards itself and writes its compact
  state as DTensors for DCP, which Accelerate's ``save_state`` / ``load_state`` use for FSDP2
  with ``SHARDED_STATE_DICT``); FSDP1: :func:`gmixout_optim.integrations.fsdp.attach` with the
  prepared model (flat parameters are located through it);
- DeepSpeed: :func:`gmixout_optim.integrations.deepspeed.install_locator` before DeepSpeed
  wraps the optimizer (it records the parameters of each group while they are the model's);
  keep ``"optimizer"`` out of the DeepSpeed config (Accelerate refuses both) and set
  ``zero_force_ds_cpu_optimizer: false`` when offloading the optimizer, or Accelerate swaps
  the optimizer for DeepSpeedCPUAdam.

Nothing here changes Accelerate itself; all the glue sits on the optimizer.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from gmixout_optim import GMixoutOptimizer, find_gmixout

__all__ = ["prepare", "unwrap_optimizer"]


def unwrap_optimizer(opt: Any) -> GMixoutOptimizer:
    """The GMixoutOptimizer inside an ``AcceleratedOptimizer`` (or a DeepSpeed engine's):
    :func:`gmixout_optim.find_gmixout`."""
    return find_gmixout(opt)


def prepare(accelerator: Any, *objects: Any) -> Any:
    """``accelerator.prepare(*objects)`` plus the GMixout glue for the active plugin.

    Exactly one of ``objects`` must be a GMixoutOptimizer (and one a model, for the sharded
    plugins). Returns what ``accelerator.prepare`` returns.
    """
    from accelerate.utils import DistributedType

    opts = [o for o in objects if isinstance(o, GMixoutOptimizer)]
    if len(opts) != 1:
        raise ValueError(f"prepare expects exactly one GMixoutOptimizer among the objects, got {len(opts)}")
    opt = opts[0]
    kind = accelerator.distributed_type
    if os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true") and kind != DistributedType.FSDP:
        # Accelerate honours an FSDP config only on accelerators (not with --cpu / use_cpu: true) and
        # then runs plain data parallel without a word: every rank holds the whole model.
        warnings.warn(
            f"the Accelerate config asks for FSDP (ACCELERATE_USE_FSDP is set) but Accelerate runs "
            f"{getattr(kind, 'value', kind)}, without sharding (it ignores FSDP on CPU): every rank holds the "
            "whole model and optimizer state. GMixout trains correctly; to shard on CPU, call torch's "
            "fully_shard yourself (docs/accelerate.md)", UserWarning, stacklevel=2)
    if kind == DistributedType.DEEPSPEED:
        from gmixout_optim.integrations import deepspeed as ds
        ds.install_locator(opt)
    prepared = accelerator.prepare(*objects)
    fsdp1 = kind == DistributedType.FSDP and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1
    if fsdp1:  # FSDP2 and DDP need nothing: the optimizer handles DTensor shards itself
        from torch import nn

        from gmixout_optim.integrations import fsdp
        result = prepared if isinstance(prepared, tuple) else (prepared,)
        models = [m for m in result if isinstance(m, nn.Module)]
        if not models:
            raise ValueError("FSDP1 needs the model among the objects: its flat parameters are located through it")
        fsdp.attach(opt, models[0])
    return prepared
