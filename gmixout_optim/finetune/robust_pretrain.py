"""The controlled benchmark's "pretrained" model: EfficientNet-Lite0 made robust on digits (issue 12).

Preserving pretrained weights helps out of distribution only where the pretrained model is
itself more robust than its fine-tuned versions (CLIP's situation in the GMixout paper). The
ImageNet backbone on MNIST or Animal-MNIST is not: its linear probe keeps a smaller share of
its ID accuracy out of distribution than full fine-tuning does. This module builds a
backbone that is, the way CLIP's robustness arises, from a broad training distribution:

- start: the packaged ImageNet EfficientNet-Lite0 with a new 10-digit head;
- data: the ``mnist`` train split (``split_seed``, ``n_val``, ``n_test``: the val and test
  splits are never seen), each image in 11 renditions: clean, sklearn-digits resolution
  (``data.digits_style_lowres``), and each of the 9 preset corruptions at a severity drawn
  per image from 1-5 (seeded);
- training: AdamW, linear warm-up then cosine decay, ``steps`` batches of ``batch_size``.

Its 10-digit head is kept (the ``zero_shot`` row on a digit task). The controlled benchmark
(``configs/experiments/compare_v2_controlled.yaml``) fine-tunes it on Animal-MNIST, a task it
never saw, with OOD = that task under the same corruptions: robust features from a broad
pretraining distribution, a narrow clean downstream task, as for CLIP and ImageNet. Two
digit tasks were tried first and measured (issue 12's notes): colour-inverted digits
(``datasets/mnist_inverted.py``) and the same relabelled; there the pretrained model already
does the task (96% zero-shot) and full fine-tuning keeps its robustness, so they do not pass
the reference check.

The checkpoint is built once and cached under ``$GMIXOUT_CACHE_DIR`` (default
``~/.cache/gmixout_optim``), named by a hash of the recipe, the source of the functions that
make it and the package versions; about 8 CPU-minutes on one core with the default recipe.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys

import numpy as np
import torch

RECIPE = {"split_seed": 0, "n_val": 500, "n_test": 1000, "steps": 1200, "batch_size": 64, "lr": 2e-3,
          "weight_decay": 0.05, "warmup_frac": 0.05, "seed": 0, "image_size": 32}
HEAD_INIT = "pretrained:robust_digits"


def recipe(overrides: dict | None = None) -> dict:
    """``RECIPE`` with ``overrides``; an unknown key names the allowed ones."""
    out = dict(RECIPE)
    for k, v in (overrides or {}).items():
        if k not in RECIPE:
            raise ValueError(f"efficientnet_lite0_robust: unknown model_kwargs key {k!r}; allowed: {', '.join(RECIPE)}")
        out[k] = type(RECIPE[k])(v)
    return out


SAME_POOL = ("mnist", "mnist_inverted")  # data sets whose images are the pretraining pool's


def check_split(data_cfg: dict, rec: dict) -> None:
    """Fine-tuning data drawn from the pretraining pool must split it as pretraining did, or its
    test split holds images the pretrained model was trained on."""
    if data_cfg.get("dataset", "mnist") not in SAME_POOL:
        return
    got = {k: data_cfg.get(k, d) for k, d in (("seed", 0), ("n_val", 500), ("n_test", 1000))}
    want = {"seed": rec["split_seed"], "n_val": rec["n_val"], "n_test": rec["n_test"]}
    if got != want:
        raise ValueError(f"data {got} must match efficientnet_lite0_robust's pretraining split {want} "
                         "(set data.seed / n_val / n_test, or model_kwargs split_seed / n_val / n_test)")


def augmented_pool(rec: dict) -> tuple[np.ndarray, np.ndarray]:
    """The pretraining images, (11 x N_train, 32, 32, 3) uint8 RGB, and their labels."""
    from . import data as D
    from .datasets import load_splits

    x, y = load_splits("mnist", rec["split_seed"], rec["n_val"], rec["n_test"])["train"]
    rng = np.random.default_rng(rec["seed"])
    rgb = lambda im: np.repeat(im[..., None], 3, axis=-1)  # noqa: E731
    parts = [rgb(x), rgb(D.digits_style_lowres(x))]
    for c in D.DEMO_CORRUPTIONS:
        sev = rng.integers(1, 6, size=len(x))
        out = np.empty((len(x), 32, 32, 3), np.uint8)
        for s in range(1, 6):
            idx = np.flatnonzero(sev == s)
            if len(idx):
                out[idx] = D.corrupt_images(x[idx], c, s, seed=rec["seed"] + 1000)
        parts.append(out)
    return np.concatenate(parts), np.tile(y, len(parts))


def cache_path(rec: dict) -> str:
    from importlib import metadata

    from . import data as D

    from .datasets import split
    from .models import build_efficientnet_lite0, load_by_order

    # The code that makes the checkpoint, not its modules' docstrings and neighbours.
    h = hashlib.sha1(json.dumps(rec, sort_keys=True).encode())
    h.update(_OWN_CODE.encode())
    for fn in (split, D.corrupt_images, D.digits_style_lowres, D.to_model_input, build_efficientnet_lite0,
               load_by_order):
        h.update(inspect.getsource(fn).encode())
    for pkg in ("torch", "timm", "imagecorruptions-imaug", "mlxtend"):
        h.update(f"{pkg}={metadata.version(pkg)}".encode())
    root = os.environ.get("GMIXOUT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gmixout_optim")
    return os.path.join(root, f"lite0_robust_digits-{h.hexdigest()[:12]}.pt")


def pretrain(rec: dict, progress: bool = True) -> dict:
    """Train the robust backbone (see the module docstring); returns its state dict and its
    accuracy on the clean and corrupted (severity 3) val split, which pretraining never saw."""
    from tqdm.auto import tqdm

    from . import data as D
    from .datasets import load_splits
    from .models import build_efficientnet_lite0
    from .train import lr_factor

    torch.manual_seed(rec["seed"])
    x, y = augmented_pool(rec)
    model = build_efficientnet_lite0(10, head_seed=rec["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=rec["lr"], weight_decay=rec["weight_decay"])
    gen = torch.Generator().manual_seed(rec["seed"])
    labels = torch.from_numpy(y)
    model.train()
    for step in tqdm(range(rec["steps"]), desc="robust pretraining", disable=not progress, leave=False):
        for g in opt.param_groups:
            g["lr"] = rec["lr"] * lr_factor(step, rec["steps"], rec["warmup_frac"])
        idx = torch.randint(len(y), (rec["batch_size"],), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(D.to_model_input(x[idx.numpy()], rec["image_size"])),
                                                 labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    vx, vy = load_splits("mnist", rec["split_seed"], rec["n_val"], rec["n_test"])["val"]
    scores = {}
    with torch.no_grad():
        for name, imgs in [("val", vx)] + [(f"val+{c}:3", D.corrupt_images(vx, c, 3)) for c in D.DEMO_CORRUPTIONS]:
            pred = model(D.to_model_input(imgs, rec["image_size"])).argmax(1).numpy()
            scores[name] = float((pred == vy).mean())
    return {"state_dict": model.state_dict(), "recipe": rec, "val_accuracy": scores}


_OWN_CODE = inspect.getsource(augmented_pool) + inspect.getsource(pretrain)  # read at import: stable under patching


def load_or_build(overrides: dict | None = None, progress: bool = True) -> dict:
    """The cached checkpoint of ``recipe(overrides)``, built (and written atomically) the first time."""
    rec = recipe(overrides)
    path = cache_path(rec)
    if not os.path.exists(path):
        print(f"building the robust pretrained EfficientNet-Lite0 once ({rec['steps']} steps); cache: {path}",
              file=sys.stderr, flush=True)
        ckpt = pretrain(rec, progress)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    return torch.load(path, map_location="cpu", weights_only=True)


def build(overrides: dict | None = None) -> torch.nn.Module:
    """EfficientNet-Lite0 with the robust checkpoint's weights and 10-digit head (``HEAD_INIT``)."""
    import timm

    ckpt = load_or_build(overrides)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.head_init = HEAD_INIT
    return model
