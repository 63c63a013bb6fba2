"""Run examples/accelerate_finetune.py under Accelerate's FSDP or DeepSpeed plugin on CPU (tests only).

Accelerate enables these plugins only on accelerator devices. On a CPU-only machine:
- FSDP: with ACCELERATE_USE_CPU it reports MULTI_CPU and drops the plugin. The harness builds
  the plugin from the environment ``accelerate launch --config_file configs/accelerate/fsdp2.yaml``
  sets and marks the state FSDP, so Accelerate's own FSDP2 path (fully_shard, the swap of the
  optimizer's parameters, DCP save_state/load_state) runs over gloo.
- DeepSpeed (launched without ACCELERATE_USE_CPU, DS_ACCELERATOR=cpu): Accelerate reports one
  process on every rank; the harness sets the process count and index from torch.distributed.
On GPUs the example runs as is, without this file.
"""
import os
import runpy
import sys

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def _set(**values):
    # Both singletons: every AcceleratorState() re-reads PartialState's copy.
    PartialState._shared_state.update(values)
    AcceleratorState._shared_state.update(values)


example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "accelerate_finetune.py")
module = runpy.run_path(example)
accelerator = Accelerator()
if accelerator.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
    _set(distributed_type=DistributedType.FSDP)
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()
if accelerator.distributed_type == DistributedType.DEEPSPEED and dist.is_initialized():
    _set(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
         local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
module["main"](sys.argv[1:], accelerator)
