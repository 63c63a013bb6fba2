"""DeepSpeed worker for tests/test_deepspeed_worldsize.py; run under torch.distributed.run (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node N ds_worldsize_worker.py SPEC.json OUT_DIR

SPEC.json keys (each optional):
  "save": [scenario names]: train STEPS steps, consolidate(), save tag "consolidated", train
          EXTRA more steps, consolidate(), save tag "later" (newer, other weights) in
          OUT_DIR/ckpt_<name>_w<N>; records the fp32 master weights at both tags.
  "load": {name: ckpt_dir}: a fresh engine loads tag "consolidated" of a checkpoint saved on
          another world size through integrations.deepspeed.load_checkpoint; records the fp32
          master weights it holds then, and after EXTRA more steps.
  "stage0_bf16": true: deepspeed.initialize through the registered config route with ZeRO
          stage 0 and bf16; records the error it raises (or that it raised none, and what
          the first step raised).
Rank 0 writes OUT_DIR/<kind>_<name>_w<N>.pt and .json.
"""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ds_common as C  # noqa: E402
from ds_worker import full_weights, load_and_continue, start, train, write_record  # noqa: E402
from gmixout_optim.integrations import deepspeed as gds  # noqa: E402


def build(cfg: dict):
    model = C.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=C.param_groups(model), config=cfg)
    return engine


def clean_loss_scenarios(world: int) -> dict[str, dict]:
    """ZeRO-3 fp32 and bf16 (the scenarios of ds_common, sizes per world)."""
    configs = C.scenario_configs(world)
    return {name: configs[name] for name in ("z3_fp32", "z3_bf16")}


def run_save(name: str, cfg: dict, ckpt: str) -> tuple[dict, dict]:
    rec = {}
    engine = build(cfg)
    train(engine, cfg, 0, C.STEPS)
    gds.consolidate(engine)
    rec["consolidated"] = full_weights(engine, cfg)
    engine.save_checkpoint(ckpt, tag="consolidated")
    train(engine, cfg, C.STEPS, C.STEPS + C.EXTRA)
    gds.consolidate(engine)
    rec["later"] = full_weights(engine, cfg)
    engine.save_checkpoint(ckpt, tag="later")
    engine.destroy()
    return rec, {}


def run_load(name: str, cfg: dict, src: str) -> tuple[dict, dict]:
    # No try/except: a rank that fails alone would leave the others waiting in a collective;
    # an error ends the launch, which the test reports with its traceback.
    return load_and_continue(build(cfg), cfg, src), {}


def run_stage0_bf16(world: int) -> tuple[dict, dict]:
    cfg = C.load_config("zero1.json", world, stage=0) | {"bf16": {"enabled": True}}
    meta = {}
    try:
        engine = build(cfg)
    except Exception as err:
        meta["initialize_error"] = f"{type(err).__name__}: {err}"
        return {}, meta
    meta["initialize_error"] = None
    try:
        train(engine, cfg, 0, 1)
        meta["step_error"] = None
    except Exception as err:
        meta["step_error"] = f"{type(err).__name__}: {err}"
    engine.destroy()
    return {}, meta


def main() -> None:
    spec, out, world = start()
    configs = clean_loss_scenarios(world)
    jobs = [(n, "save", None) for n in spec.get("save", [])]
    jobs += [(n, "load", src) for n, src in spec.get("load", {}).items()]
    if spec.get("stage0_bf16"):
        jobs.append(("stage0_bf16", "check", None))
    for name, kind, src in jobs:
        if kind == "save":
            rec, meta = run_save(name, configs[name], os.path.join(out, f"ckpt_{name}_w{world}"))
        elif kind == "load":
            rec, meta = run_load(name, configs[name], src)
        else:
            rec, meta = run_stage0_bf16(world)
        write_record(out, kind, name, world, rec, meta)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
