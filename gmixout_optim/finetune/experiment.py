"""An experiment = methods x seeds, each method's hyperparameters picked on ID validation.

For every method: each combination of its ``search`` grid is trained with the first seed and
scored on the ID validation split (never on a test or OOD set); the best combination (ties:
the first listed) is then trained with every seed, reusing the first seed's search run. Every
final model is scored on every test set, and the table and plot are written by ``report``.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import multiprocessing as mp
import os
import platform
import queue
import signal
import sys
import tempfile
import time
import traceback

import torch

from . import data as D
from . import folder_data
from .evaluate import evaluate_sets, load_saved_model, load_test_tensors, unchanged_sets
from .methods import METHODS, POSTHOC, method_params, resolve_grid
from .options import ConfigError, apply_threads, resolve_threads
from .train import recalibrate_saved_run, train_run, write_record

DEFAULT_CONFIG = {
    # output_dir: the report (results.md/.csv/.json, id_vs_ood.png); work_dir: model.pt + run.json
    # of every run and the test-set cache (default runs/<name>, git-ignored).
    "name": "experiment", "output_dir": "runs/experiment", "work_dir": None, "model": "efficientnet_lite0",
    "device": "cpu",  # e.g. cuda for the folder benchmarks
    "pretrained": None, "num_classes": 10, "image_size": 32, "progress": True,
    "threads": "auto",  # intra-op threads: an int, or "auto" = the cores other work leaves free (options.free_cores)
    "isolate": False, "resume": True,
    "memory_probe_steps": 20,  # >0: peak memory per method measured in a fresh process over this many steps
    "model_kwargs": None,
    # dataset: "mnist" (embedded) or a benchmark folder (imagenet, imagenet-lt, domainnet, iwildcam,
    # cifar100-c) at root; see folder_data.py and docs/benchmarks_data.md.
    "data": {"dataset": "mnist", "root": None, "seed": 0, "n_val": 500, "n_test": 1000, "n_train": None,
             "test_limit": None, "num_workers": 2},
    "train": {"steps": 200, "batch_size": 32, "warmup_frac": 0.1, "augment": False,
              "recalibrate_bn": False, "bn_batches": 10},
    "methods": ["gmixout"], "seeds": [0], "method_params": {}, "search": {},
    "test_sets": None,  # None: mnist -> test + DEMO_OOD_SETS; a folder -> test + its OOD splits
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
    # "steps/N" grid values (GMixout's k relative to the budget) become ints before any fingerprint
    cfg["search"] = resolve_grid(cfg["search"], int(cfg["train"]["steps"]))
    for m in cfg["methods"]:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} in methods; allowed: {', '.join(METHODS)}")
    for m, grid in cfg["search"].items():
        if m not in METHODS:  # entries for known methods that are not run are ignored
            raise ValueError(f"search lists unknown method {m!r}; allowed: {', '.join(METHODS)}")
        method_params(m, {k: v[0] for k, v in grid.items()})  # names must exist
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise ValueError(f"search.{m}.{k} must be a non-empty list, got {v!r}")
    for m, hp in cfg["method_params"].items():
        method_params(m, hp)
    folder = not D.is_embedded(cfg["data"])
    if folder:
        from . import datasets
        from .folders import BENCHMARKS
        if cfg["data"]["dataset"] not in BENCHMARKS:
            raise ValueError(f"unknown data.dataset {cfg['data']['dataset']!r}; allowed: "
                             f"{', '.join(datasets.NAMES)}, {', '.join(BENCHMARKS)}")
        if not cfg["data"].get("root"):
            raise ValueError(f"data.dataset {cfg['data']['dataset']!r} needs data.root (--data-root), the benchmark folder")
    if cfg["test_sets"] is None:
        from . import datasets
        cfg["test_sets"] = folder_data.default_test_sets(cfg["data"]) if folder else \
            datasets.default_test_sets(cfg["data"].get("dataset", "mnist"))
    elif not folder:  # folder split names are checked by load_benchmark, which lists the known ones
        for name in cfg["test_sets"]:
            D.parse_test_set(name)
    if not cfg["seeds"]:
        raise ValueError("seeds must list at least one seed")
    cfg["threads"] = resolve_threads(cfg["threads"])  # decided once, recorded in results.json
    if cfg["resume"] not in (True, False, "any_code"):
        raise ConfigError(f"resume={cfg['resume']!r}: allowed: true, false, any_code")
    from .posthoc import check
    check(cfg)
    return cfg


def _grid(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]


def _tag(overrides: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "default"


class ChildFailed(RuntimeError):
    """A child process died or raised before returning its result; ``exitcode`` is its exit code
    (negative: killed by that signal)."""

    def __init__(self, what: str, exitcode: int | None, error: str | None):
        self.exitcode = exitcode
        how = f"exit code {exitcode}"
        if exitcode is not None and exitcode < 0:
            try:
                how = f"killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"killed by signal {-exitcode}"
        super().__init__(f"{what} failed in its child process ({how}): "
                         + (error or "it left no error message (out of memory and native crashes end this way; "
                                     "its own output above may say more)"))


def _child_main(results, fn, args, threads):
    apply_threads(threads)
    try:
        out = fn(*args)
    except BaseException as e:  # report it to the parent, then end quietly with code 1
        results.put(("error", traceback.format_exception_only(type(e), e)[-1].strip(), traceback.format_exc()))
        raise SystemExit(1) from None
    results.put(("ok", out))


def run_in_child(fn, args: tuple, what: str, threads: int = 1):
    """``fn(*args)`` in a fresh (spawned) process; its return value, or ``ChildFailed``.

    The parent never blocks on the result alone: it polls the queue and the child, so a child
    that dies without answering (out of memory, a native crash, ``os._exit``) fails the run
    with its exit code instead of hanging it.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child_main, args=(results, fn, args, threads))
    proc.start()
    try:
        while True:
            try:
                status, *payload = results.get(timeout=0.5)
                break
            except queue.Empty:
                if proc.is_alive():
                    continue
                try:  # it may have answered just before it exited
                    status, *payload = results.get(timeout=1.0)
                    break
                except queue.Empty:
                    proc.join()
                    raise ChildFailed(what, proc.exitcode, None) from None
        proc.join()
    finally:
        if proc.is_alive():  # the parent was interrupted or failed: leave no child behind
            proc.kill()
            proc.join()
    if status == "error":
        sys.stderr.write(payload[1])
        raise ChildFailed(what, proc.exitcode, payload[0])
    return payload[0]


def fingerprint(cfg: dict, method: str, overrides: dict, seed: int) -> str:
    """Hash of everything that decides a training run's result (not the test sets or the report)."""
    import hashlib

    keys = ("model", "pretrained", "num_classes", "image_size", "model_kwargs")
    data = {k: v for k, v in cfg["data"].items() if k not in ("test_limit", "num_workers")}
    train = {k: v for k, v in cfg["train"].items() if k != "recalibrate_bn"}  # a post-training step
    blob = {**{k: cfg.get(k) for k in keys}, "data": data, "train": train, "method": method,
            "hp": method_params(method, overrides), "seed": seed}
    return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


# What decides a run's weights and scores besides its settings: these sources (everything of the
# package but the command line, the report and the post-hoc combinations) and these packages.
_REPORT_ONLY = {"cli.py", "options.py", "report.py", "stats.py", "posthoc.py"}
_PACKAGES = ("torch", "timm", "numpy", "peft", "imagecorruptions-imaug", "scikit-image", "scikit-learn", "mlxtend")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the training and scoring code and package versions. Runs are reused only when it
    matches: the committed comparison once mixed runs of several code states (issue 12), because
    a run was matched on its settings alone."""
    import hashlib
    from importlib import metadata

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the gmixout_optim package
    h = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if not name.endswith(".py") or (os.path.basename(dirpath) == "finetune" and name in _REPORT_ONLY):
                continue
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    for pkg in _PACKAGES:
        try:
            h.update(f"{pkg}=={metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{pkg} absent".encode())
    return h.hexdigest()[:16]


def _train(cfg, method, overrides, seed, run_dir):
    """Train in this process, or in a fresh one when ``isolate`` (a clean peak-memory figure).

    With ``resume: true`` a run directory whose run.json carries the same ``fingerprint`` and was
    trained by the same code (``code_version``) is reused instead of trained again (an
    interrupted comparison picks up where it stopped); ``resume: any_code`` reuses it whatever
    code trained it, and says so.
    """
    fp, code = fingerprint(cfg, method, overrides, seed), code_version()
    meta = os.path.join(run_dir, "run.json")
    rec = None
    if cfg.get("resume") and os.path.exists(meta) and os.path.exists(os.path.join(run_dir, "model.pt")):
        with open(meta) as f:
            rec = json.load(f)
        if rec.get("fingerprint") != fp:
            rec = None
        elif rec.get("code") == code:
            print(f"[resume] reusing {run_dir}", flush=True)
        elif cfg["resume"] == "any_code":
            print(f"[resume] reusing {run_dir}, trained by other code (resume: any_code)", flush=True)
        else:
            print(f"[resume] {run_dir}: same settings but trained by other code: training again "
                  "(resume: any_code would reuse it)", flush=True)
            rec = None
    if rec is None:
        if cfg["progress"]:
            print(f"[train] {method} {overrides or ''} seed {seed}: data, model, {cfg['train']['steps']} steps", flush=True)
        rec = _train_now(cfg, method, overrides, seed, run_dir)
        rec["fingerprint"], rec["code"] = fp, code
        write_record(run_dir, rec)
    if cfg["train"].get("recalibrate_bn"):
        if cfg["progress"] and not rec.get("bn_recalibrated"):
            print(f"[bn] {method} seed {seed}: re-estimating BatchNorm statistics on "
                  f"{cfg['train'].get('bn_batches', 10)} ID training batches", flush=True)
        rec = recalibrate_saved_run(cfg, run_dir, rec)
    elif rec.get("bn_recalibrated"):
        raise ConfigError(f"{run_dir} holds a model with re-estimated BatchNorm statistics but train.recalibrate_bn "
                         "is off: use another work_dir or resume=false")
    return rec


def _train_now(cfg, method, overrides, seed, run_dir):
    args = (cfg, method, overrides, seed, run_dir, cfg["progress"])
    if not cfg["isolate"]:
        return train_run(*args)
    return run_in_child(train_run, args, f"training {method} {overrides or ''} seed {seed}",
                        resolve_threads(cfg.get("threads")))


def memory_probe(cfg: dict, method: str, overrides: dict, seed: int, steps: int, tmp_dir: str) -> int:
    """Peak RSS growth (bytes) of ``steps`` training steps + the method's finish, in a fresh process.

    Memory does not depend on the seed or the step budget, and a long-lived process that ran
    other methods before keeps freed pages mapped; a spawned process per method gives a clean figure.
    """
    probe = copy.deepcopy(cfg)
    probe["train"]["steps"], probe["isolate"], probe["progress"] = steps, True, False
    return _train_now(probe, method, overrides, seed, tmp_dir)["peak_mem_bytes"]


def run_experiment(cfg: dict) -> dict:
    """Run the search and the seeds; returns ``{"runs": [...], "selection": {...}}`` and writes the report."""
    cfg = validate(cfg)
    apply_threads(cfg["threads"])
    out = cfg["output_dir"]
    work = cfg["work_dir"] or os.path.join("runs", cfg["name"])
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    first, runs, selection = cfg["seeds"][0], [], {}
    test_tensors = None
    for method in cfg["methods"]:
        if method in POSTHOC:  # soups, WiSE-FT at a fixed alpha: built from the full_ft runs below
            continue
        base = cfg["method_params"].get(method, {})
        candidates = []
        for combo in _grid(cfg["search"].get(method, {})):
            ov = {**base, **combo}
            run_dir = os.path.join(work, "runs", f"{method}-{_tag(combo)}-s{first}")
            rec = _train(cfg, method, ov, first, run_dir)
            print(f"[search] {method} {combo or '(no search)'} seed {first}: ID val {rec['val']:.4f}", flush=True)
            candidates.append((rec["val"], combo, run_dir))
        best_val, best, best_dir = max(candidates, key=lambda c: c[0])  # max keeps the first of ties
        selection[method] = {"chosen": best, "val_by_candidate": [[c[1], c[0]] for c in candidates]}
        for seed in cfg["seeds"]:
            run_dir = best_dir if seed == first else os.path.join(work, "runs", f"{method}-{_tag(best)}-s{seed}")
            if seed != first:
                _train(cfg, method, {**base, **best}, seed, run_dir)
            model, rec = load_saved_model(os.path.join(run_dir, "model.pt"), cfg.get("device") or "cpu")
            apply_threads(cfg["threads"])
            m = rec["model"]
            if cfg.get("resume") and rec.get("test_sets") == cfg["test_sets"] and "test" in rec:
                pass  # scores of this very model.pt on these sets are already in run.json
            elif not D.is_embedded(cfg["data"]):
                rec["test"] = folder_data.evaluate_folder_sets(model, cfg["data"], cfg["test_sets"], m["image_size"],
                                                               m["mean"], m["std"], cfg["data"].get("num_workers", 2))
            else:
                if test_tensors is None:
                    test_tensors = load_test_tensors(cfg["test_sets"], cfg["data"], m["image_size"], m["mean"], m["std"],
                                                     os.path.join(work, "cache"), progress=cfg["progress"])
                rec["test"] = evaluate_sets(model, test_tensors, cfg["progress"])
            rec["test_sets"] = list(cfg["test_sets"])
            write_record(run_dir, rec)
            print(f"[final] {method} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec["test"].items()), flush=True)
            runs.append(rec)
        if cfg.get("memory_probe_steps"):
            with tempfile.TemporaryDirectory() as tmp:
                peak = memory_probe(cfg, method, {**base, **best}, first, int(cfg["memory_probe_steps"]), tmp)
            selection[method]["probe_peak_mem_bytes"] = peak
            print(f"[memory] {method}: peak RSS growth {peak / 2**20:.0f} MB "
                  f"({cfg['memory_probe_steps']} steps, fresh process)", flush=True)
    if any(m in POSTHOC for m in cfg["methods"]):
        from .posthoc import run_posthoc
        runs += run_posthoc(cfg, work, selection)
    unchanged = unchanged_sets(cfg["test_sets"], cfg["data"], os.path.join(work, "cache")) \
        if D.is_embedded(cfg["data"]) else []
    result = {"config": cfg, "work_dir": work, "selection": selection, "runs": runs, "total_wall_s": time.time() - t_start,
              "machine": machine_description(), "unchanged_sets": unchanged}
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
