"""An experiment = methods x seeds, each method's hyperparameters picked on ID validation.

For every method: each combination of its ``search`` grid is trained with the first seed and
scored on the ID validation split (never on a test or OOD set); the best combination (ties:
the first listed) is then trained with every seed, reusing the first seed's search run. Every
final model is scored on every test set, and the table and plot are written by ``report``.
"""
from __future__ import annotations

import copy
import itertools
import json
import multiprocessing as mp
import os
import platform
import time

import torch

from . import data as D
from .evaluate import evaluate_sets, load_test_tensors
from .methods import METHODS, method_params
from .train import train_run, write_record

DEFAULT_CONFIG = {
    "name": "experiment", "output_dir": "runs/experiment", "model": "efficientnet_lite0",
    "pretrained": None, "num_classes": 10, "image_size": 32, "threads": 2, "progress": True,
    "isolate": False,
    "data": {"seed": 0, "n_val": 500, "n_test": 1000, "n_train": None, "test_limit": None},
    "train": {"steps": 200, "batch_size": 32, "warmup_frac": 0.1, "augment": False,
              "recalibrate_bn": False, "bn_batches": 10},
    "methods": ["gmixout"], "seeds": [0], "method_params": {}, "search": {},
    "test_sets": ["test", *D.DEMO_OOD_SETS],
}


def merge_config(base: dict, update: dict) -> dict:
    """Recursive dict update; keys not in ``base`` at the top level are an error (typo guard)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if k not in out:
            raise ValueError(f"unknown config key {k!r}; allowed: {', '.join(sorted(out))}")
        out[k] = merge_config(out[k], v) if isinstance(out[k], dict) and isinstance(v, dict) and k in ("data", "train") else v
    return out


def validate(cfg: dict) -> dict:
    for m in cfg["methods"]:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} in methods; allowed: {', '.join(METHODS)}")
    for m, grid in cfg["search"].items():
        if m not in cfg["methods"]:
            raise ValueError(f"search lists method {m!r} that is not in methods {cfg['methods']}")
        method_params(m, {k: v[0] for k, v in grid.items()})  # names must exist
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise ValueError(f"search.{m}.{k} must be a non-empty list, got {v!r}")
    for m, hp in cfg["method_params"].items():
        method_params(m, hp)
    for name in cfg["test_sets"]:
        D.parse_test_set(name)
    if not cfg["seeds"]:
        raise ValueError("seeds must list at least one seed")
    return cfg


def _grid(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]


def _tag(overrides: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "default"


def _child(queue, args):
    torch.set_num_threads(args[0].get("threads", 1))
    queue.put(train_run(*args))


def _train(cfg, method, overrides, seed, run_dir):
    """Train in this process, or in a fresh one when ``isolate`` (a clean peak-memory figure)."""
    args = (cfg, method, overrides, seed, run_dir, cfg["progress"])
    if not cfg["isolate"]:
        return train_run(*args)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, args))
    p.start()
    rec = q.get()
    p.join()
    return rec


def run_experiment(cfg: dict) -> dict:
    """Run the search and the seeds; returns ``{"runs": [...], "selection": {...}}`` and writes the report."""
    from .evaluate import load_saved_model

    cfg = validate(cfg)
    torch.set_num_threads(cfg.get("threads", 1))
    out = cfg["output_dir"]
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    first, runs, selection = cfg["seeds"][0], [], {}
    test_tensors = None
    for method in cfg["methods"]:
        base = cfg["method_params"].get(method, {})
        candidates = []
        for combo in _grid(cfg["search"].get(method, {})):
            ov = {**base, **combo}
            run_dir = os.path.join(out, "runs", f"{method}-{_tag(combo)}-s{first}")
            rec = _train(cfg, method, ov, first, run_dir)
            print(f"[search] {method} {combo or '(defaults)'} seed {first}: ID val {rec['val']:.4f}", flush=True)
            candidates.append((rec["val"], combo, run_dir))
        best_val, best, best_dir = max(candidates, key=lambda c: c[0])  # max keeps the first of ties
        selection[method] = {"chosen": best, "val_by_candidate": [[c[1], c[0]] for c in candidates]}
        for seed in cfg["seeds"]:
            run_dir = best_dir if seed == first else os.path.join(out, "runs", f"{method}-{_tag(best)}-s{seed}")
            if seed != first:
                _train(cfg, method, {**base, **best}, seed, run_dir)
            model, rec = load_saved_model(os.path.join(run_dir, "model.pt"))
            torch.set_num_threads(cfg.get("threads", 1))
            if test_tensors is None:
                m = rec["model"]
                test_tensors = load_test_tensors(cfg["test_sets"], cfg["data"], m["image_size"], m["mean"], m["std"],
                                                 os.path.join(out, "cache"))
            rec["test"] = evaluate_sets(model, test_tensors, cfg["progress"])
            write_record(run_dir, rec)
            print(f"[final] {method} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec["test"].items()), flush=True)
            runs.append(rec)
    result = {"config": cfg, "selection": selection, "runs": runs, "total_wall_s": time.time() - t_start,
              "machine": machine_description()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    from .report import write_report
    write_report(result, out)
    return result


def machine_description() -> dict:
    import timm
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__}
