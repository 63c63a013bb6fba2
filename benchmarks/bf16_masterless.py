"""Accuracy of GMixout with bf16 parameters and no fp32 master copy, against fp32 GMixout.

The large-model recipe stores every parameter in bf16 and keeps no fp32 master weights:
inside an episode the fp32 residual ``v`` is GMixout's accumulator (the weight on the support
is rewritten as ``bf16(A[S] + v/keep)`` from the bf16 anchor each step, so rounding errors do
not pile up step after step), and a GMixout weight is rounded to bf16 once per episode, at the
merge. Dense parameters (head, norms, biases) are plain AdamW on bf16 tensors. This script
measures what that costs on the embedded benchmark (configs/experiments/demo.yaml: ImageNet-
pretrained EfficientNet-Lite0 on the MNIST subset at 32 px, batch 32, the demo's GMixout
hyperparameters, schedule and test sets; ID = MNIST test, OOD = digits + 9 corruptions at
severity 3), with the budget pinned here (``--steps`` 300, ``--n-test`` 1000: the demo's when
this was first measured), so that later edits of the demo config do not change the figures.

Per seed and precision: the model is built by the fine-tune harness, cast to the precision
(``bf16``: parameters and buffers, inputs cast too; ``bf16_matrices``: only the GMixout tensors,
forward under bf16 autocast; the loss is taken on fp32 logits), trained
with the harness's GMixout method (``make_method("gmixout")``) and schedule (``lr_factor``),
finalized, then cast to fp32 (exact for bf16 values) so that BatchNorm re-estimation (10 ID
training batches, the harness's ``train._Tools.recalibrate_bn``) and scoring run in the same
arithmetic for both precisions: the difference measured is that of training and storing the
weights in bf16.

Run: python benchmarks/bf16_masterless.py [--seeds 0 1 2] [--precisions fp32 bf16 bf16_matrices] [--steps 300]
Writes benchmarks/results/bf16_masterless.json and prints ID / mean OOD per seed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's gmixout_optim, not an installed one

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from gmixout_optim.finetune import data as D  # noqa: E402
from gmixout_optim.finetune.cli import load_config  # noqa: E402
from gmixout_optim.finetune.evaluate import evaluate_sets, load_test_tensors  # noqa: E402
from gmixout_optim.finetune.experiment import validate  # noqa: E402
from gmixout_optim.finetune.methods import make_method  # noqa: E402
from gmixout_optim.finetune.models import build_model  # noqa: E402
from gmixout_optim.finetune.train import _Tools, id_data_source, lr_factor  # noqa: E402

# fp32: everything fp32. bf16: every parameter and buffer bf16. bf16_matrices: the GMixout
# tensors (Conv/Linear weights outside the head) bf16, the small dense tensors (norms, biases,
# head: 0.2% of a ViT's parameters) fp32, forward under bf16 autocast: plain AdamW on a bf16
# tensor drops every update below half an ulp (a BatchNorm weight near 1 has ulp 2**-7, far
# above lr 1e-3), which GMixout's fp32 residual avoids for its own tensors only.
PRECISIONS = ("fp32", "bf16", "bf16_matrices")


def train_one(cfg: dict, precision: str, seed: int, steps: int) -> tuple[nn.Module, dict]:
    from gmixout_optim import gmixout_param_groups

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    torch.manual_seed(seed)
    model, info = build_model(cfg["model"], 10, None, list(D.CLASS_NAMES), head_seed=seed)
    if precision == "bf16":
        model = model.to(dtype)
    elif precision == "bf16_matrices":
        for group in gmixout_param_groups(model, head_names=info.head_names):
            for prm in group["params"] if group["gmixout"] else ():
                prm.data = prm.data.to(dtype)
    autocast = precision == "bf16_matrices"
    in_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    batches, _ = id_data_source(cfg, model, info, seed)
    method = make_method("gmixout", cfg["method_params"].get("gmixout", {}), seed)
    net = method.setup(model, info.head_names)
    opt = method.make_optimizer(net)
    base = [g["lr"] for g in opt.param_groups]
    warm = float(cfg["train"].get("warmup_frac", 0.1))
    net.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, steps, warm)
        x, y = batches.next()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x.to(in_dtype))
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = method.finish(net, None).float()
    wall = time.perf_counter() - t0
    # the harness's BN re-estimation: a cumulative average over bn_batches ID training batches
    _Tools(None, batches, int(cfg["train"].get("bn_batches", 10))).recalibrate_bn(final)
    return final, {"train_wall_s": wall, "final_loss_mean_last10": statistics.mean(losses[-10:]),
                   "skipped_steps": opt.skipped_steps, "info": info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "experiments", "demo.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS)
    ap.add_argument("--steps", type=int, default=300, help="training steps (batch 32)")
    ap.add_argument("--n-test", type=int, default=1000, help="images per test set (ID test and each corruption)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "bf16_masterless"),
                    help="cache of the corrupted test sets (git-ignored)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bf16_masterless.json"),
                    help="runs already in this file (same seed, precision, steps) are kept and not rerun")
    args = ap.parse_args()
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.steps < 1 or args.n_test < 1:
        raise SystemExit(f"--steps and --n-test must be >= 1, got {args.steps} and {args.n_test}")
    pinned = [("train.steps", args.steps), ("data.seed", 0), ("data.n_val", 500), ("data.n_test", args.n_test)]
    cfg = validate(load_config(args.config, literal=pinned))
    steps = args.steps
    ood_names = [n for n in cfg["test_sets"] if n not in ("test", "id")]
    tensors = None
    runs = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            runs = [r for r in json.load(f)["runs"] if r["steps"] == steps and r.get("n_test", 1000) == args.n_test]
    for seed in args.seeds:
        for precision in args.precisions:
            if any(r["seed"] == seed and r["precision"] == precision for r in runs):
                continue
            model, rec = train_one(cfg, precision, seed, steps)
            info = rec.pop("info")
            if tensors is None:
                tensors = load_test_tensors(cfg["test_sets"], cfg["data"], cfg["image_size"], info.mean, info.std,
                                            os.path.join(args.work_dir, "cache"))
            scores = evaluate_sets(model, tensors, progress=False)
            rec.update(precision=precision, seed=seed, steps=steps, n_test=args.n_test, test=scores, id=scores["test"],
                       mean_ood=statistics.mean(scores[n] for n in ood_names))
            runs.append(rec)
            print(f"seed {seed} {precision}: ID {100 * rec['id']:.1f}  mean OOD {100 * rec['mean_ood']:.1f}  "
                  f"(train {rec['train_wall_s']:.0f} s, skipped {rec['skipped_steps']})", flush=True)

    summary = {}
    for precision in [p for p in PRECISIONS if any(r["precision"] == p for r in runs)]:
        mine = [r for r in runs if r["precision"] == precision]
        summary[precision] = {
            k: {"mean": statistics.mean(r[k] for r in mine),
                "std": statistics.stdev(r[k] for r in mine) if len(mine) > 1 else 0.0} for k in ("id", "mean_ood")}
    print("\nprecision | ID (%) | mean OOD (%)")
    for precision, s in summary.items():
        print(f"{precision} | {100 * s['id']['mean']:.1f} ± {100 * s['id']['std']:.1f} | "
              f"{100 * s['mean_ood']['mean']:.1f} ± {100 * s['mean_ood']['std']:.1f}")
    result = {"what": "GMixout with bf16 parameters (no fp32 master) vs fp32, demo budget",
              "config": os.path.relpath(args.config, ROOT), "steps": steps, "n_test": args.n_test,
              "method_params": cfg["method_params"].get("gmixout", {}), "ood_sets": ood_names,
              "summary": summary, "runs": runs,
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
