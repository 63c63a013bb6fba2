"""Kernel and step benchmarks for GMixout (see docs/kernels.md), GPU first, CPU too.

Three sections, each written to the JSON:

- ``kernels``: each per-tensor op on one big tensor, its bandwidth against a measured
  device-to-device copy. Bytes count DRAM traffic: dense support arrays in full, and for the
  weights/gradients read or written at random positions the 32-byte sectors touched (a
  fraction ``1 - (1-keep)^(32/itemsize)`` of them).
- ``grouped``: a model preset's weight tensors (``--preset vit-bigg``: ViT-bigG's vision
  tower, 192 tensors, 1.84B parameters; ``small`` on CPU) stepped and redrawn by the kernels
  directly, per tensor (today's optimizer: a launch per tensor per op, a sync per draw) and
  grouped (one launch per op, no sync), with the non-finite check on and off, against
  ``torch.optim.AdamW(fused=True)`` (``foreach=True`` on CPU) on the same tensors.
- ``optimizer``: ``GMixoutOptimizer(AdamW, p)`` itself on the same preset, ``skip_nonfinite``
  on and off: the steps inside an episode and the boundary step (merge + redraw) apart, with
  the launches and host syncs of one of each (``kernels.record()``); on a GPU also with the
  grouped path switched off (``optimizer_per_tensor``: the per-tensor launches it replaces).

Timing: a whole episode is run before anything is timed (first-call compilation, the
allocator's pools); then batches of back-to-back calls are timed, with CUDA events around the
batch (device time) and the host clock around the enqueueing (host time), never a sync per
call. Host time above device time means the op is launch-bound.
``amortised`` = ``((k-1) * step + (step + redraw)) / k`` for ``k = --resample-every``.

Usage: python benchmarks/kernels.py [--preset vit-bigg|small] [--out DIR] [--sections ...]
Writes DIR/kernels_<device>.json (device name, torch and triton versions, date).
"""
from __future__ import annotations

import argparse
import datetime
import gc
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
from gmixout_optim.kernels import Segment, SupportPlan, TensorGroup, support_capacity
from gmixout_optim.kernels._dispatch import record, use_triton
from gmixout_optim.kernels.remap import RemapPlan, remap_state_torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def vit_shapes(width, depth, mlp):
    """Linear weights of a ViT encoder: qkv, proj, fc1, fc2 per block."""
    return [(3 * width, width), (width, width), (mlp, width), (width, mlp)] * depth


# ViT-bigG/14 (OpenCLIP): width 1664, 48 blocks, MLP 8192 -> 192 tensors, 1.840B parameters.
PRESETS = {"vit-bigg": (1664, 48, 8192), "vit-b": (768, 12, 3072), "small": (256, 2, 1024)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps, batches=5):
    """Per-call device and host seconds of ``fn`` over ``batches`` batches of ``reps`` calls.

    One call of ``fn`` is made first (the caller warms up whole episodes before this)."""
    fn()
    sync(device)
    dev, host = [], []
    for _ in range(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        if device.type == "cuda":
            end.record()
            end.synchronize()
            dev.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            dev.append((t1 - t0) / reps)
        host.append((t1 - t0) / reps)
    q = statistics.quantiles(dev, n=5) if len(dev) > 1 else dev * 4
    return {"device_s": statistics.median(dev), "host_s": statistics.median(host), "device_p20_s": q[0],
            "device_p80_s": q[-1], "reps": reps, "batches": batches}


def sector_bytes(numel, keep, itemsize):
    """DRAM bytes to touch a random fraction ``keep`` of a tensor, in 32-byte sectors."""
    per = max(1, 32 // itemsize)
    return numel * itemsize * (1 - (1 - keep) ** per)


# -- per-op bandwidth on one tensor ---------------------------------------------------------

def bench_kernels(numel, keep, dtype, device, reps):
    gen = torch.Generator(device).manual_seed(0)
    esz = torch.empty(0, dtype=dtype).element_size()
    w = torch.randn(numel, generator=gen, device=device).to(dtype)
    grad = torch.randn(numel, generator=gen, device=device).to(dtype)
    cap = support_capacity(numel, keep)
    segs = [Segment(0, numel, 0, 0)]
    support, n = K.draw_support(segs, 0, 0, keep, cap, device)
    isz = support.element_size()
    res = 0.01 * torch.randn(cap, generator=gen, device=device)
    m, s = torch.zeros(cap, device=device), torch.rand(cap, generator=gen, device=device) * 1e-4
    anchor = w[support[:n].long()].clone() if dtype != torch.float32 else None
    out = torch.empty(cap, device=device)
    flag = torch.zeros(1, device=device)
    a32 = K.support_anchor(w, support, n, res, keep)
    sw = sg = sector_bytes(numel, keep, esz)  # w and grad share a dtype: the same sectors
    anc_bytes = n * esz if anchor is not None else sw  # stored anchor, or w[S] read
    # copy reference: as many bytes as w, and at least 256 MiB on GPU (H100/H200 L2: 50-60 MiB)
    floor = (256 if device.type == "cuda" else 64) << 20
    big = torch.empty(max(numel * esz, floor) // 4, device=device)
    dst = torch.empty_like(big)
    adam = dict(step=10, lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, keep=keep)
    ops = {
        "copy (reference)": (lambda: dst.copy_(big), 2 * big.numel() * 4),
        "draw_support": (lambda: K.draw_support(segs, 0, 1, keep, cap, device), cap * isz),
        "gather_grad": (lambda: K.gather_grad(grad, support, n, keep, out), n * isz + sg + cap * 4),
        "gather_grad+check": (lambda: K.gather_grad(grad, support, n, keep, out, flag), n * isz + sg + cap * 4),
        "support_anchor": (lambda: K.support_anchor(w, support, n, res, keep), n * isz + sw + 2 * n * 4),
        "write_weights": (lambda: K.write_weights(w, support, n, anchor if anchor is not None else a32, res, keep),
                          n * isz + n * (esz if anchor is not None else 4) + n * 4 + sw),
        "merge_episode": (lambda: K.merge_episode(w, support, n, res, anchor, keep, 0.0),
                          n * isz + anc_bytes + n * 4 + sw),
        "fused_adamw_step": (lambda: K.fused_adamw_step(w, grad, support, n, res, m, s, anchor, **adam),
                             n * isz + sg + anc_bytes + 6 * n * 4 + sw),
        # the checked gather's output read back instead of grad[S]: 4 B more per slot, no sectors
        "fused_adamw_step(compact, found_inf)": (
            lambda: K.fused_adamw_step(w, None, support, n, res, m, s, anchor, **adam, compact_grad=out,
                                       found_inf=flag), n * isz + n * 4 + anc_bytes + 6 * n * 4 + sw),
    }
    rows = {}
    for name, (fn, nbytes) in ops.items():
        t = timed(fn, device, reps)
        rows[name] = dict(t, bytes=nbytes, gbps=nbytes / t["device_s"] / 1e9)
    copy_bw = rows["copy (reference)"]["gbps"]
    for r in rows.values():
        r["vs_copy"] = r["gbps"] / copy_bw
    return {"numel": numel, "keep": keep, "dtype": str(dtype), "n": n, "capacity": cap,
            "backend": "triton" if use_triton(w) else "torch", "ops": rows}


# -- the preset, per tensor against grouped -------------------------------------------------

class Model:
    """A preset's weights and gradients, built on the device (no host copy of 1.84B values)."""

    def __init__(self, shapes, dtype, device, keep):
        gen = torch.Generator(device).manual_seed(0)
        self.shapes, self.keep, self.device, self.dtype = shapes, keep, device, dtype
        self.params = [(0.02 * torch.randn(math.prod(s), generator=gen, device=device)).to(dtype) for s in shapes]
        self.grads = [(1e-3 * torch.randn(p.numel(), generator=gen, device=device)).to(dtype) for p in self.params]
        self.caps = [support_capacity(p.numel(), keep) for p in self.params]
        self.numel = sum(p.numel() for p in self.params)


def bench_grouped(model: Model, device, k, reps):
    keep, T = model.keep, len(model.params)
    caps, params, grads = model.caps, model.params, model.grads
    plan = SupportPlan([([Segment(0, p.numel(), t, 0)], c) for t, (p, c) in enumerate(zip(params, caps))],
                       [keep] * T, device)
    flat, n = K.draw_support_grouped(plan, 0, [0] * T)
    supports = plan.split(flat)
    group = TensorGroup(params, supports, [keep] * T, n)
    sizes = n.tolist()
    anchored = model.dtype != torch.float32
    state = [[torch.zeros(c, device=device) for c in caps] for _ in range(3)]  # residual, exp_avg, exp_avg_sq
    spare = [[torch.zeros(c, device=device) for c in caps] for _ in range(2)]  # remap destinations
    anchors = [p[s[:m].long()].clone() if anchored else None for p, s, m in zip(params, supports, sizes)]
    anchors = [None if a is None else torch.cat([a, a.new_zeros(c - a.numel())]) for a, c in zip(anchors, caps)]
    compact = [torch.zeros(c, device=device) for c in caps]
    flag = torch.zeros(1, device=device)
    steps = torch.zeros(T, device=device)
    hp = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True)
    coeff = [0.1 / keep] * T
    episode = [1]

    def step_grouped(check):
        def fn():
            if check:
                flag.zero_()
                K.gather_grad_grouped(group, grads, compact, flag)
                K.fused_adamw_step_grouped(group, None, *state, anchors, steps=steps, **hp, compact_grads=compact,
                                           found_inf=flag)
            else:
                K.fused_adamw_step_grouped(group, grads, *state, anchors, steps=steps, **hp)
        return fn

    def step_per_tensor(check):
        def fn():
            if check:
                flag.zero_()
            for t in range(T):
                kw = dict(hp, step=10, keep=keep)
                if check:
                    K.gather_grad(grads[t], supports[t], sizes[t], keep, compact[t], flag)
                    K.fused_adamw_step(params[t], None, supports[t], sizes[t], state[0][t], state[1][t], state[2][t],
                                       anchors[t], **kw, compact_grad=compact[t], found_inf=flag)
                else:
                    K.fused_adamw_step(params[t], grads[t], supports[t], sizes[t], state[0][t], state[1][t],
                                       state[2][t], anchors[t], **kw)
        return fn

    old_flat = flat.clone()

    def redraw_grouped():
        K.merge_episode_grouped(group, state[0], anchors, coeff)
        old_flat.copy_(flat)
        episode[0] += 1
        _, n_new = K.draw_support_grouped(plan, 0, [episode[0]] * T, out=flat)
        K.remap_state_grouped(remap_plan, old_flat, group.n, flat, n_new, state[1:], spare)
        group.n = n_new
        if bool((n_new > plan.cap).any()):  # the one batched capacity check of a redraw
            raise RuntimeError("support overflow in the benchmark")

    def redraw_per_tensor():
        episode[0] += 1
        for t in range(T):
            K.merge_episode(params[t], supports[t], sizes[t], state[0][t], anchors[t], keep, coeff[t])
            new, m = K.draw_support([Segment(0, params[t].numel(), t, 0)], 0, episode[0], keep, caps[t], device)
            remap_state_torch(supports[t], sizes[t], new, m, [state[1][t], state[2][t]])
            supports[t].copy_(new)
            sizes[t] = m

    remap_plan = RemapPlan(caps, device)
    rows = {}
    # The grouped path first, then the per-tensor one: both share the supports, and each keeps
    # its own record of their sizes (group.n on the device, `sizes` on the host), refreshed in
    # between. Each path runs a whole episode (and a redraw) before it is timed.
    for path, step, redraw in (("grouped", step_grouped, redraw_grouped),
                               ("per_tensor", step_per_tensor, redraw_per_tensor)):
        if path == "per_tensor":
            sizes[:] = group.n.tolist()
        for check in (False, True):
            for _ in range(k):
                step(check)()
        redraw()
        sync(device)
        for check in (False, True):
            tag = "check" if check else "nocheck"
            rows[f"step_{path}_{tag}"] = timed(step(check), device, reps)
            with record() as ev:
                step(check)()
            rows[f"step_{path}_{tag}"]["events"] = {f"{a}:{b}": c for (a, b), c in ev.items()}
        rows[f"redraw_{path}"] = timed(redraw, device, 1, batches=3)
        with record() as ev:
            redraw()
        rows[f"redraw_{path}"]["events"] = {f"{a}:{b}": c for (a, b), c in ev.items()}
    del state, spare, compact, anchors, group
    gc.collect()
    # the baseline on the same tensors
    ps = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    base_kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    base = torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.0, eps=1e-8, **base_kw)
    for _ in range(3):
        base.step()
    rows["adamw_baseline"] = timed(base.step, device, reps)
    rows["adamw_baseline"]["optimizer"] = f"AdamW({next(iter(base_kw))}=True)"
    del base, ps
    gc.collect()
    b = rows["adamw_baseline"]["device_s"]
    ratios = {}
    for path in ("grouped", "per_tensor"):
        for tag in ("nocheck", "check"):
            st = max(rows[f"step_{path}_{tag}"]["device_s"], rows[f"step_{path}_{tag}"]["host_s"])
            rd = max(rows[f"redraw_{path}"]["device_s"], rows[f"redraw_{path}"]["host_s"])
            ratios[f"{path}_{tag}"] = {"step_vs_adamw": st / b, "amortised_vs_adamw": (st + rd / k) / b}
    return {"tensors": T, "params": model.numel, "dtype": str(model.dtype), "keep": keep, "resample_every": k,
            "n_total": sum(sizes), "rows": rows, "ratios": ratios}


# -- the optimizer itself -------------------------------------------------------------------

def bench_optimizer(model: Model, device, k, skip_nonfinite, use_grouped=True):
    from gmixout_optim import GMixoutOptimizer, grouped, kernels

    grouped.set_enabled(use_grouped)

    ps = [torch.nn.Parameter(p) for p in model.params]
    for p, g in zip(ps, model.grads):
        p.grad = g
    opt = GMixoutOptimizer(ps, inner="AdamW", p=1 - model.keep, resample_every=k, skip_nonfinite=skip_nonfinite,
                           lr=1e-5, weight_decay=0.0, eps=1e-8)
    for _ in range(k):  # a whole episode: state created, first redraw done
        opt.step()
    counts = {}
    for name, calls in (("step", k - 1), ("boundary_step", 1)):  # an episode more, counted
        with kernels.record() as events:
            opt.step()
        counts[name] = {f"{kind}:{op}": n for (kind, op), n in sorted(events.items())}
        for _ in range(calls - 1):
            opt.step()
    sync(device)
    # per episode: steps 1 .. k-1 as one batch (no boundary among them), then the boundary
    # step (merge + redraw + remap) alone
    inner, boundary = {"device_s": [], "host_s": []}, {"device_s": [], "host_s": []}
    for _ in range(2):
        for calls, rec in ((k - 1, inner), (1, boundary)):
            sync(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(calls):
                opt.step()
            t1 = time.perf_counter()
            if device.type == "cuda":
                end.record()
                end.synchronize()
                rec["device_s"].append(start.elapsed_time(end) / 1e3 / calls)
            else:
                rec["device_s"].append((t1 - t0) / calls)
            rec["host_s"].append((t1 - t0) / calls)
    inner = {key: statistics.median(v) for key, v in inner.items()}
    boundary = {key: statistics.median(v) for key, v in boundary.items()}
    del opt, ps
    gc.collect()
    grouped.set_enabled(True)
    return {"skip_nonfinite": skip_nonfinite, "grouped": use_grouped, "step": inner, "boundary_step": boundary,
            "amortised_s": ((k - 1) * inner["device_s"] + boundary["device_s"]) / k, "events": counts}


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
    ap.add_argument("--numel", type=int, default=None, help="per-op tensor size (default 64M GPU, 4M CPU)")
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--preset", choices=list(PRESETS), default=None, help="default vit-bigg on GPU, small on CPU")
    ap.add_argument("--resample-every", type=int, default=50)
    ap.add_argument("--reps", type=int, default=None, help="calls per timed batch (default 20 GPU, 3 CPU)")
    ap.add_argument("--sections", nargs="+", default=["kernels", "grouped", "optimizer"],
                    choices=["kernels", "grouped", "optimizer"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the build machine is shared)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    keep, dtype = 1 - args.p, DTYPES[args.dtype]
    reps = args.reps or (20 if gpu else 3)
    preset = args.preset or ("vit-bigg" if gpu else "small")
    k = args.resample_every
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    result = {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
              "cpu_threads": None if gpu else torch.get_num_threads(),
              # CPU figures on a shared machine move with its load: record it
              "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "preset": preset}
    print(f"{name} | torch {torch.__version__} | triton {triton_version} | keep={keep:g}, {args.dtype}")

    if "kernels" in args.sections:
        numel = args.numel or (64 << 20 if gpu else 4 << 20)
        kern = bench_kernels(numel, keep, dtype, device, reps)
        result["kernels"] = kern
        print(f"per-op, {numel} elements, n={kern['n']}, {kern['backend']} path")
        print(f"  {'op':<38}{'device ms':>11}{'host ms':>10}{'GB/s':>9}{'vs copy':>9}")
        for op, r in kern["ops"].items():
            print(f"  {op:<38}{r['device_s'] * 1e3:>11.3f}{r['host_s'] * 1e3:>10.3f}{r['gbps']:>9.1f}"
                  f"{r['vs_copy']:>9.2f}")
        gc.collect()

    model = Model(vit_shapes(*PRESETS[preset]), dtype, device, keep) if {"grouped", "optimizer"} & set(args.sections) \
        else None
    if "grouped" in args.sections:
        g = bench_grouped(model, device, k, reps)
        result["grouped"] = g
        print(f"{preset}: {g['tensors']} tensors, {g['params'] / 1e9:.3f}B params, n={g['n_total']}, k={k}")
        print(f"  {'':<26}{'device ms':>11}{'host ms':>10}")
        for key, r in g["rows"].items():
            print(f"  {key:<26}{r['device_s'] * 1e3:>11.3f}{r['host_s'] * 1e3:>10.3f}")
        for key, r in g["ratios"].items():
            print(f"  {key:<26} step {r['step_vs_adamw']:.2f}x AdamW, amortised {r['amortised_vs_adamw']:.2f}x")
    if "optimizer" in args.sections:
        result["optimizer"] = [bench_optimizer(model, device, k, skip) for skip in (True, False)]
        if device.type == "cuda":
            result["optimizer_per_tensor"] = [bench_optimizer(model, device, k, skip, use_grouped=False)
                                              for skip in (True, False)]
        for r in result["optimizer"] + result.get("optimizer_per_tensor", []):
            print(f"  GMixoutOptimizer skip_nonfinite={r['skip_nonfinite']} grouped={r['grouped']}: step "
                  f"{r['step']['device_s'] * 1e3:.3f} ms (host {r['step']['host_s'] * 1e3:.3f}), boundary "
                  f"{r['boundary_step']['device_s'] * 1e3:.3f} ms, amortised {r['amortised_s'] * 1e3:.3f} ms")
            print(f"    step events {r['events']['step']}")

    slug = "cpu" if not gpu else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
