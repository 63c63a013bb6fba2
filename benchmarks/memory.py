"""Peak memory of a whole training step, per model parameter, by optimizer mode.

One training step = forward, backward, optimizer step, ``zero_grad(set_to_none=True)``.
``--steps`` (3) steps are run with ``resample_every=2`` (``--resample-every``): step 1 lays out
the state, step 2 ends an episode (merge + support redraw + state remap), step 3 is an
in-episode step on the redrawn support, so the peak covers all three kinds. Batch 1 at
112 px, one thread, loss = mean of the squared output (random init, nothing downloaded).

Models (``--models``):
  vit_b16     timm ``vit_base_patch16_224`` at 112 px, 10-class head        (~86M parameters)
  vit_l16     timm ``vit_large_patch16_224`` at 112 px, 10-class head       (~303M)
  vit_bigg14  open_clip ``ViT-bigG-14``'s vision tower (48 layers, width 1664, output 1280),
              built from open_clip's own config at 112 px                  (~1.84B)
16-bit models are built directly in bf16 (``torch.set_default_dtype``) so the build never
holds an fp32 copy.

Modes (``--modes``):
  adamw_amp             AdamW, fp32 parameters, forward/backward under bf16 autocast (the usual
                        mixed precision)
  adamw_bf16            AdamW, bf16 parameters (and bf16 AdamW state), no master copy
  gmixout_fp32          GMixoutOptimizer(AdamW), fp32 parameters, bf16 autocast (as adamw_amp)
  gmixout_bf16          GMixoutOptimizer(AdamW), bf16 parameters, no master copy
  gmixout_bf16_capture  as gmixout_bf16 with ``capture_grads=True`` (no dense weight gradient kept);
                        reported as "not available" when the optimizer has no such argument
GMixout: ``gmixout_param_groups(model)``, p = 0.9, lr 1e-5. No activation checkpointing is used
(``--checkpointing`` turns on the models' own; at batch 1 and 112 px activations are a few
percent of the total).

Measure: each (model, mode) runs in a fresh child process started with
``MALLOC_MMAP_THRESHOLD_=131072`` (glibc returns freed buffers instead of caching them) and
OMP_NUM_THREADS=1. On CPU the figure is the growth of the process's peak RSS (``VmHWM``)
over its resident size right after ``import torch`` and the libraries (timm or open_clip,
gmixout_optim; their imports, ~0.25 GB, are not training memory, and would add 2.9 bytes per
ViT-B parameter: the JSON keeps them as ``imports_bytes``); on CUDA (``--device cuda``) it is
``torch.cuda.max_memory_allocated()``. Step time: CPU seconds of the last in-episode step and
of the last episode-ending step (merge + redraw), in that child; the ratio divides the
in-episode CPU time by adamw_amp's on the same model (separate processes: CPU time is the
figure least moved by other jobs on a shared machine; wall times are in the JSON).

Before running, every mode's bytes are predicted (parameters, gradients, optimizer state,
autocast's bf16 weight copies, one largest-tensor temporary, an activation estimate). A
mode predicted above the machine's free memory (``MemAvailable`` less ``--margin-gb``, or
``--max-gb``) is not run: its row shows the prediction and says so. While a child runs, it
is stopped if the machine's MemAvailable falls below 1 GB (the machine may be shared).

Sharded (``--fsdp2-ranks N``): the GMixout modes under FSDP2 on N gloo CPU ranks of this machine
(each transformer block and the root ``fully_shard``-ed from the meta device, so no rank ever
holds the whole model; batch 1 per rank); the row holds the largest per-rank peak, and the
table compares it with the same mode in one process.

DeepSpeed (``--deepspeed-ranks N``): ZeRO-3 with bf16 (configs/deepspeed/zero3_bf16.json: fp32
master partitions, ``zero_force_ds_cpu_optimizer: false``) on N gloo CPU ranks of this machine
(``DS_ACCELERATOR=cpu``, launched with torchrun), for two optimizers under the same config, only
the "optimizer" block differing:
  ds_zero3_gmixout  the registered ``{"type": "GMixout"}`` (``register()``), AdamW inner, p = 0.9,
                    lr 1e-5, param groups from ``gmixout_param_groups``
  ds_zero3_adamw    ``{"type": "AdamW", "params": {"torch_adam": true}}``: DeepSpeed builds
                    ``torch.optim.AdamW`` (its own CPU/fused Adams are not used)
Batch 1 per rank (``train_micro_batch_size_per_gpu`` 1, no accumulation); the model is built
inside ``deepspeed.zero.Init`` in bf16, so no rank ever holds the whole model. The baseline
RSS is taken after importing deepspeed and joining the gloo group. The rows hold the largest
per-rank peak and every rank's figures; the table compares GMixout's with AdamW's. The comm op
is loaded from ``TORCH_EXTENSIONS_DIR`` (default ``<venv>/torch_extensions``, as ``make`` sets).

Run: python benchmarks/memory.py [--models vit_b16 vit_l16 vit_bigg14] [--modes ...] [--device cpu]
     [--fsdp2-ranks 2 | --deepspeed-ranks 2]
Writes benchmarks/results/memory_cpu.json (CUDA: memory_<gpu name>.json) and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time

MODELS = ("vit_b16", "vit_l16", "vit_bigg14")
MODES = ("adamw_amp", "adamw_bf16", "gmixout_fp32", "gmixout_bf16", "gmixout_bf16_capture")
MODE_SPEC = {  # parameter dtype, autocast, optimizer, capture_grads
    "adamw_amp": ("float32", True, "adamw", False),
    "adamw_bf16": ("bfloat16", False, "adamw", False),
    "gmixout_fp32": ("float32", True, "gmixout", False),
    "gmixout_bf16": ("bfloat16", False, "gmixout", False),
    "gmixout_bf16_capture": ("bfloat16", False, "gmixout", True),
}
DS_MODES = ("ds_zero3_adamw", "ds_zero3_gmixout")  # --deepspeed-ranks: DeepSpeed ZeRO-3 bf16
ALL_MODES = MODES + DS_MODES
DS_CONFIG = "zero3_bf16.json"
IMAGE_SIZE = 112
P_MASK = 0.9
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's gmixout_optim, not an installed one


# -- models -----------------------------------------------------------------------------

def build_model(name: str, checkpointing: bool = False):
    """The model in the current default dtype and device (see ``torch.set_default_dtype`` /
    ``torch.device`` as a context); random init, nothing downloaded."""
    if name in ("vit_b16", "vit_l16"):
        import timm

        arch = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224"}[name]
        model = timm.create_model(arch, pretrained=False, img_size=IMAGE_SIZE, num_classes=10)
    elif name == "vit_bigg14":
        import open_clip
        from open_clip.transformer import VisionTransformer

        cfg = open_clip.get_model_config("ViT-bigG-14")
        vis = cfg["vision_cfg"]
        model = VisionTransformer(
            image_size=IMAGE_SIZE, patch_size=vis["patch_size"], width=vis["width"], layers=vis["layers"],
            heads=vis["width"] // vis["head_width"], mlp_ratio=vis["mlp_ratio"], output_dim=cfg["embed_dim"])
    else:
        raise ValueError(f"unknown model {name!r}; allowed: {MODELS}")
    if checkpointing:
        model.set_grad_checkpointing(True)
    return model


def model_shape(name: str) -> dict:
    """Element counts from a meta-device build (no memory): GMixout vs dense elements, the
    largest GMixout tensor, and the numbers the activation estimate needs."""
    import torch

    from gmixout_optim import gmixout_param_groups

    with torch.device("meta"):
        model = build_model(name)
    groups = gmixout_param_groups(model)
    sparse = [p for g in groups if g["gmixout"] for p in g["params"]]
    dense = [p for g in groups if not g["gmixout"] for p in g["params"]]
    blocks = [m for m in model.modules() if type(m).__name__ in ("Block", "ResidualAttentionBlock")]
    width = {"vit_b16": 768, "vit_l16": 1024, "vit_bigg14": 1664}[name]
    patch = 14 if name == "vit_bigg14" else 16
    return {"params": sum(p.numel() for p in model.parameters()),
            "gmixout_elements": sum(p.numel() for p in sparse), "dense_elements": sum(p.numel() for p in dense),
            "largest_gmixout_tensor": max(p.numel() for p in sparse), "gmixout_tensors": len(sparse),
            "layers": len(blocks), "width": width, "tokens": (IMAGE_SIZE // patch) ** 2 + 1}


def predict_bytes(shape: dict, mode: str) -> dict:
    """Bytes of one step's peak, by part (a model of the step, not a measurement).

    GMixout state per support element (support fraction keep = 1 - p, buffers of capacity
    ~keep * numel): int32 index 4, fp32 residual 4, AdamW exp_avg 4 + exp_avg_sq 4, the fp32
    residual gradient 4, and a 16-bit anchor 2 for 16-bit parameters. Without capture the
    dense weight gradient of every tensor is alive at the step; with it, one (the largest).
    """
    dtype, autocast, opt, capture = MODE_SPEC[mode]
    w = 4 if dtype == "float32" else 2
    n, ng, nd, big = shape["params"], shape["gmixout_elements"], shape["dense_elements"], shape["largest_gmixout_tensor"]
    keep = 1.0 - P_MASK
    parts = {"params": n * w}
    if opt == "adamw":
        parts["grads"] = n * w
        parts["adamw_state"] = 2 * n * w
    else:
        per_support = 4 + 4 + 8 + 4 + (2 if w == 2 else 0)
        parts["gmixout_state"] = int(ng * keep * per_support)
        parts["dense_adamw_state"] = 2 * nd * w
        parts["grads"] = (big + nd) * w if capture else n * w
    if autocast:  # bf16 copies of the Linear weights, saved by autograd for the backward pass
        parts["autocast_weight_copies"] = ng * 2
    # per-tensor temporaries of the step (support draw, long indices, AdamW's foreach-free math)
    parts["temporaries"] = big * 8
    act_bytes = 2 if (autocast or w == 2) else 4
    hidden = shape["width"] * 4.9 if shape["layers"] == 48 else shape["width"] * 4
    parts["activations"] = int(shape["layers"] * shape["tokens"] * (shape["width"] * 12 + hidden * 3) * act_bytes)
    parts["total"] = sum(parts.values())
    return parts


def predict_ds_bytes(shape: dict, mode: str, ranks: int, cfg: dict) -> dict:
    """Per-rank bytes of a ZeRO-3 bf16 step (a model, as predict_bytes): the rank's bf16
    parameter partition, its fp32 master partition, its bf16 gradient partition and the fp32
    gradient of the sub-group being stepped, the optimizer state of the master partition,
    the reduce bucket (bf16, filled up to the model's size), the gathered bf16 weights of
    the largest layer and the activations of one sample."""
    n, ng, nd, big = shape["params"], shape["gmixout_elements"], shape["dense_elements"], shape["largest_gmixout_tensor"]
    zero = cfg.get("zero_optimization", {})
    per = lambda elements: int(elements / ranks)  # noqa: E731
    parts = {"params_bf16": per(n) * 2, "master_fp32": per(n) * 4,
             "grads": per(n) * 2 + min(per(n), int(zero.get("sub_group_size", 1e9))) * 4}
    if mode == "ds_zero3_adamw":
        parts["adamw_state"] = per(n) * 8
        # torch AdamW's single-tensor math on a flat sub-group: a denominator as large as it
        parts["temporaries"] = min(per(n), int(zero.get("sub_group_size", 1e9))) * 4
    else:
        parts["gmixout_state"] = int(per(ng) * (1.0 - P_MASK) * (4 + 4 + 8 + 4))
        parts["dense_adamw_state"] = per(nd) * 8
        parts["temporaries"] = big * 8 // ranks
    parts["reduce_bucket"] = min(n, int(zero.get("reduce_bucket_size", 5e8))) * 2
    parts["gathered_weights"] = big * 2 * 4
    hidden = shape["width"] * 4.9 if shape["layers"] == 48 else shape["width"] * 4
    parts["activations"] = int(shape["layers"] * shape["tokens"] * (shape["width"] * 12 + hidden * 3) * 2)
    parts["total"] = sum(parts.values())
    return parts


def ds_config(mode: str, ranks: int, resample_every: int) -> dict:
    """configs/deepspeed/zero3_bf16.json at batch 1 per rank; the optimizer block by mode."""
    with open(os.path.join(ROOT, "configs", "deepspeed", DS_CONFIG)) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = ranks
    cfg["steps_per_print"] = 10**9
    gm = cfg["optimizer"]["params"]
    if mode == "ds_zero3_gmixout":
        gm.update({"lr": 1e-5, "p": P_MASK, "resample_every": resample_every})
    else:
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "torch_adam": True, "lr": 1e-5, "weight_decay": gm["weight_decay"], "betas": gm["betas"], "eps": gm["eps"]}}
    return cfg


# -- the child: one (model, mode) -----------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def capture_available() -> bool:
    from gmixout_optim import GMixoutOptimizer

    return "capture_grads" in inspect.signature(GMixoutOptimizer.__init__).parameters


def _init_sharded(model) -> None:
    """FSDP2 from the meta device: each block, then the root; only this rank's shards are ever
    allocated, then filled (timm-like values: normal(0, 0.02) matrices, unit norm weights, zero biases)."""
    import torch
    from torch.distributed.fsdp import fully_shard

    for block in [m for m in model.modules() if type(m).__name__ in ("Block", "ResidualAttentionBlock")]:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, prm in model.named_parameters():
            shard, leaf = prm.to_local(), name.rsplit(".", 1)[-1]
            if prm.dim() >= 2 or leaf in ("cls_token", "pos_embed", "class_embedding", "positional_embedding"):
                shard.normal_(0.0, 0.02)
            elif leaf == "bias":
                shard.zero_()
            else:  # norm weights
                shard.fill_(1.0)


def ds_child(model_name: str, mode: str, steps: int, resample_every: int, checkpointing: bool,
             sharded_out: str) -> dict:
    """One DeepSpeed ZeRO-3 bf16 rank (under torchrun): its peak RSS growth over the steps."""
    import torch

    torch_rss = _status_kb("VmRSS")
    torch.set_num_threads(1)
    if model_name == "vit_bigg14":
        import open_clip  # noqa: F401
    else:
        import timm  # noqa: F401
    import deepspeed
    import torch.distributed as dist

    from gmixout_optim import gmixout_param_groups
    from gmixout_optim.integrations import deepspeed as gds

    gds.register()
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    base_rss = _status_kb("VmRSS")
    cfg = ds_config(mode, world, resample_every)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with deepspeed.zero.Init(config_dict_or_path=cfg, dtype=torch.bfloat16):
            model = build_model(model_name, checkpointing)
    finally:
        torch.set_default_dtype(old)
    params = gmixout_param_groups(model) if mode == "ds_zero3_gmixout" else model.parameters()
    if mode == "ds_zero3_gmixout":
        gds.check_config(cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=cfg)
    build_s = time.perf_counter() - t0
    after_init = _status_kb("VmHWM") - base_rss
    engine.train()
    torch.manual_seed(rank)
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bfloat16)
    wall, cpu, losses = [], [], []
    for _ in range(steps):
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()
        wall.append(time.perf_counter() - t_wall)
        cpu.append(time.process_time() - t_cpu)
        losses.append(loss.item())
    peak = _status_kb("VmHWM") - base_rss
    boundary = [i for i in range(steps) if (i + 1) % resample_every == 0]
    inside = [i for i in range(steps) if (i + 1) % resample_every != 0 and i > 0]
    basic = engine.basic_optimizer
    result = {"peak_bytes": peak, "imports_bytes": base_rss - torch_rss, "init_peak_bytes": after_init,
              "step_cpu_s": cpu[-1], "step_wall_s": wall[-1],
              "boundary_step_cpu_s": cpu[boundary[-1]] if boundary else None,
              "inner_step_cpu_s": cpu[inside[-1]] if inside else None,
              "steps_wall_s": wall, "steps_cpu_s": cpu, "build_s": build_s, "losses": losses,
              "skipped_steps": getattr(basic, "skipped_steps", 0),
              "engine_optimizer": type(engine.optimizer).__name__, "basic_optimizer": type(basic).__name__,
              "deepspeed": deepspeed.__version__, "config": cfg,
              "baseline": "VmRSS after import torch, timm/open_clip, deepspeed, gmixout_optim and joining gloo"}
    with open(os.path.join(sharded_out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    engine.destroy()
    dist.destroy_process_group()
    return result


def child(model_name: str, mode: str, device: str, steps: int, resample_every: int, checkpointing: bool,
          sharded_out: str | None = None) -> dict:
    if mode in DS_MODES:
        return ds_child(model_name, mode, steps, resample_every, checkpointing, sharded_out)
    import torch

    torch_rss = _status_kb("VmRSS")  # right after `import torch`
    torch.set_num_threads(1)
    # The libraries' imports are not training memory (timm alone adds ~0.24 GB: 2.7 bytes per
    # ViT-B parameter): the baseline is taken after them; the JSON keeps both figures.
    if model_name == "vit_bigg14":
        import open_clip  # noqa: F401
    else:
        import timm  # noqa: F401
    from gmixout_optim import GMixoutOptimizer, gmixout_param_groups

    if sharded_out:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    base_rss = _status_kb("VmRSS")

    dtype_name, autocast, opt_name, capture = MODE_SPEC[mode]
    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta") if sharded_out else dev:
            model = build_model(model_name, checkpointing)
    finally:
        torch.set_default_dtype(old)
    if sharded_out:
        _init_sharded(model)
    build_s = time.perf_counter() - t0
    model.train()
    if opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    else:
        extra = {"capture_grads": True} if capture else {}
        opt = GMixoutOptimizer(gmixout_param_groups(model), lr=1e-5, p=P_MASK, resample_every=resample_every,
                               **extra)
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=dev, dtype=dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wall, cpu, losses = [], [], []
    for _ in range(steps):
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t_wall)
        cpu.append(time.process_time() - t_cpu)
        losses.append(loss.item())
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kb("VmHWM") - base_rss
    # step i (1-based) ends an episode iff i % resample_every == 0: report the last of each kind
    boundary = [i for i in range(steps) if (i + 1) % resample_every == 0]
    inside = [i for i in range(steps) if (i + 1) % resample_every != 0 and i > 0]
    result = {"peak_bytes": peak, "imports_bytes": base_rss - torch_rss,
            "step_cpu_s": cpu[-1], "step_wall_s": wall[-1],
            "boundary_step_cpu_s": cpu[boundary[-1]] if boundary else None,
            "inner_step_cpu_s": cpu[inside[-1]] if inside else None,
            "steps_wall_s": wall, "steps_cpu_s": cpu,
            "build_s": build_s, "losses": losses, "skipped_steps": getattr(opt, "skipped_steps", 0),
            "baseline": ("VmRSS after import torch, timm/open_clip and gmixout_optim" if dev.type == "cpu"
                         else "max_memory_allocated")}
    if sharded_out:
        import torch.distributed as dist

        with open(os.path.join(sharded_out, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
        dist.destroy_process_group()
    return result


# -- the parent -----------------------------------------------------------------------------

def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def run_child(args, model: str, mode: str, ranks: int = 0) -> dict:
    """One (model, mode) in a fresh process; ``ranks`` > 0: FSDP2 over that many gloo ranks
    (torchrun), the row holding the largest per-rank peak and every rank's figures."""
    import tempfile

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if mode in DS_MODES:  # DeepSpeed on CPU; its comm op built once into the venv (as make/tests do)
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        env.pop("TRITON_INTERPRET", None)
    launcher = [sys.executable]
    if ranks:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd = launcher + [os.path.abspath(__file__), "--child", model, mode, "--device", args.device,
                      "--steps", str(args.steps), "--resample-every", str(args.resample_every)]
    if args.checkpointing:
        cmd.append("--checkpointing")
    tmp = tempfile.mkdtemp(prefix="gmixout_memory_") if ranks else None
    if ranks:
        cmd += ["--sharded-out", tmp]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    low = False
    while proc.poll() is None:
        if args.device == "cpu" and mem_available() < args.abort_below_gb * 1e9:
            proc.kill()  # leave the shared machine usable; the row says why
            low = True
        time.sleep(0.2)
    out, err = proc.communicate()
    if low:
        return {"status": f"aborted: machine MemAvailable fell below {args.abort_below_gb} GB"}
    if proc.returncode != 0:
        lines = err.strip().splitlines()
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
        return {"status": f"failed (exit {proc.returncode}): {(errors or lines or [''])[-1].strip()}",
                "stderr_tail": "\n".join(lines[-30:])}
    if ranks:
        per_rank = []
        for r in range(ranks):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
            os.remove(os.path.join(tmp, f"rank{r}.json"))
        os.rmdir(tmp)
        top = max(per_rank, key=lambda x: x["peak_bytes"])
        extra = {"per_rank_init_peak_bytes": [x["init_peak_bytes"] for x in per_rank]} if mode in DS_MODES else {}
        return {"status": "measured", **top, "ranks": ranks, "per_rank_peak_bytes": [x["peak_bytes"] for x in per_rank],
                **extra}
    return {"status": "measured", **json.loads(out.strip().splitlines()[-1])}


def _inner_cpu(r: dict) -> float:
    return r["inner_step_cpu_s"] if r.get("inner_step_cpu_s") is not None else r["step_cpu_s"]


def fmt_row(r: dict, base: dict | None) -> str:
    """One table row; ``base``: adamw_amp of the model (ratio of in-episode CPU time), or for an
    FSDP2 row the same mode in one process (ratio of peak memory per rank)."""
    pred = r["predicted"]["total"] / r["params"]
    ranks = r.get("ranks", 1)
    if r["mode"] in DS_MODES:
        mode = f"{r['mode']}, DeepSpeed ZeRO-3 bf16 {ranks} ranks (per rank)"
    else:
        mode = r["mode"] if ranks == 1 else f"{r['mode']}, FSDP2 {ranks} ranks (per rank)"
    if "peak_bytes" not in r:
        return (f"| {r['model']} | {mode} | {pred:.1f} ({r['predicted']['total'] / 1e9:.1f} GB) | - | - | - | - "
                f"| {r['status']} |")
    if r["mode"] in DS_MODES:
        ratio = f"memory {r['peak_bytes'] / base['peak_bytes']:.2f}x ds_zero3_adamw" if base else "-"
    elif ranks > 1:
        ratio = f"memory {r['peak_bytes'] / base['peak_bytes']:.2f}x one process" if base else "-"
    else:
        ratio = f"{_inner_cpu(r) / _inner_cpu(base):.2f}" if base else "-"
    inner = f"{_inner_cpu(r):.2f}"
    boundary = f"{r['boundary_step_cpu_s']:.2f}" if r.get("boundary_step_cpu_s") is not None else "-"
    return (f"| {r['model']} | {mode} | {pred:.1f} | {r['peak_bytes'] / r['params']:.2f} | "
            f"{r['peak_bytes'] / 1e9:.2f} | {inner} / {boundary} | {ratio} | {r['status']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--resample-every", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="the models' activation checkpointing")
    ap.add_argument("--margin-gb", type=float, default=3.0, help="kept free beside a run's predicted peak")
    ap.add_argument("--max-gb", type=float, default=None, help="also skip modes predicted above this (always "
                    "skipped: above MemAvailable - margin, read before each run)")
    ap.add_argument("--abort-below-gb", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--fsdp2-ranks", type=int, default=0,
                    help="also run the GMixout modes under FSDP2 on this many gloo CPU ranks (per-rank peak)")
    ap.add_argument("--deepspeed-ranks", type=int, default=0,
                    help="run DeepSpeed ZeRO-3 bf16 (configs/deepspeed/zero3_bf16.json) on this many gloo CPU "
                    f"ranks, GMixout and AdamW under the same config ({', '.join(DS_MODES)}; --modes is ignored)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--sharded-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if args.resample_every < 1:
        raise SystemExit(f"--resample-every must be >= 1, got {args.resample_every}")
    if args.deepspeed_ranks and args.fsdp2_ranks:
        raise SystemExit("--deepspeed-ranks and --fsdp2-ranks are separate runs: give one of them")
    if args.deepspeed_ranks and args.device != "cpu":
        raise SystemExit("--deepspeed-ranks measures CPU ranks: use --device cpu")
    if args.child:
        model, mode = args.child
        print(json.dumps(child(model, mode, args.device, args.steps, args.resample_every, args.checkpointing,
                               args.sharded_out)))
        return

    import torch

    torch.set_num_threads(1)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    gpu = torch.cuda.get_device_name().replace(" ", "_") if args.device == "cuda" else None
    has_capture = capture_available()
    rows = []
    for model in args.models:
        shape = model_shape(model)
        for mode in (DS_MODES if args.deepspeed_ranks else args.modes):
            if mode in DS_MODES:
                cfg = ds_config(mode, args.deepspeed_ranks, args.resample_every)
                # every rank on this machine: the budget check is of all ranks together
                pred = {k: v * args.deepspeed_ranks for k, v in
                        predict_ds_bytes(shape, mode, args.deepspeed_ranks, cfg).items()}
                pred_rank = predict_ds_bytes(shape, mode, args.deepspeed_ranks, cfg)
            else:
                pred = pred_rank = predict_bytes(shape, mode)
            row = {"model": model, "mode": mode, "params": shape["params"], "shape": shape, "predicted": pred_rank,
                   "param_dtype": MODE_SPEC[mode][0] if mode in MODE_SPEC else "bfloat16",
                   "autocast_bf16": MODE_SPEC[mode][1] if mode in MODE_SPEC else False,
                   "activation_checkpointing": args.checkpointing, "steps": args.steps,
                   "resample_every": args.resample_every, "ranks": args.deepspeed_ranks or args.fsdp2_ranks or 1,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            if mode in DS_MODES:
                row.update(engine="deepspeed", zero_stage=3, ds_config_file=f"configs/deepspeed/{DS_CONFIG}",
                           predicted_all_ranks=pred["total"])
            if args.device == "cuda":
                free = torch.cuda.mem_get_info()[0]
            else:
                free = mem_available()
            budget = free - args.margin_gb * 1e9
            if args.max_gb is not None:
                budget = min(budget, args.max_gb * 1e9)
            if mode in MODE_SPEC and MODE_SPEC[mode][3] and not has_capture:
                row["status"] = "not available (GMixoutOptimizer has no capture_grads)"
            elif args.fsdp2_ranks and (MODE_SPEC[mode][2] != "gmixout" or args.device != "cpu"):
                continue  # the sharded measurement is of GMixout on CPU ranks
            elif pred["total"] > budget:
                row["status"] = (f"not run: predicted {pred['total'] / 1e9:.1f} GB > {budget / 1e9:.1f} GB allowed "
                                 f"(MemAvailable {free / 1e9:.1f} GB less {args.margin_gb} GB margin"
                                 + (f", --max-gb {args.max_gb}" if args.max_gb is not None else "") + ")")
            else:
                print(f"[run] {model} {mode}: predicted {pred['total'] / 1e9:.2f} GB, free {free / 1e9:.1f} GB",
                      flush=True)
                row.update(run_child(args, model, mode, args.deepspeed_ranks or args.fsdp2_ranks))
                if row["status"] == "measured" and row["skipped_steps"]:
                    row["status"] = f"measured, but {row['skipped_steps']} step(s) skipped (non-finite)"
            print(f"[{row['status']}] {model} {mode}" + (
                f": {row['peak_bytes'] / row['params']:.2f} B/param, {row['peak_bytes'] / 1e9:.2f} GB, "
                f"step {row['step_wall_s']:.2f} s" if "peak_bytes" in row else ""), flush=True)
            rows.append(row)

    what = ("peak RSS growth (VmHWM - VmRSS after importing torch and the libraries)" if args.device == "cpu"
            else "max_memory_allocated")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"memory_{gpu or 'cpu'}.json")
    if os.path.exists(out):  # keep the rows of models/modes not run this time
        with open(out) as f:
            old = json.load(f).get("rows", [])
        mine = {(r["model"], r["mode"], r.get("ranks", 1)) for r in rows}
        rows = [r for r in old if (r["model"], r["mode"], r.get("ranks", 1)) not in mine] + rows
        rows.sort(key=lambda r: (MODELS.index(r["model"]), r.get("ranks", 1), ALL_MODES.index(r["mode"])))

    print(f"\n{what}; batch 1 at {IMAGE_SIZE} px; steps / resample_every per row in the JSON")
    print("| model | mode | predicted B/param | measured B/param | GB | step CPU s (in episode / merge+redraw) "
          "| in-episode CPU / adamw_amp | status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["mode"] in DS_MODES:  # GMixout's per-rank peak against AdamW's under the same config
            base = next((a for a in rows if a["model"] == r["model"] and a["mode"] == "ds_zero3_adamw"
                         and a.get("ranks", 1) == r.get("ranks", 1) and "peak_bytes" in a), None)
        elif r.get("ranks", 1) == 1:
            base = next((a for a in rows if a["model"] == r["model"] and a["mode"] == "adamw_amp"
                         and a.get("ranks", 1) == 1 and "peak_bytes" in a), None)
        else:  # a sharded row: its per-rank peak against the same mode in one process
            base = next((a for a in rows if a["model"] == r["model"] and a["mode"] == r["mode"]
                         and a.get("ranks", 1) == 1 and "peak_bytes" in a), None)
        print(fmt_row(r, base))
    result = {"benchmark": "memory", "measure": what, "image_size": IMAGE_SIZE, "batch": 1, "p": P_MASK,
              "device": gpu or "cpu",
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": 1},
              "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
