"""Registry of the embedded (in-memory, offline) image-classification data sets.

A data set is one small module in this package that defines:

- ``NAME``: the ``data.dataset`` value that selects it;
- ``CLASS_NAMES``: class names, index = label;
- ``load_pool()``: every image as ``(N, 32, 32)`` uint8 (white shape on black, padded to 32
  because the corruption suite needs at least 32x32) and int64 labels; it is split here,
  stratified with ``data.seed``, into train / val (every choice is made on it) / test (the
  ID test split, which the corruptions are applied to);
- ``NATURAL_SHIFTS``: ``{test-set name: loader}`` of OOD sets other than the corruption suite
  (another source, or another rendition of the ID test split): ``loader(test_x, test_y)``
  gets the ID test split and returns images and labels in the pool's format; may be empty;
- optionally ``IMAGENET_ROWS``: per class, the ImageNet-1k classes it maps to (empty: the
  class has none and its head row is the mean of all 1000 rows), which lets an ImageNet model
  start from a mapped head (``model_kwargs: {imagenet_head: NAME}``, the zero-shot row).

Adding a third data set is one module like ``animal_mnist.py`` plus its name in ``_MODULES``.
"""
from __future__ import annotations

import functools
import importlib

import numpy as np

_MODULES = {"mnist": "mnist", "animal_mnist": "animal_mnist", "mnist_inverted": "mnist_inverted"}
NAMES = tuple(_MODULES)


def get(name: str):
    """The module of data set ``name``; a clear error for a name that is not registered."""
    if name not in _MODULES:
        raise ValueError(f"unknown embedded data set {name!r}; allowed: {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def natural_shift_names() -> tuple:
    """Every natural-shift test-set name of every registered data set (names are unique)."""
    return tuple(n for d in NAMES for n in get(d).NATURAL_SHIFTS)


@functools.lru_cache(maxsize=4)
def pool(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``load_pool()`` of a data set, read once per process and made read-only (callers index, never write)."""
    x, y = get(name).load_pool()
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (32, 32) or len(x) != len(y):
        raise ValueError(f"data set {name!r}: load_pool() must return (N, 32, 32) uint8 images and N labels, "
                         f"got {x.dtype} {x.shape} and {len(y)} labels")
    x.flags.writeable = False
    return x, y.astype(np.int64)


def split(x: np.ndarray, y: np.ndarray, seed: int, n_val: int, n_test: int) -> dict:
    """Stratified train/val/test split, fixed by ``seed``; values are (images, labels) in source order."""
    from sklearn.model_selection import train_test_split

    if n_val < 10 or n_test < 10 or n_val + n_test > len(y) - 10:
        raise ValueError(f"n_val={n_val}, n_test={n_test}: each must be >= 10 and leave >= 10 of {len(y)} for training")
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=seed + 1)
    return {k: (x[np.sort(i)], y[np.sort(i)]) for k, i in (("train", train), ("val", val), ("test", test))}


def load_splits(name: str, seed: int = 0, n_val: int = 500, n_test: int = 1000) -> dict:
    """train / val / test of data set ``name`` (see ``split``)."""
    return split(*pool(name), seed, n_val, n_test)


def default_test_sets(name: str) -> list:
    """ID test, the data set's natural shifts, and the harness's 9 corruptions at severity 3."""
    from ..data import DEMO_CORRUPTIONS

    return ["test", *get(name).NATURAL_SHIFTS, *(f"corruption:{c}:3" for c in DEMO_CORRUPTIONS)]
