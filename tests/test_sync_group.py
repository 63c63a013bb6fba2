"""Step decisions agreed across ranks (``GMixoutOptimizer.set_sync_group``), 2 gloo processes.

Each rank holds a different shard, as under ZeRO or FSDP, so only one rank may see a
non-finite gradient or an all-zero one. Without agreement the ranks would diverge: one skips
(or only lays out state) while the other steps. The workers return what they observed; the
assertions run here.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import launch
from gmixout_optim import GMixoutOptimizer

WORLD = 2


def _worker(rank: int, init_file: str, sync: bool, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)
        w = torch.nn.Parameter(torch.randn(4096))
        opt = GMixoutOptimizer([w], lr=1e-2, p=0.5, resample_every=3)
        if sync:
            opt.set_sync_group("world")
        log = {}
        # Step 1: rank 0's shard has all-zero gradients (an init step there alone), rank 1's not.
        w.grad = torch.zeros_like(w) if rank == 0 else torch.randn_like(w)
        before = w.detach().clone()
        opt.step()
        log["episode_step_1"] = opt.state[w]["episode_step"]
        log["changed_1"] = bool((w.detach() != before).any())
        # Step 2: a NaN on rank 1's support only.
        w.grad = torch.randn_like(w)
        if rank == 1:
            support = opt.state[w]["support"][:10].long()
            w.grad[support] = float("nan")
        before = w.detach().clone()
        opt.step()
        log["skipped_2"] = opt.skipped_steps
        log["changed_2"] = bool((w.detach() != before).any())
        log["episode_step_2"] = opt.state[w]["episode_step"]
        results[rank] = log
    finally:
        dist.destroy_process_group()


def _run(tmp_path, sync: bool) -> dict:
    manager = mp.Manager()
    results = manager.dict()
    launch.spawn(_worker, args=(str(tmp_path / f"init-{sync}"), sync, results), nprocs=WORLD, timeout=120)
    return dict(results)


def test_ranks_agree_on_init_and_nonfinite_steps(tmp_path):
    agreed = _run(tmp_path, sync=True)
    for rank in range(WORLD):
        log = agreed[rank]
        # Rank 1 had real gradients, so step 1 is a real step on both ranks (rank 0's zero
        # gradient then changes nothing, but the step counts).
        assert log["episode_step_1"] == 1, (rank, log)
        # Rank 1 saw a NaN: both ranks skip step 2 and nothing changes anywhere.
        assert log["skipped_2"] == 1 and not log["changed_2"] and log["episode_step_2"] == 1, (rank, log)
    assert agreed[1]["changed_1"]


def test_without_agreement_the_ranks_diverge(tmp_path):
    """The control: the same run without a sync group takes different decisions per rank."""
    alone = _run(tmp_path, sync=False)
    assert alone[0]["episode_step_1"] == 0 and alone[1]["episode_step_1"] == 1
    assert alone[0]["skipped_2"] == 0 and alone[0]["changed_2"]
    assert alone[1]["skipped_2"] == 1 and not alone[1]["changed_2"]


def _dtensor_worker(rank: int, init_file: str, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gmixout_optim import Segment

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(64, 8), mesh, [Shard(0)]))
        w.grad = distribute_tensor(torch.randn(64, 8), mesh, [Shard(0)])
        opt = GMixoutOptimizer([w], lr=1e-2, p=0.5)  # no attach: the optimizer sees the DTensor
        before = w.to_local().clone()
        opt.step()
        results["changed"] = bool((w.to_local() != before).any())
        results["segments"] = [tuple(s) for s in opt.state[w]["segments"]]
        results["expected"] = [tuple(Segment(0, 512, 0, 0))]
    finally:
        dist.destroy_process_group()


def test_dtensor_is_located_without_attach(tmp_path):
    """FSDP2 needs no extra call: a DTensor parameter trains at once, keyed by its global offsets."""
    results = mp.Manager().dict()
    launch.spawn(_dtensor_worker, args=(str(tmp_path / "init-dtensor"), results), nprocs=1, timeout=120)
    assert results["changed"]
    assert results["segments"] == results["expected"]
