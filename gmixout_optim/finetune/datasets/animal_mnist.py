"""Animal-MNIST (PyPI ``animal-mnist`` 0.4, MIT): 10,000 28x28 silhouettes, 1000 per class.

The package's loader module imports tensorflow (to fetch MNIST at run time); it is never
imported here: the two pickled arrays shipped inside the package are read directly, so
nothing is downloaded. Labels 0-9 are the classes in alphabetical order (checked by eye on
a grid of samples; the package's README lists them so). 284 images are exact copies of
another one (same bytes, never with another label): every copy after the first is dropped
before splitting, so no image is both trained on and tested on, whatever the split seed.

OOD sets besides the corruption suite, built from the ID test split without downloading:
``outline`` (the silhouette's contour only, a sketch-like rendition, as ImageNet-Sketch is
to ImageNet) and ``lowres`` (8x8 with 17 grey levels, made the way sklearn's digits were,
upsampled back: the resolution shift that MNIST -> digits is).
"""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np

from ..data import _pad_to_side, digits_style_lowres

NAME = "animal_mnist"
CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
# ImageNet-1k indices per class (timm's ImageNetInfo names them). Giraffe has no ImageNet
# class: its head row is the mean of all 1000 rows.
IMAGENET_ROWS = (
    (294, 295, 296, 297),                                                   # brown/black/ice/sloth bear
    tuple(range(7, 25)) + tuple(range(80, 101)) + tuple(range(127, 147)),   # the bird classes
    (281, 282, 283, 284, 285),                                              # domestic cats
    (345, 346, 347),                                                        # ox, water buffalo, bison
    tuple(range(151, 269)),                                                 # the dog breeds
    (101, 385, 386),                                                        # tusker, Indian/African elephant
    (),                                                                     # giraffe: none
    (339,),                                                                 # sorrel
    (348, 349),                                                             # ram, bighorn
    (340,),                                                                 # zebra
)
N_RAW, N_DUPLICATES = 10000, 284  # checked on load: a different package version fails loudly


def _read_package_arrays() -> tuple[np.ndarray, np.ndarray]:
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise ImportError("data.dataset 'animal_mnist' needs the PyPI package animal-mnist==0.4 "
                          "(pip install --no-deps animal-mnist==0.4)")
    root = os.path.join(os.path.dirname(spec.origin), "data", "Animal_MNIST")
    with gzip.open(os.path.join(root, "animal_data_version_3.gz"), "rb") as f:
        x = np.asarray(pickle.load(f))
    with gzip.open(os.path.join(root, "animal_label_version_3.gz"), "rb") as f:
        y = np.asarray(pickle.load(f))
    return x, y


def dedup(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the first of every set of byte-identical images; returns (x, y, kept indices)."""
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return x[keep], y[keep], keep


def load_pool():
    x, y = _read_package_arrays()
    if x.shape != (N_RAW, 28, 28) or x.dtype != np.uint8:
        raise ValueError(f"animal-mnist: expected ({N_RAW}, 28, 28) uint8 images (version 0.4), got {x.dtype} {x.shape}")
    x, y, keep = dedup(x, y)
    if N_RAW - len(keep) != N_DUPLICATES:
        raise ValueError(f"animal-mnist: expected {N_DUPLICATES} exact duplicates (version 0.4), found {N_RAW - len(keep)}")
    # The package stores the images class by class; a fixed shuffle makes every split's prefix
    # (data.test_limit keeps the first N images) class-mixed.
    order = np.random.default_rng(0).permutation(len(y))
    return _pad_to_side(x[order]), y[order].astype(np.int64)


def outline(test_x: np.ndarray, test_y: np.ndarray):
    """The contour of each shape: the image minus its 3x3 grey-level erosion (morphological gradient)."""
    from scipy.ndimage import grey_erosion

    eroded = grey_erosion(test_x, size=(1, 3, 3))
    return (test_x.astype(np.int16) - eroded).clip(0, 255).astype(np.uint8), test_y.copy()


def lowres(test_x: np.ndarray, test_y: np.ndarray):
    """The ID test split at sklearn digits' resolution (``data.digits_style_lowres``)."""
    return digits_style_lowres(test_x), test_y.copy()


NATURAL_SHIFTS = {"outline": outline, "lowres": lowres}
