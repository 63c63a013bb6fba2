"""DeepSpeed worker for tests/test_deepspeed.py; run under torch.distributed.run (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node N ds_worker.py SPEC.json OUT_DIR

SPEC.json: {"train": [names of ds_common.scenario_configs], "crossload": {name: ckpt_dir}}.
For each "train" scenario (one process launch runs them all, to pay start-up once):
  engine A trains STEPS steps (checkpoint "mid" after step SAVE_AT, a NaN loss at NAN_AT),
  records "trained", consolidate()s, records "consolidated", saves tag "consolidated";
  engine B loads "mid", trains the rest, records "resumed", finalize()s, records "final",
  saves tag "final".
For each "crossload" scenario: load the "consolidated" checkpoint of another world size,
record "loaded", train EXTRA more steps, record "continued".
Rank 0 writes OUT_DIR/<name>.pt (fp32 full weights per record) and OUT_DIR/<name>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

import ds_common as C  # noqa: E402
from gmixout_optim.integrations import deepspeed as gds  # noqa: E402


def full_weights(engine, cfg) -> dict[str, torch.Tensor]:
    """fp32 master weights, gathered (a collective under ZeRO: every rank calls it)."""
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if C.stage_of(cfg) else p.detach().float()
        out[name] = full.detach().clone().cpu()
    return out


def build(cfg: dict, route: str):
    model = C.make_model()
    groups = C.param_groups(model)
    if route == "config":
        gds.check_config(cfg)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    else:
        params = cfg["optimizer"]["params"]
        cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
        gds.check_config(cfg, client=True)
        if route == "instance":
            opt = gds.DeepSpeedGMixout(groups, **params)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        else:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=groups,
                                              optimizer=gds.client_optimizer(**params), config=cfg)
    assert isinstance(engine.basic_optimizer, gds.DeepSpeedGMixout), type(engine.basic_optimizer)
    legacy_zero3_init_step(engine)
    return engine


def legacy_zero3_init_step(engine) -> None:
    """What ZeRO-3 did at initialisation before 0.19: one optimizer step per sub-group with
    all-zero gradients, to lay out the state. It must create state and count nothing."""
    zero = engine.optimizer
    if not hasattr(zero, "fp32_partitioned_groups_flat"):
        return
    for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
        saved, flat.grad = flat.grad, torch.zeros_like(flat)
        zero._optimizer_step(i)
        flat.grad = saved


def group_split(engine) -> list[list[bool]]:
    """Per param group: [its "gmixout" flag, whether any of its tensors holds a support]."""
    with gds._master_groups(engine) as opt:
        return [[g["gmixout"], any("support" in opt.state.get(t, {}) for t in g["params"])]
                for g in opt.param_groups]


def train(engine, cfg, start: int, stop: int) -> None:
    x, y = C.make_data()
    rank, gas = dist.get_rank(), engine.gradient_accumulation_steps()
    dtype = torch.bfloat16 if C.is_bf16(cfg) else torch.float32
    for i in range(start, stop):
        for micro in range(gas):
            xb, yb = C.micro_batch(x, y, i, rank * gas + micro)
            loss = C.loss_fn(engine(xb.to(dtype)), yb, i)
            engine.backward(loss)
            engine.step()


def run_train(name: str, cfg: dict, route: str, ckpt: str) -> dict:
    rec, meta = {}, {}
    engine = build(cfg, route)
    meta["optimizer"] = type(engine.optimizer).__name__
    train(engine, cfg, 0, C.SAVE_AT + 1)
    engine.save_checkpoint(ckpt, tag="mid")
    train(engine, cfg, C.SAVE_AT + 1, C.STEPS)
    rec["trained"] = full_weights(engine, cfg)
    with gds.anchor_weights(engine):
        rec["anchor"] = full_weights(engine, cfg)
    rec["after_anchor"] = full_weights(engine, cfg)
    meta["groups"] = group_split(engine)
    meta["skipped_in_optimizer"] = engine.basic_optimizer.skipped_steps
    meta["global_steps"] = engine.global_steps
    gds.consolidate(engine)
    rec["consolidated"] = full_weights(engine, cfg)
    engine.save_checkpoint(ckpt, tag="consolidated")
    engine.destroy()

    engine = build(cfg, route)
    gds.load_checkpoint(engine, ckpt, "mid")
    train(engine, cfg, C.SAVE_AT + 1, C.STEPS)
    rec["resumed"] = full_weights(engine, cfg)
    gds.finalize(engine)
    rec["final"] = full_weights(engine, cfg)
    rec["final_model"] = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()
                          } if C.stage_of(cfg) < 3 else {}
    engine.save_checkpoint(ckpt, tag="final")
    engine.destroy()
    return rec, meta


def load_and_continue(engine, cfg: dict, src: str) -> dict:
    """Load tag "consolidated" of checkpoint folder ``src`` into a fresh ``engine``, record
    "loaded", train EXTRA more steps, record "continued"; the engine is destroyed after."""
    rec = {}
    gds.load_checkpoint(engine, src, "consolidated")
    rec["loaded"] = full_weights(engine, cfg)
    train(engine, cfg, C.STEPS, C.STEPS + C.EXTRA)
    rec["continued"] = full_weights(engine, cfg)
    engine.destroy()
    return rec


def run_crossload(name: str, cfg: dict, src: str) -> tuple[dict, dict]:
    return load_and_continue(build(cfg, ROUTE_FOR(name)), cfg, src), {}


def ROUTE_FOR(name: str) -> str:
    return C.ROUTES.get(name, "config")


def start() -> tuple[dict, str, int]:
    """Read SPEC.json and OUT_DIR from the command line, register GMixout, join the gloo
    group: (spec, out_dir, world size)."""
    spec_path, out = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    gds.register()
    deepspeed.init_distributed(dist_backend="gloo")
    return spec, out, dist.get_world_size()


def write_record(out: str, kind: str, name: str, world: int, rec: dict, meta: dict) -> None:
    """Rank 0 writes OUT_DIR/<kind>_<name>_w<world>.pt (rec) and .json (meta); every rank waits."""
    if dist.get_rank() == 0:
        torch.save(rec, os.path.join(out, f"{kind}_{name}_w{world}.pt"))
        with open(os.path.join(out, f"{kind}_{name}_w{world}.json"), "w") as f:
            json.dump(meta, f)
    dist.barrier()


def main() -> None:
    spec, out, world = start()
    configs = C.scenario_configs(world)
    jobs = [(n, "train", None) for n in spec.get("train", [])]
    jobs += [(n, "crossload", src) for n, src in spec.get("crossload", {}).items()]
    for name, kind, src in jobs:
        t0 = time.time()
        ckpt = os.path.join(out, f"ckpt_{name}_w{world}")
        if kind == "train":
            rec, meta = run_train(name, configs[name], ROUTE_FOR(name), ckpt)
        else:
            rec, meta = run_crossload(name, configs[name], src)
        meta["seconds"] = time.time() - t0
        write_record(out, kind, name, world, rec, meta)
    dist.destroy_process_group()  # a clean exit: no rank tears down gloo under another


if __name__ == "__main__":
    main()
