"""Step time and optimizer-state memory of GMixoutOptimizer against plain AdamW, on CPU.

Both optimizers step the same parameters (one process, the same shapes, the same gradients):
a ViT-B-like list of Linear weights, per block qkv 2304x768, proj 768x768, fc1 3072x768,
fc2 768x3072 (``--blocks`` of them; ViT-B has 12).

  ratio (in-episode)  = median step time of GMixout(AdamW(foreach=True), p) / AdamW(foreach=True)
  ratio (amortised)   = ((k-1) * median in-episode step + median boundary step) / k / AdamW
                        (the boundary step also merges, redraws the support and remaps the state)
  extra state bytes   = bytes of every tensor in opt.state for the GMixout tensors (their own
                        entry and the inner state of their residual) / their element count.
                        AdamW's exp_avg + exp_avg_sq hold 8 bytes per element.

Steps of the two optimizers are interleaved so that load from other processes hits both alike;
medians are taken after a warm-up. Prints a table and writes JSON (default
benchmarks/results/optimizer_step_cpu.json) with the machine, torch version and date.

Run: python benchmarks/optimizer_step.py [--blocks 12] [--episodes 2] [--threads 1]
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

from gmixout_optim import GMixoutOptimizer

BLOCK = [(3 * 768, 768), (768, 768), (4 * 768, 768), (768, 4 * 768)]


def tensor_bytes(obj, seen) -> int:
    """Bytes of the tensors reachable from obj (dicts/lists/tuples), each storage counted once."""
    if torch.is_tensor(obj):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def gmixout_state_bytes(opt: GMixoutOptimizer, params) -> tuple[int, dict]:
    seen, total, by_key = set(), 0, {}
    for w in params:
        st = opt.state[w]
        entries = dict(st)
        if "residual" in st:
            entries.update({f"inner.{k}": v for k, v in opt.state.get(st["residual"], {}).items()})
        for key, val in entries.items():
            b = tensor_bytes(val, seen)
            by_key[key] = by_key.get(key, 0) + b
            total += b
    return total, by_key


def hidden_tensor_bytes(opt) -> int:
    """Tensors the wrapper holds outside opt.state (none expected)."""
    seen = set()
    return sum(tensor_bytes(val, seen) for name, val in vars(opt).items()
               if name not in ("_state", "_inner", "param_groups", "state"))


def make_params(blocks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for _ in range(blocks):
        for shape in BLOCK:
            params.append(torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02))
            grads.append(torch.randn(shape, generator=g) * 1e-3)
    return params, grads


def timed_step(opt) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--resample-every", type=int, default=50)
    ap.add_argument("--episodes", type=int, default=2, help="timed GMixout episodes (k steps each)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "optimizer_step_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    k = args.resample_every
    hp = dict(lr=1e-4, weight_decay=0.05, foreach=True)

    dense_params, grads = make_params(args.blocks)
    gm_params = [torch.nn.Parameter(p.detach().clone()) for p in dense_params]
    for p, q, g in zip(dense_params, gm_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    numel = sum(p.numel() for p in gm_params)
    adamw = torch.optim.AdamW(dense_params, **hp)
    gmix = GMixoutOptimizer(gm_params, inner="AdamW", p=args.p, ema_decay=0.3, resample_every=k, **hp)

    for _ in range(args.warmup):  # creates all state; GMixout is then `warmup` steps into episode 0
        adamw.step()
        gmix.step()
    while gmix.state[gm_params[0]]["episode_step"] != 0:  # align to an episode start
        gmix.step()

    t_dense, t_in, t_boundary = [], [], []
    for _ in range(args.episodes * k):
        t_dense.append(timed_step(adamw))
        t = timed_step(gmix)
        (t_boundary if gmix.state[gm_params[0]]["episode_step"] == 0 else t_in).append(t)

    dense_med = statistics.median(t_dense)
    in_med = statistics.median(t_in)
    bnd_med = statistics.median(t_boundary)
    amortised = ((k - 1) * in_med + bnd_med) / k
    state_total, by_key = gmixout_state_bytes(gmix, gm_params)
    adamw_total = tensor_bytes([adamw.state[p] for p in dense_params], set())
    hidden = hidden_tensor_bytes(gmix)

    result = {
        "benchmark": "optimizer_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]]},
        "torch": torch.__version__,
        "config": {"blocks": args.blocks, "shapes_per_block": BLOCK, "numel": numel, "p": args.p,
                   "resample_every": k, "inner": "AdamW", "inner_kwargs": hp, "dtype": "float32",
                   "timed_steps_each": args.episodes * k, "warmup": args.warmup},
        "time_s": {"adamw_median": dense_med, "gmixout_in_episode_median": in_med,
                   "gmixout_boundary_median": bnd_med, "gmixout_amortised": amortised,
                   "adamw_all": t_dense, "gmixout_in_episode_all": t_in, "gmixout_boundary_all": t_boundary},
        "ratio": {"in_episode": in_med / dense_med, "amortised": amortised / dense_med, "goal": 0.8,
                  # the same medians amortised over other episode lengths
                  "amortised_at_k": {kk: ((kk - 1) * in_med + bnd_med) / kk / dense_med for kk in (50, 100, 200)}},
        "state_bytes_per_param": {"gmixout": state_total / numel, "adamw": adamw_total / numel, "goal": 1.6,
                                  "gmixout_by_key": {key: b / numel for key, b in by_key.items()},
                                  "gmixout_tensors_outside_state": hidden},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)

    rows = [
        ("AdamW(foreach) step, median", f"{dense_med * 1e3:.1f} ms", ""),
        ("GMixout in-episode step, median", f"{in_med * 1e3:.1f} ms", f"ratio {in_med / dense_med:.3f}"),
        (f"GMixout boundary step, median (1 in {k})", f"{bnd_med * 1e3:.1f} ms", ""),
        ("GMixout amortised step", f"{amortised * 1e3:.1f} ms", f"ratio {amortised / dense_med:.3f} (goal <= 0.8)"),
        ("AdamW state bytes / param", f"{adamw_total / numel:.3f}", ""),
        (f"GMixout state bytes / param (p={args.p})", f"{state_total / numel:.3f}", "goal <= 1.6"),
    ] + [(f"  of which {key}", f"{b / numel:.3f}", "") for key, b in sorted(by_key.items())] + [
        ("tensors held outside opt.state", f"{hidden} B", ""),
    ]
    print(f"{args.blocks} ViT-B blocks, {numel / 1e6:.1f}M fp32 parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.episodes * k} timed steps each, "
          f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
