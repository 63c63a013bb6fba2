"""``accelerate launch`` of examples/accelerate_finetune.py (2 CPU processes) against the plain optimizer.

Each launch trains a tiny timm ViT for 10 steps (episodes of 4 steps), saves the Accelerate
state at step 5 (mid-episode), trains on, then loads the state and replays steps 6-10: the
replay must give the same weights bit for bit (``roundtrip_max_diff``). The final training
weights are compared with ``--reference 2``: one process, no Accelerate, the two ranks'
halves of every global batch back-propagated separately with the loss halved (what DDP,
FSDP2 and ZeRO compute: each rank's gradient / 2, summed; halving is exact and a sum of two
terms does not depend on its order). Expected difference: none; TOL leaves room for a
collective that associates differently. With ``eps=1e-4`` Adam's update moves at most
lr * |grad diff| / eps per step, so fp32 rounding (~1e-7 relative) stays below 1e-8 per
step, while a wrong support or a lost step moves weights by ~lr = 1e-3.

FSDP and DeepSpeed plugins run through tests/distributed/accel_cpu_harness.py, which lets
Accelerate use them on CPU processes (it enables them only on accelerator devices).
"""
import json
import os
import runpy
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

import launch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "accelerate_finetune.py"
HARNESS = ROOT / "tests" / "distributed" / "accel_cpu_harness.py"
CONFIGS = ROOT / "configs" / "accelerate"
TOL = 1e-6
ARGS = ["--model", "vit_tiny_patch16_224",
        "--model-kwargs", json.dumps({"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}),
        "--image-size", "32", "--num-classes", "5", "--batch-size", "2", "--steps", "10", "--lr", "1e-3",
        "--eps", "1e-4", "--p", "0.5", "--resample-every", "4"]

# name -> (config, script, extra environment, reference layout, expected distributed type)
RUNS = {
    "ddp": ("cpu_ddp.yaml", EXAMPLE, {"ACCELERATE_USE_CPU": "true"}, "default", "MULTI_CPU"),
    "fsdp2": ("fsdp2.yaml", HARNESS, {"ACCELERATE_USE_CPU": "true"}, "default", "FSDP"),
    "zero2": ("deepspeed_zero2.yaml", HARNESS, {"DS_ACCELERATOR": "cpu"}, "zero12", "DEEPSPEED"),
    "zero3": ("deepspeed_zero3.yaml", HARNESS, {"DS_ACCELERATOR": "cpu"}, "default", "DEEPSPEED"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The single-process reference weights, per support layout (run in this process)."""
    main = runpy.run_path(str(EXAMPLE))["main"]
    out = {}
    for layout in ("default", "zero12"):
        path = tmp_path_factory.mktemp("ref") / f"{layout}.pt"
        main([*ARGS, "--reference", "2", "--reference-layout", layout, "--out", str(path)])
        out[layout] = torch.load(path)
    return out


def _config(name: str, tmp_path: Path) -> Path:
    """The shipped config; for DeepSpeed, its settings moved into a JSON DeepSpeed config with
    two changes: no gradient clipping (Accelerate clips at 1.0 unless told, and 0 counts as
    unset; the reference does not clip) and ``overlap_comm`` off (ZeRO-3 turns it on by
    default; on CPU processes its asynchronous reduction is not what this test is about, and
    a run under heavy machine load once read gradients before they were reduced)."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    if cfg["distributed_type"] == "DEEPSPEED":
        ds = cfg["deepspeed_config"]
        stage = ds["zero_stage"]
        ds_json = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                   "gradient_accumulation_steps": ds["gradient_accumulation_steps"], "gradient_clipping": 0.0,
                   "zero_optimization": {"stage": stage, "overlap_comm": False,
                                         "stage3_gather_16bit_weights_on_model_save": True},
                   "fp16": {"enabled": False}, "bf16": {"enabled": False}}
        (tmp_path / "ds.json").write_text(json.dumps(ds_json))
        cfg["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": False}
        cfg.pop("mixed_precision", None)  # set in the JSON; Accelerate refuses both
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", list(RUNS))
def test_accelerate_launch_matches_plain_optimizer(name, tmp_path, references):
    config, script, extra_env, layout, kind = RUNS[name]
    out = tmp_path / "weights.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra_env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config(config, tmp_path)),
           "--main_process_port", str(_free_port()), str(script), *ARGS,
           "--save-at", "5", "--state-dir", str(tmp_path / "state"), "--out", str(out)]
    proc = launch.run(cmd, env=env, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-12000:]}"
    summary = json.loads(Path(str(out) + ".json").read_text())
    assert summary["world"] == 2 and summary["distributed_type"].endswith(kind), summary
    assert summary["episodes"] == [2], summary  # 10 steps of 4: episode 2 running, on every tensor
    assert summary["roundtrip_max_diff"] == 0.0, summary
    if name == "fsdp2":
        assert summary["sharded_params"] > 0, "FSDP2 did not shard the model"
    got, ref = torch.load(out), references[layout]
    assert set(got) == set(ref)
    diff = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert diff <= TOL, f"{name}: max |diff| to the plain optimizer {diff:.3e} > {TOL:.0e}"
