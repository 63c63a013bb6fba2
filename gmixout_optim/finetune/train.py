"""One fine-tuning run: build, train for a fixed step budget, finish, score on ID val, save.

The learning rate follows a linear warmup over ``warmup_frac`` of the steps, then a cosine
decay to 0: ``lr_t = lr * min(t/w, 1) * 0.5 * (1 + cos(pi * max(t-w, 0)/(T-w)))``. It is set
directly in ``param_groups`` (works for any optimizer exposing them, wrappers included).
"""
from __future__ import annotations

import json
import math
import os
import resource
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from . import folder_data
from .evaluate import accuracy
from .methods import make_method
from .models import build_model


class PeakRSS:
    """Peak resident memory growth over a block: ``max(RSS) - RSS at entry``, in bytes.

    RSS is read from /proc/self/statm every ``interval`` s by a daemon thread (Linux).
    tracemalloc would miss torch's allocations, which bypass Python's allocator, and
    ``ru_maxrss`` is a process-lifetime maximum. At entry, garbage is collected and glibc's
    free heap is handed back (``malloc_trim``), so memory freed earlier in the process is not
    silently reused; the experiment still measures each method in a fresh process
    (``memory_probe``), since a long-lived process can keep freed pages mapped.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_bytes = interval, 0
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: fall back to the lifetime peak
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the figure may then under-count
            pass
        self._start = self._max = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._max, self._rss()) - self._start
        return False


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    warm = max(int(total * warmup_frac), 1)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


class _Tools:
    """What ``Method.finish`` may use: ID validation accuracy and BN re-estimation on ID train."""

    def __init__(self, val_accuracy, train_batches, bn_batches):
        self.val_accuracy, self.train_batches, self.bn_batches = val_accuracy, train_batches, bn_batches

    @torch.no_grad()
    def recalibrate_bn(self, model):
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        was = model.training
        model.train()
        device = next(model.parameters()).device
        for _ in range(self.bn_batches):
            model(self.train_batches.next()[0].to(device))
        model.train(was)
        for m, mom in zip(bns, saved):
            m.momentum = mom


def load_id_tensors(cfg: dict, mean, std) -> dict:
    """ID train (optionally subset) and val tensors at the model's input size."""
    d = cfg.get("data", {})
    splits = D.load_splits(d.get("dataset", "mnist"), d.get("seed", 0), d.get("n_val", 500), d.get("n_test", 1000))
    xt, yt = splits["train"]
    if d.get("n_train"):
        xt, yt = xt[:int(d["n_train"])], yt[:int(d["n_train"])]
    xv, yv = splits["val"]
    size = cfg["image_size"]
    return {"train": (D.to_model_input(xt, size, mean, std), torch.from_numpy(yt)),
            "val": (D.to_model_input(xv, size, mean, std), torch.from_numpy(yv))}


def id_data_source(cfg: dict, model, info, seed: int):
    """``(train batches, val_accuracy(model))`` for the embedded data or a benchmark folder."""
    tr, d = cfg.get("train", {}), cfg.get("data", {})
    if not D.is_embedded(d):
        fd = folder_data.FolderData(cfg, model, info, seed)
        return fd.batches, fd.val_accuracy
    id_data = load_id_tensors(cfg, info.mean, info.std)
    batches = D.TensorBatches(*id_data["train"], tr.get("batch_size", 32), seed, tr.get("augment", False))
    return batches, (lambda m: accuracy(m, *id_data["val"]))


def recalibrate_saved_run(cfg: dict, run_dir: str, rec: dict) -> dict:
    """Re-estimate a saved model's BatchNorm statistics on ``bn_batches`` ID training batches.

    Applied after training to every method alike when ``train.recalibrate_bn`` is on: methods
    whose deployed weights differ from the weights the running statistics were collected
    with (GMixout's merged anchor, Mixout's ``w``, EMA, WiSE) otherwise carry mismatched
    statistics. The batches are drawn with the run's seed, statistics are reset and averaged
    over them, so the step is idempotent; ``model.pt`` is overwritten, ``val`` updated and the
    value before kept as ``val_before_bn``.
    """
    from .evaluate import load_saved_model
    from .models import ModelInfo

    if rec.get("bn_recalibrated"):
        return rec
    model, _ = load_saved_model(os.path.join(run_dir, "model.pt"), cfg.get("device") or "cpu")
    m = rec["model"]
    info = ModelInfo(m["name"], [], tuple(m["mean"]), tuple(m["std"]))
    batches, val_accuracy = id_data_source(cfg, model, info, rec["seed"])
    _Tools(val_accuracy, batches, int(cfg.get("train", {}).get("bn_batches", 10))).recalibrate_bn(model)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(run_dir, "model.pt"))
    rec = {**rec, "val_before_bn": rec["val"], "val": val_accuracy(model), "bn_recalibrated": True}
    write_record(run_dir, rec)
    return rec


def train_run(cfg: dict, method_name: str, overrides: dict, seed: int, run_dir: str,
              progress: bool = True) -> dict:
    """Train one (method, hyperparameters, seed); save ``model.pt`` + ``run.json`` in ``run_dir``.

    Returns the run record (also in run.json): hyperparameters, ID val accuracy, wall time of
    training, peak memory growth, optimizer-state bytes, method extras (e.g. WiSE alpha).
    """
    from tqdm.auto import tqdm

    tr, d = cfg.get("train", {}), cfg.get("data", {})
    torch.manual_seed(seed)
    folder = not D.is_embedded(d)  # else a registered in-memory data set (finetune/datasets)
    if folder:
        names = folder_data.class_names(d)
    else:
        from . import datasets
        names = list(datasets.get(d.get("dataset", "mnist")).CLASS_NAMES)
    num_classes = len(names) if folder else cfg.get("num_classes", 10)
    device = torch.device(cfg.get("device") or "cpu")
    if cfg["model"] == "efficientnet_lite0_robust":
        from . import robust_pretrain
        robust_pretrain.check_split(d, robust_pretrain.recipe(cfg.get("model_kwargs")))
    model, info = build_model(cfg["model"], num_classes, cfg.get("pretrained"), names, device=device,
                              head_seed=seed, model_kwargs=cfg.get("model_kwargs"))
    batches, val_accuracy = id_data_source(cfg, model, info, seed)
    method = make_method(method_name, overrides, seed, head_names=info.head_names)
    steps, warmup = int(tr.get("steps", 100)), float(tr.get("warmup_frac", 0.1))
    if not method.trains:  # zero_shot, linear_probe: no gradient step
        steps = 0
    tools = _Tools(val_accuracy, batches, int(tr.get("bn_batches", 10)))

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        method.prepare(model, tools)  # e.g. LP-FT's linear probe; must not draw from ``batches``
        net = method.setup(model, info.head_names)
        opt = method.make_optimizer(net)
        base = [g["lr"] for g in opt.param_groups]
        net.train()
        bar = tqdm(range(steps), desc=f"{method_name} seed {seed}", disable=not progress, leave=False)
        for step in bar:
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * lr_factor(step, steps, warmup)
            x, y = batches.next()
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step(net)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        state_bytes = method.state_bytes()
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        final = method.finish(net, tools)
    wall = time.perf_counter() - t0

    record = {
        "method": method_name, "seed": seed, "hp": method.hp, "overrides": dict(overrides or {}),
        "val": val_accuracy(final), "train_wall_s": wall, "steps": steps,
        "peak_mem_bytes": mem.peak_bytes, "state_bytes": state_bytes,
        "trainable_params": trainable,
        "extra": method.extra,
        "model": {"name": cfg["model"], "num_classes": num_classes, "model_kwargs": cfg.get("model_kwargs"),
                  "pretrained": cfg.get("pretrained"), "class_names": names,
                  "image_size": cfg["image_size"], "mean": list(info.mean), "std": list(info.std)},
        "data": cfg.get("data", {}),
    }
    os.makedirs(run_dir, exist_ok=True)
    torch.save({k: v.cpu() for k, v in final.state_dict().items()}, os.path.join(run_dir, "model.pt"))
    write_record(run_dir, record)
    return record


def write_record(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
