"""Kernel and optimizer-step benchmarks for GMixout (see docs/kernels.md).

GPU: each kernel's achieved bandwidth against a measured device-to-device copy, and the step
time of GMixout(AdamW, p=0.9) against torch.optim.AdamW(fused=True) on the same parameters.
CPU: the PyTorch path, against a CPU copy and AdamW(foreach=True).

Bytes are counted as DRAM traffic: the dense arrays of the support (indices, residual,
moments) in full, and for the weights/gradients gathered or scattered at random positions
the 32-byte sectors touched (a fraction 1 - (1-keep)^(32/itemsize) of them).

Usage: python benchmarks/kernels.py [--numel N] [--p 0.9] [--dtype bf16] [--out DIR]
Writes <out>/kernels_<device>.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from gmixout_optim import kernels as K
from gmixout_optim.kernels import Segment, support_capacity
from gmixout_optim.kernels._dispatch import use_triton

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, device, warmup=3, iters=20):
    """Median and 20/80% quantiles of ``fn``'s wall time in seconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_s": statistics.median(times), "mean_s": statistics.mean(times),
            "p20_s": q[0], "p80_s": q[-1]}


def sector_bytes(numel, keep, itemsize):
    """DRAM bytes to touch a random fraction ``keep`` of a tensor, in 32-byte sectors."""
    per = max(1, 32 // itemsize)
    return numel * itemsize * (1 - (1 - keep) ** per)


def bench_kernels(numel, keep, dtype, device, iters):
    gen = torch.Generator().manual_seed(0)
    esz = torch.empty(0, dtype=dtype).element_size()
    w = torch.randn(numel, generator=gen).to(device, dtype)
    grad = torch.randn(numel, generator=gen).to(device, dtype)
    cap = support_capacity(numel, keep)
    segs = [Segment(0, numel, 0, 0)]
    support, n = K.draw_support(segs, 0, 0, keep, cap, device)
    isz = support.element_size()
    res = (0.01 * torch.randn(cap, generator=gen)).to(device)
    m, s = torch.zeros(cap, device=device), torch.rand(cap, generator=gen).to(device) * 1e-4
    anchor = w[support[:n].long()].clone() if dtype != torch.float32 else None
    out = torch.empty(cap, device=device)
    a32 = K.support_anchor(w, support, n, res, keep)
    sw = sg = sector_bytes(numel, keep, esz)  # w and grad share a dtype: the same sectors
    anc_bytes = n * esz if anchor is not None else sw  # stored anchor, or w[S] read
    # copy reference: as many bytes as w, and at least 256 MiB on GPU (H100 L2: 50 MiB) and
    # 64 MiB on CPU, so it measures DRAM and not a cache
    floor = (256 if device.type == "cuda" else 64) << 20
    big = torch.empty(max(numel * esz, floor) // 4, device=device)
    dst = torch.empty_like(big)
    ops = {
        "copy (reference)": (lambda: dst.copy_(big), 2 * big.numel() * 4),
        "draw_support": (lambda: K.draw_support(segs, 0, 1, keep, cap, device), cap * isz),
        "gather_grad": (lambda: K.gather_grad(grad, support, n, keep, out), n * isz + sg + cap * 4),
        "support_anchor": (lambda: K.support_anchor(w, support, n, res, keep), n * isz + sw + 2 * n * 4),
        "write_weights": (lambda: K.write_weights(w, support, n, anchor if anchor is not None else a32, res, keep),
                          n * isz + n * (esz if anchor is not None else 4) + n * 4 + sw),
        "merge_episode": (lambda: K.merge_episode(w, support, n, res, anchor, keep, 0.0),
                          n * isz + anc_bytes + n * 4 + sw),
        "fused_adamw_step": (lambda: K.fused_adamw_step(
            w, grad, support, n, res, m, s, anchor, step=10, lr=1e-5, beta1=0.9, beta2=0.999,
            eps=1e-8, weight_decay=0.0, decoupled=True, keep=keep),
            n * isz + sg + anc_bytes + 6 * n * 4 + sw),
    }
    rows = {}
    for name, (fn, nbytes) in ops.items():
        t = timed(fn, device, iters=iters)
        rows[name] = dict(t, bytes=nbytes, gbps=nbytes / t["median_s"] / 1e9,
                          melem_per_s=numel / t["median_s"] / 1e6)  # weight elements covered
    copy_bw = rows["copy (reference)"]["gbps"]
    for r in rows.values():
        r["vs_copy"] = r["gbps"] / copy_bw
    return {"numel": numel, "keep": keep, "dtype": str(dtype), "n": n, "capacity": cap,
            "backend": "triton" if use_triton(w) else "torch", "ops": rows}


def vit_like_shapes(width, depth):
    """Linear weights of a ViT encoder: qkv, proj, fc1, fc2 per block."""
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)] * depth


def bench_step(width, depth, keep, dtype, device, resample_every):
    from gmixout_optim import GMixoutOptimizer

    gen = torch.Generator().manual_seed(0)
    shapes = vit_like_shapes(width, depth)

    def params():
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(device, dtype) * 1e-3
        return ps

    hp = dict(lr=1e-5, weight_decay=1e-4, eps=1e-8)
    base_kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    base = torch.optim.AdamW(params(), **hp, **base_kw)
    gm = GMixoutOptimizer(params(), inner="AdamW", p=1 - keep, resample_every=resample_every, **hp)
    tb = timed(base.step, device, iters=2 * resample_every)  # as many samples as GMixout's
    gm.step()  # creates the state and draws the first supports
    # two whole episodes, one step at a time: the median is a step inside an episode, the
    # mean includes the merge + redraw that ends each episode
    tg = timed(gm.step, device, warmup=0, iters=2 * resample_every)
    return {"params": sum(math.prod(s) for s in shapes), "tensors": len(shapes), "dtype": str(dtype),
            "keep": keep, "resample_every": resample_every,
            "baseline": "AdamW(fused=True)" if device.type == "cuda" else "AdamW(foreach=True)",
            "baseline_step": tb, "gmixout_step": tg,
            "ratio_in_episode": tg["median_s"] / tb["median_s"],
            "ratio_amortised": tg["mean_s"] / tb["median_s"]}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux: the CPU model; elsewhere whatever platform knows
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--numel", type=int, default=None, help="kernel tensor size (default 64M GPU, 4M CPU)")
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--width", type=int, default=None, help="ViT width for the step (768 GPU, 256 CPU)")
    ap.add_argument("--depth", type=int, default=None, help="ViT depth for the step (12 GPU, 4 CPU)")
    ap.add_argument("--resample-every", type=int, default=50)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the build machine is shared)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    numel = args.numel or (64 << 20 if gpu else 4 << 20)
    iters = args.iters or (50 if gpu else 5)
    keep, dtype = 1 - args.p, DTYPES[args.dtype]

    kern = bench_kernels(numel, keep, dtype, device, iters)
    step = bench_step(args.width or (768 if gpu else 256), args.depth or (12 if gpu else 4),
                      keep, dtype, device, args.resample_every)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    result = {"device": name, "device_type": device.type, "torch": torch.__version__,
              "triton": triton_version, "cpu_threads": None if gpu else torch.get_num_threads(),
              # CPU figures on a shared machine move with its load: record it
              "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "kernels": kern, "step": step}

    print(f"{name} | torch {torch.__version__} | triton {triton_version} | {kern['backend']} path | "
          f"{numel} elements {args.dtype}, keep={keep:g}, n={kern['n']}")
    print(f"{'op':<20}{'median ms':>12}{'GB/s':>10}{'vs copy':>10}{'Melem/s':>12}")
    for op, r in kern["ops"].items():
        print(f"{op:<20}{r['median_s'] * 1e3:>12.3f}{r['gbps']:>10.1f}{r['vs_copy']:>10.2f}"
              f"{r['melem_per_s']:>12.1f}")
    print(f"step, {step['params']} params in {step['tensors']} tensors ({args.dtype}), "
          f"resample_every={step['resample_every']}:")
    print(f"  {step['baseline']:<22}{step['baseline_step']['median_s'] * 1e3:>10.3f} ms")
    print(f"  {'GMixout(AdamW) in episode':<22}{step['gmixout_step']['median_s'] * 1e3:>10.3f} ms"
          f"   ratio {step['ratio_in_episode']:.2f}")
    print(f"  {'GMixout(AdamW) amortised':<22}{step['gmixout_step']['mean_s'] * 1e3:>10.3f} ms"
          f"   ratio {step['ratio_amortised']:.2f}")

    slug = "cpu" if not gpu else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
