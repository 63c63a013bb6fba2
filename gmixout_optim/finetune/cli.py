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

# Nothing here imports torch or numpy at module level: --help and argument errors answer at
# once (torch alone takes tens of seconds to import on a busy machine).
from .options import CORRUPTIONS, ConfigError


def parse_override(text: str) -> tuple[list, object]:
    """``a.b=value`` -> (['a', 'b'], yaml-parsed value)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (dotted keys allowed)")
    key, value = text.split("=", 1)
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(value)


def load_config(path: str, overrides=(), literal=()) -> dict:
    """The experiment defaults, updated by the YAML file, by the ``key=value`` overrides, then by
    ``literal`` ``(dotted key, value)`` pairs (command-line flags)."""
    import yaml

    from .experiment import DEFAULT_CONFIG, merge_config

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        try:
            user = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:  # its own message spans lines; say where, in one
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config {path!r} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(user, dict):
        raise ValueError(f"config {path!r} must hold a mapping, got {type(user).__name__}")
    pairs = [parse_override(t) for t in overrides] + [(k.split("."), v) for k, v in literal]
    for keys, value in pairs:
        text = ".".join(keys)
        node = user
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k!r} is not a mapping in the config")
        node[keys[-1]] = value
    return merge_config(DEFAULT_CONFIG, user)


def _fail(parser, message: str, code: int = 2):
    """One line on stderr, then exit: a configuration error needs no traceback."""
    parser.exit(code, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def _run_meta(model_path: str, parser) -> dict:
    if not os.path.isfile(model_path):
        _fail(parser, f"--model {model_path!r}: no such file")
    meta = os.path.join(os.path.dirname(os.path.abspath(model_path)), "run.json")
    if not os.path.exists(meta):
        _fail(parser, f"--model {model_path!r} has no run.json beside it (written by gmixout-finetune)")
    with open(meta) as f:
        return json.load(f)


def _child_exit(parser, e) -> None:
    """A training child that died: fail with its exit code (a signal N as 128 + N, as shells do)."""
    code = e.exitcode if e.exitcode and e.exitcode > 0 else 128 + abs(e.exitcode or 1)
    _fail(parser, str(e), code)


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gmixout-finetune", description="Fine-tune, compare methods, write a report.")
    p.add_argument("--config", required=True, help="YAML file (see configs/experiments/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    p.add_argument("--dataset", help="mnist (embedded) or a benchmark folder: imagenet, imagenet-lt, domainnet, "
                                     "iwildcam, cifar100-c (= data.dataset)")
    p.add_argument("--data-root", help="the benchmark folder (= data.root); layouts in docs/benchmarks_data.md")
    p.add_argument("--model", help="efficientnet_lite0, clip:NAME, vit:NAME (= model)")
    p.add_argument("--pretrained", help="local weights file for clip:/vit: models (= pretrained)")
    args = p.parse_args(argv)
    flags = [(k, v) for k, v in (("data.dataset", args.dataset), ("data.root", args.data_root),
                                 ("model", args.model), ("pretrained", args.pretrained)) if v is not None]
    try:
        # Flag values are taken verbatim (no YAML parsing: a path stays a string).
        cfg = load_config(args.config, args.overrides, flags)
        from .experiment import ChildFailed, run_experiment, validate

        cfg = validate(cfg)  # every value checked before the first (long) step
    except (ValueError, FileNotFoundError) as e:
        _fail(p, e)
    print(f"gmixout-finetune: {cfg['name']}: methods {cfg['methods']}, seeds {cfg['seeds']}, "
          f"{cfg['train']['steps']} steps of batch {cfg['train']['batch_size']} at {cfg['image_size']} px, "
          f"{cfg['threads']} threads, output {cfg['output_dir']}", flush=True)
    try:
        run_experiment(cfg)
    except ConfigError as e:  # found mid-run (e.g. a work_dir that does not fit the config)
        _fail(p, e)
    except ChildFailed as e:
        _child_exit(p, e)
    print(f"report: {os.path.join(cfg['output_dir'], 'results.md')}")
    return 0


def evaluate_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gmixout-evaluate", description="Score a saved fine-tuned model on named test sets.")
    p.add_argument("--model", required=True, help="model.pt written by gmixout-finetune (run.json beside it)")
    p.add_argument("--test-set", action="append", required=True, dest="test_sets",
                   help="test, val, digits or corruption:NAME:SEVERITY (repeatable); NAME one of: "
                        + ", ".join(CORRUPTIONS))
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N images of each set")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.add_argument("--threads", default="auto",
                   help="intra-op threads: an integer, or 'auto' (default) = the cores other work leaves free")
    p.add_argument("--cache-dir", default=None,
                   help="where built test sets are kept, keyed by (set, size, seed); default: the cache of the "
                        "experiment the model belongs to (WORK_DIR/cache), else ~/.cache/gmixout_optim/test_sets; "
                        "'' turns caching off")
    args = p.parse_args(argv)
    meta_data = _run_meta(args.model, p).get("data", {})
    from . import data as D
    from .options import apply_threads, resolve_threads

    folder = not D.is_embedded(meta_data)
    try:
        threads = resolve_threads(int(args.threads) if args.threads.isdigit() else args.threads)
        if not folder:  # folder split names are checked by the loader, which lists the known ones
            for name in args.test_sets:
                D.parse_test_set(name)
    except ValueError as e:
        _fail(p, e)
    from .evaluate import evaluate_sets, load_saved_model, load_test_tensors

    apply_threads(threads)
    model, meta = load_saved_model(args.model)
    m = meta["model"]
    if folder:
        from .folder_data import evaluate_folder_sets
        scores = evaluate_folder_sets(model, meta_data, args.test_sets, m["image_size"], m["mean"], m["std"],
                                      meta_data.get("num_workers", 2))
        sizes = {}
    else:
        data_cfg = {**meta_data, "test_limit": args.test_limit}  # the run's own split seed
        tensors = load_test_tensors(args.test_sets, data_cfg, m["image_size"], m["mean"], m["std"],
                                    _cache_dir(args.cache_dir, args.model))
        scores = evaluate_sets(model, tensors)
        sizes = {k: len(v[1]) for k, v in tensors.items()}
    for name, acc in scores.items():
        print(f"{name}\t{acc:.4f}" + (f"\t(n={sizes[name]})" if name in sizes else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "scores": scores}, f, indent=1)
    return 0


def _cache_dir(given: str | None, model_path: str) -> str | None:
    """The test-set cache: ``--cache-dir``; else the one the fine-tune command filled for this model
    (``WORK_DIR/runs/RUN/model.pt`` -> ``WORK_DIR/cache``); else a per-user cache."""
    if given is not None:
        return given or None
    run_dir = os.path.dirname(os.path.abspath(model_path))
    runs = os.path.dirname(run_dir)
    if os.path.basename(runs) == "runs":
        return os.path.join(os.path.dirname(runs), "cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gmixout_optim", "test_sets")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
