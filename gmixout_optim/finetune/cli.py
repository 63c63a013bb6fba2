"""Console scripts ``gmixout-finetune`` and ``gmixout-evaluate``.

    gmixout-finetune --config configs/experiments/demo.yaml [key=value ...]
        overrides use dotted keys and YAML values, e.g. train.steps=50 seeds=[0,1]
        'methods=[full_ft,gmixout]' method_params.gmixout.p=0.8
    gmixout-evaluate --model runs/demo/runs/gmixout-default-s0/model.pt \
        --test-set digits --test-set corruption:fog:3 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import data as D


def parse_override(text: str) -> tuple[list, object]:
    """``a.b=value`` -> (['a', 'b'], yaml-parsed value)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (dotted keys allowed)")
    key, value = text.split("=", 1)
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(value)


def load_config(path: str, overrides=()) -> dict:
    """The experiment defaults, updated by the YAML file, updated by the overrides."""
    import yaml

    from .experiment import DEFAULT_CONFIG, merge_config

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        user = yaml.safe_load(f) or {}
    if not isinstance(user, dict):
        raise ValueError(f"config {path!r} must hold a mapping, got {type(user).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        node = user
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k!r} is not a mapping in the config")
        node[keys[-1]] = value
    return merge_config(DEFAULT_CONFIG, user)


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gmixout-finetune", description="Fine-tune, compare methods, write a report.")
    p.add_argument("--config", required=True, help="YAML file (see configs/experiments/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from .experiment import run_experiment

    print(f"gmixout-finetune: {cfg['name']}: methods {cfg['methods']}, seeds {cfg['seeds']}, "
          f"{cfg['train']['steps']} steps of batch {cfg['train']['batch_size']} at {cfg['image_size']} px, "
          f"output {cfg['output_dir']}", flush=True)
    run_experiment(cfg)
    print(f"report: {os.path.join(cfg['output_dir'], 'results.md')}")
    return 0


def evaluate_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gmixout-evaluate", description="Score a saved fine-tuned model on named test sets.")
    p.add_argument("--model", required=True, help="model.pt written by gmixout-finetune (run.json beside it)")
    p.add_argument("--test-set", action="append", required=True, dest="test_sets",
                   help="test, val, digits or corruption:NAME:SEVERITY (repeatable); NAME one of: "
                        + ", ".join(D.CORRUPTIONS))
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N images of each set")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name in args.test_sets:
        try:
            D.parse_test_set(name)
        except ValueError as e:
            p.error(str(e))
    import torch

    from .evaluate import evaluate_sets, load_saved_model, load_test_tensors

    torch.set_num_threads(args.threads)
    model, meta = load_saved_model(args.model)
    data_cfg = {**meta.get("data", {}), "test_limit": args.test_limit}  # the run's own split seed
    m = meta["model"]
    tensors = load_test_tensors(args.test_sets, data_cfg, m["image_size"], m["mean"], m["std"])
    scores = evaluate_sets(model, tensors)
    for name, acc in scores.items():
        print(f"{name}\t{acc:.4f}\t(n={len(tensors[name][1])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "scores": scores}, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
