"""Scoring models on named test sets, and loading a saved fine-tuned model back."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from torch import nn

from . import data as D


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode (restores the previous train/eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        pred = model(x[i:i + batch_size].to(device)).argmax(-1).cpu()
        correct += (pred == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(y), 1)


def load_images(name: str, data_cfg: dict, cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and labels of a test set, cached as .npz under ``cache_dir`` (corruption is the slow part)."""
    D.parse_test_set(name)  # fail early on a bad name
    key = dict(name=name, seed=data_cfg.get("seed", 0), n_val=data_cfg.get("n_val", 500),
               n_test=data_cfg.get("n_test", 1000), limit=data_cfg.get("test_limit"))
    dataset = data_cfg.get("dataset", "mnist")
    if dataset != "mnist":  # mnist's key stays as before, so existing caches stay valid
        key["dataset"] = dataset
    if name.startswith("corruption:"):  # 2: one explicit seed per image (issue 14.15); older caches differ
        key["corruption_seeding"] = 2
    path = None
    if cache_dir:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(cache_dir, f"{name.replace(':', '_')}-{digest}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                return f["x"], f["y"]
    x, y = D.load_test_set(name, seed=key["seed"], n_val=key["n_val"], n_test=key["n_test"], limit=key["limit"],
                           dataset=dataset)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp.npz"
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    return x, y


def unchanged_sets(names, data_cfg: dict, cache_dir: str | None = None) -> list:
    """The corruption sets among ``names`` whose images equal the uncorrupted ID test images
    (``data.same_images``), with a warning for each: such a set measures ID accuracy again."""
    import warnings

    out, source = [], None
    for name in names:
        if not name.startswith("corruption:"):
            continue
        if source is None:
            source = load_images("test", data_cfg, cache_dir)[0]
        if D.same_images(load_images(name, data_cfg, cache_dir)[0], source):
            warnings.warn(f"test set {name!r}: the corruption leaves these grey-scale images unchanged, so it is the "
                          "ID test set again; it is left out of the OOD mean", UserWarning, stacklevel=2)
            out.append(name)
    return out


def load_test_tensors(names, data_cfg: dict, image_size: int, mean, std, cache_dir=None, progress: bool = False) -> dict:
    """{name: (inputs, labels)} ready for the model; ``progress`` prints one line per set (corrupting
    a thousand images takes seconds to a minute: the first build of a run is its slowest phase)."""
    import time

    out = {}
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        x, y = load_images(name, data_cfg, cache_dir)
        if progress:
            print(f"[test sets] {i + 1}/{len(names)} {name}: {len(y)} images ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
        out[name] = (D.to_model_input(x, image_size, mean, std), torch.from_numpy(y))
    return out


def evaluate_sets(model: nn.Module, tensors: dict, progress: bool = True) -> dict:
    """{name: accuracy} for every set in ``tensors``."""
    from tqdm.auto import tqdm

    return {name: accuracy(model, x, y) for name, (x, y) in
            tqdm(tensors.items(), desc="evaluate", disable=not progress, leave=False)}


def load_saved_model(path: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A model saved by a training run: ``model.pt`` (plain state dict) and ``run.json`` beside it."""
    from .models import build_model

    meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), "run.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved model at {path!r}")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path!r} has no run.json beside it (written by gmixout-finetune)")
    with open(meta_path) as f:
        meta = json.load(f)
    m = meta["model"]
    model, _ = build_model(m["name"], m["num_classes"], None, m.get("class_names"), device,
                           model_kwargs=m.get("model_kwargs"), for_loading=True)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return model.eval(), meta
