"""Training-step throughput (forward + backward + optimizer step) of a small timm ViT, CPU.

Three ways to fine-tune the same model in one process:
- ``adamw``: full fine-tuning with torch AdamW;
- ``gmixout``: ``GMixoutOptimizer`` (AdamW inner) over ``gmixout_param_groups``;
- ``mixout``: module-level Mixout (``MixoutReference``: a fresh Bernoulli mask of every weight
  at every forward, ``torch.func.functional_call``) with AdamW.

Timing: the methods take turns, ``--rounds`` rounds of ``--steps`` steps each after warmup, so
load from other processes hits all of them alike; the figure per method is the median over
rounds of the mean step time. Both wall time and the process's CPU time are taken; the
ratios use CPU time (``--clock cpu``, default), which other jobs on a shared machine disturb
far less than wall time (with one torch thread, CPU time = compute time). Goals (issue 6):
gmixout >= 1.0x adamw and >= 1.2x mixout.

    python benchmarks/throughput.py [--steps 5 --rounds 5 --batch 32 --threads 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def build_vit(seed: int):
    import timm

    torch.manual_seed(seed)
    # ViT-Tiny widths (192, 3 heads) at 12 layers, 32 px images in 4 px patches: 64 tokens.
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)


def make_runner(kind: str, seed: int = 0):
    from gmixout_optim import GMixoutOptimizer, gmixout_param_groups
    from gmixout_optim.reference import MixoutReference

    model = build_vit(seed).train()
    if kind == "adamw":
        net, opt = model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    elif kind == "gmixout":
        net = model
        opt = GMixoutOptimizer(gmixout_param_groups(model, weight_decay=0.05), inner="AdamW", lr=1e-4,
                               p=0.9, ema_decay=0.3, resample_every=50, seed=seed)
    elif kind == "mixout":
        net = MixoutReference(model, p=0.9, seed=seed).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    else:
        raise ValueError(f"unknown kind {kind!r}; allowed: adamw, gmixout, mixout")

    def step(x, y):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="which time the ratios use")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "throughput.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    kinds = ("adamw", "gmixout", "mixout")
    runners = {k: make_runner(k) for k in kinds}
    for k in kinds:
        for _ in range(args.warmup):
            runners[k][0](x, y)
    wall = {k: [] for k in kinds}
    cpu = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                runners[k][0](x, y)
            wall[k].append((time.perf_counter() - t) / args.steps)
            cpu[k].append((time.process_time() - c) / args.steps)
    per_round = cpu if args.clock == "cpu" else wall
    step_s = {k: statistics.median(v) for k, v in per_round.items()}
    rows = [{"method": k, "clock": args.clock, "step_s_median": step_s[k], "wall_s_rounds": wall[k],
             "cpu_s_rounds": cpu[k], "wall_s_median": statistics.median(wall[k]),
             "images_per_s": args.batch / step_s[k], "speedup_vs_adamw": step_s["adamw"] / step_s[k],
             "speedup_vs_mixout": step_s["mixout"] / step_s[k]} for k in kinds]
    print(f"ViT-Tiny/4 at 32 px, {runners['adamw'][1] / 1e6:.2f}M params, batch {args.batch}, "
          f"{args.threads} thread(s), median of {args.rounds} rounds x {args.steps} steps, {args.clock} time")
    print(f"{'method':8s} {'s/step':>8s} {'img/s':>8s} {'vs adamw':>9s} {'vs mixout':>10s}")
    for r in rows:
        print(f"{r['method']:8s} {r['step_s_median']:8.4f} {r['images_per_s']:8.1f} {r['speedup_vs_adamw']:8.2f}x "
              f"{r['speedup_vs_mixout']:9.2f}x")
    import timm
    result = {"benchmark": "throughput", "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "threads": args.threads, "load_avg": os.getloadavg()},
              "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
