"""FSDP2 / FSDP1 checks in one 2-process gloo launch (driven by tests/test_fsdp.py).

usage: torchrun --nproc_per_node 2 fsdp_worker.py OUT_DIR

Every run trains the same tiny model on the same global batches and is compared with the
plain single-process GMixoutOptimizer emulating 2-way data parallelism (fsdp_common.py).
"1 rank" runs use FSDP2 on a one-rank sub-mesh of rank 0. Rank 0 writes the measured
differences to OUT_DIR/fsdp_results.json. Tolerances (see TOL) are explained there.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

sys.path.insert(0, os.path.dirname(__file__))
import fsdp_common as C  # noqa: E402

from gmixout_optim.integrations import fsdp  # noqa: E402

# Largest accepted |difference| against the plain reference. The emulated reference sums the
# same two per-rank gradients (each divided by 2, exactly) in fp32, so runs are expected to agree
# bit for bit; 1e-6 on weights of size ~0.3 (a few fp32 ulps accumulated over 14 steps of an
# update bounded by |grad diff|/eps * lr = 1e-7/1e-4 * 1e-2) leaves room for a different
# association order inside a collective, while a wrong support or a skipped / doubled step
# moves weights by ~lr = 1e-2. bf16: the reference runs the same bf16 forward/backward per rank
# and reduces in fp32 (as MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)), so the
# same bound holds. Resumes replay identical arithmetic: 0.
TOL = {"fp32": 1e-6, "bf16": 1e-6, "resume": 0.0}


def fsdp2_model(mesh, mp=None, offload=False, attach=False):
    """FSDP2 needs only the optimizer line: ``attach`` (a no-op there) is called only when asked."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    model = C.make_model()
    kw = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    opt = C.make_opt(model)
    if attach:
        fsdp.attach(opt)
    return model, opt


def sharded_step(model, opt, step, rank, world):
    """World 2: this rank's half. World 1: both halves, each loss / 2 (gradient accumulation)."""
    if world == 2:
        x, y = C.rank_batch(step, rank)
        C.loss_fn(model(x), y).backward()
    else:
        for h in range(2):
            x, y = C.rank_batch(step, h)
            (C.loss_fn(model(x), y) / 2).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(model, opt, steps, rank, world):
    for s in steps:
        sharded_step(model, opt, s, rank, world)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    mesh2 = init_device_mesh("cpu", (2,))
    g1 = dist.new_group([0])
    mesh1 = DeviceMesh.from_group(g1, "cpu") if rank == 0 else None
    res = {}

    # Plain single-process reference (computed on every rank, no communication).
    pm = C.make_model()
    popt = C.make_opt(pm)
    start = C.flat_params(pm)
    for s in range(1, 11):
        C.plain_step(pm, popt, s)
    p10 = C.flat_params(pm)
    popt.consolidate()
    for s in range(11, 15):
        C.plain_step(pm, popt, s)
    p14 = C.flat_params(pm)
    bm = C.make_model()
    bopt = C.make_opt(bm)
    shadow = C.bf16_shadow(bm)
    for s in range(1, 11):
        C.plain_step(bm, bopt, s, shadow=shadow)
    b10 = C.flat_params(bm)

    # 1. FSDP2 fp32, 2 ranks, no attach, vs the plain reference; checkpoints mid-episode (plain
    # torch DCP calls) and consolidated.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    ck_mid, ck_cons, ck_one = (os.path.join(out_dir, n) for n in ("ck_mid", "ck_cons", "ck_one"))
    model, opt = fsdp2_model(mesh2)
    run(model, opt, range(1, 8), rank, 2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ck_mid)  # step 7: episode 2, step 1 of 3
    run(model, opt, range(8, 11), rank, 2)
    r10 = C.flat_params(model)
    C.assert_same_support(r10, p10, start, "fsdp2 fp32 step 10")
    res["fsdp2_fp32_vs_plain"] = C.assert_close(r10, p10, TOL["fp32"], "fsdp2 fp32 step 10")
    opt.consolidate()
    fsdp.save(model, opt, ck_cons)
    run(model, opt, range(11, 15), rank, 2)
    r14 = C.flat_params(model)
    res["fsdp2_fp32_after_consolidate_vs_plain"] = C.assert_close(r14, p14, TOL["fp32"], "fsdp2 step 14")

    # 2. DCP init step changes nothing; mid-episode resume (plain DCP calls) is exact.
    model, opt = fsdp2_model(mesh2)
    before = C.flat_params(model)
    osd = get_optimizer_state_dict(model, opt)
    after = C.flat_params(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "DCP init step changed a weight"
    for entry in opt.state.values():
        if "episode" in entry:
            assert entry["episode"] == 0 and entry["episode_step"] == 0, entry
    inner_steps = [float(st["step"]) for st in opt.state.values() if "step" in st]
    assert inner_steps and all(s == 0 for s in inner_steps), f"init step counted: {inner_steps}"
    assert any(hasattr(v, "placements") for e in osd["state"].values() for v in e.values()), \
        "compact state was not wrapped as DTensors"
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ck_mid)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    run(model, opt, range(8, 11), rank, 2)
    resumed = C.flat_params(model)
    res["dcp_resume_same_world"] = C.assert_close(resumed, r10, TOL["resume"], "DCP mid-episode resume")

    # 3. 2 -> 1 after consolidate (rank 0, one-rank mesh); then save for 1 -> 2.
    w18 = None
    if rank == 0:
        model, opt = fsdp2_model(mesh1)
        fsdp.load(model, opt, ck_cons, process_group=g1)
        run(model, opt, range(11, 15), rank, 1)
        one14 = C.flat_params(model)
        res["dcp_2to1_vs_2rank"] = C.assert_close(one14, r14, TOL["fp32"], "2 -> 1 resume")
        C.assert_same_support(one14, r14, start, "2 -> 1 resume")
        opt.consolidate()
        fsdp.save(model, opt, ck_one, process_group=g1)
        run(model, opt, range(15, 19), rank, 1)
        w18 = C.flat_params(model)
    dist.barrier()

    # 4. 1 -> 2.
    model, opt = fsdp2_model(mesh2)
    fsdp.load(model, opt, ck_one)
    run(model, opt, range(15, 19), rank, 2)
    two18 = C.flat_params(model)
    if rank == 0:
        res["dcp_1to2_vs_1rank"] = C.assert_close(two18, w18, TOL["fp32"], "1 -> 2 resume")

    # 5. bf16 mixed precision vs the bf16-emulating reference.
    model, opt = fsdp2_model(mesh2, mp=torch.bfloat16, attach=True)  # attach: a harmless explicit call
    run(model, opt, range(1, 11), rank, 2)
    m10 = C.flat_params(model)
    C.assert_same_support(m10, b10, start, "fsdp2 bf16")
    res["fsdp2_bf16_vs_plain"] = C.assert_close(m10, b10, TOL["bf16"], "fsdp2 bf16 step 10")

    # 6. CPU offload of parameters.
    model, opt = fsdp2_model(mesh2, offload=True)
    run(model, opt, range(1, 11), rank, 2)
    res["fsdp2_offload_vs_plain"] = C.assert_close(C.flat_params(model), p10, TOL["fp32"], "fsdp2 offload")

    # 7. HSDP: 2 replicas of 1 shard (2-D mesh, placements (Replicate, Shard(0))): training and
    # an exact mid-episode DCP resume (compact state: (1, C) DTensors replicated over dim 0).
    mesh_hsdp = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    model, opt = fsdp2_model(mesh_hsdp)
    run(model, opt, range(1, 8), rank, 2)
    ck_hsdp = os.path.join(out_dir, "ck_hsdp")
    fsdp.save(model, opt, ck_hsdp)
    run(model, opt, range(8, 11), rank, 2)
    h10 = C.flat_params(model)
    res["hsdp_vs_plain"] = C.assert_close(h10, p10, TOL["fp32"], "hsdp step 10")
    model, opt = fsdp2_model(mesh_hsdp)
    fsdp.load(model, opt, ck_hsdp)
    run(model, opt, range(8, 11), rank, 2)
    res["hsdp_dcp_resume"] = C.assert_close(C.flat_params(model), h10, TOL["resume"], "hsdp resume")

    # 8-9. FSDP1 flat parameters.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    def fsdp1(orig):
        model = FSDP(C.make_model(), use_orig_params=orig, device_id=torch.device("cpu"))
        # use_orig_params=False: one FlatParameter holds every tensor, all of it GMixout
        opt = C.make_opt(model) if orig else C.make_opt_flat(list(model.parameters()))
        fsdp.attach(opt, model)
        return model, opt

    def full(model):
        with FSDP.summon_full_params(model):
            return {k.replace("_fsdp_wrapped_module.", ""): v for k, v in C.flat_params(model).items()}

    for orig in (False, True):
        # against a plain run keyed per parameter (True), or (False) by the flat parameter
        # (key 0) and each parameter's offset inside it
        ref = p10 if orig else flat_reference(rank)
        model, opt = fsdp1(orig)
        sizes = [p.numel() for g in opt.param_groups for p in g["params"]]
        run(model, opt, range(1, 8), rank, 2)
        ck = os.path.join(out_dir, f"fsdp1_{orig}_rank{rank}.pt")  # per-rank checkpoint, step 7
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "optim": opt.state_dict()}, ck)
        run(model, opt, range(8, 11), rank, 2)
        got = full(model)
        name = f"fsdp1_orig_params_{orig}_vs_plain"
        C.assert_same_support(got, ref, start, name)
        res[name] = C.assert_close(got, ref, TOL["fp32"], name)
        if orig:
            res["fsdp1_orig_params_size0_views"] = sizes.count(0)
        model, opt = fsdp1(orig)
        saved = torch.load(ck, weights_only=False)
        with torch.no_grad():
            for p, v in zip(model.parameters(), saved["params"]):
                p.copy_(v)
        opt.load_state_dict(saved["optim"])
        run(model, opt, range(8, 11), rank, 2)
        res[f"fsdp1_orig_params_{orig}_resume"] = C.assert_close(full(model), got, TOL["resume"], name + " resume")

    if rank == 0:
        with open(os.path.join(out_dir, "fsdp_results.json"), "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def flat_reference(rank):
    """Plain run of the FSDP1 ``use_orig_params=False`` layout: every parameter GMixout, keyed
    as piece ``[offset, offset+numel)`` of logical tensor 0 (the flat parameter)."""
    from gmixout_optim import Segment
    model = C.make_model()
    params = list(model.parameters())
    opt = C.make_opt_flat(params)
    offsets, off = {}, 0
    for p in params:
        offsets[p] = off
        off += p.numel()
    opt.set_locator(lambda t, gi, i: [Segment(0, t.numel(), 0, offsets[t])])
    for s in range(1, 11):
        C.plain_step(model, opt, s)
    return C.flat_params(model)


if __name__ == "__main__":
    main(sys.argv[1])
