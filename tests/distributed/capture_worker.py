"""Gradient capture on 2 gloo ranks (driven by tests/test_capture.py).

usage: torchrun --nproc_per_node 2 capture_worker.py OUT_DIR

FSDP2: the same sharded run with ``capture_grads`` on and off must give bitwise equal weights
(FSDP2 calls the sharded parameter's post-accumulate-grad hooks after the reduce-scatter, so
the hook sees the reduced gradient shard; two micro-batches per step exercise accumulation
across backward passes). Three settings: fp32 parameters; bf16 parameters (reduced in bf16);
fp32 parameters with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``.
DDP, and any multi-rank run whose GMixout tensors are not DTensors, must be refused: the hook
would capture the local gradient, before DDP's all-reduce averages it.
Rank 0 writes OUT_DIR/capture_results.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import fsdp_common as C  # noqa: E402

from gmixout_optim.integrations import fsdp  # noqa: E402

STEPS, MICRO = 7, 2  # resample_every=3 (fsdp_common.make_opt): two merges and redraws


def fsdp2_run(mesh, rank, capture, dtype=None, mp=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = C.make_model()
    if dtype is not None:
        model = model.to(dtype)
    kw = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    opt = C.make_opt(model, capture_grads=capture)
    fsdp.attach(opt)
    start = C.flat_params(model)
    sparse = [w for g in opt.param_groups if g["gmixout"] for w in g["params"]]
    dense = [w for g in opt.param_groups if not g["gmixout"] for w in g["params"]]
    left = shared = 0
    in_dtype = dtype or mp or torch.float32
    for step in range(STEPS):
        for m in range(MICRO):
            x, y = C.rank_batch(MICRO * step + m, rank)
            (C.loss_fn(model(x.to(in_dtype)), y) / MICRO).backward()
            if capture:
                left += sum(w.grad is not None for w in sparse)
                # a dense shard gradient must not keep FSDP2's whole reduce-scatter buffer alive
                for w in dense:
                    g = w.grad.to_local()
                    shared += g.untyped_storage().nbytes() > g.numel() * g.element_size()
        opt.step()
        opt.zero_grad(set_to_none=True)
    end = C.flat_params(model)
    return end, C.max_diff(end, start), left, shared


def refused(build) -> str:
    try:
        build()
    except ValueError as e:
        return str(e)
    return "not refused"


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (2,))
    res = {}
    for name, kw in (("fsdp2_fp32", {}), ("fsdp2_bf16", {"dtype": torch.bfloat16}),
                     ("fsdp2_fp32_mp_bf16", {"mp": torch.bfloat16})):
        plain, trained, _, _ = fsdp2_run(mesh, rank, False, **kw)
        captured, _, left, shared = fsdp2_run(mesh, rank, True, **kw)
        res[name] = {"max_diff": C.max_diff(captured, plain), "trained": trained, "dense_grads_left": left,
                     "dense_grads_sharing_a_buffer": shared}

    ddp = DDP(C.make_model())
    res["ddp_refused"] = refused(lambda: C.make_opt(ddp.module, capture_grads=True))
    res["multi_rank_plain_refused"] = refused(lambda: C.make_opt(C.make_model(), capture_grads=True))
    if rank == 0:
        with open(os.path.join(out_dir, "capture_results.json"), "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
