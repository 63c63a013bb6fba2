"""The embedded data-set registry and Animal-MNIST: offline, deduplicated, split without leaks, mapped head."""
import socket
import sys

import numpy as np
import pytest

from gmixout_optim.finetune import data as D
from gmixout_optim.finetune import datasets as R


def test_registry_names_and_errors():
    assert set(R.NAMES) >= {"mnist", "animal_mnist"}
    with pytest.raises(ValueError, match="unknown embedded data set 'cifar'.*allowed: mnist"):
        R.get("cifar")
    with pytest.raises(ValueError, match="does not belong to data set 'mnist'"):
        D.load_test_set("outline")


@pytest.mark.parametrize("name", R.NAMES)
def test_every_registered_module_keeps_the_interface(name):
    mod = R.get(name)
    x, y = R.pool(name)
    assert x.dtype == np.uint8 and x.shape[1:] == (32, 32) and set(np.unique(y)) == set(range(len(mod.CLASS_NAMES)))
    test = R.load_splits(name, 0, 50, 100)["test"]
    for shift, loader in mod.NATURAL_SHIFTS.items():
        sx, sy = loader(*test)
        assert sx.dtype == np.uint8 and sx.shape[1:] == (32, 32) and len(sx) == len(sy)
    assert R.default_test_sets(name)[0] == "test" and len(R.default_test_sets(name)) == 1 + len(mod.NATURAL_SHIFTS) + 9


def test_mnist_through_the_registry_is_the_same_split():
    a, b = D.load_mnist_splits(3, 500, 1000), R.load_splits("mnist", 3, 500, 1000)
    assert all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]) for k in a)


def test_animal_mnist_loads_offline_without_tensorflow(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access while loading Animal-MNIST")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    x, y = R.get("animal_mnist").load_pool()  # not the cached pool: really reads the package files here
    assert len(x) == 10000 - R.get("animal_mnist").N_DUPLICATES == 9716
    assert "tensorflow" not in sys.modules and "animal_mnist.dataset_Loader" not in sys.modules


def test_animal_mnist_has_no_duplicate_and_no_image_in_two_splits():
    mod = R.get("animal_mnist")
    raw_x, raw_y = mod._read_package_arrays()
    x, y, keep = mod.dedup(raw_x, raw_y)
    assert len(raw_x) - len(keep) == 284
    assert len({im.tobytes() for im in x}) == len(x)
    for seed in (0, 1):
        s = R.load_splits("animal_mnist", seed, 500, 1000)
        sets = {k: {im.tobytes() for im in v[0]} for k, v in s.items()}
        assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
        assert sum(len(v) for v in sets.values()) == 9716
        assert len(np.unique(s["test"][1][:100])) == 10  # the shuffled pool: a prefix (test_limit) has every class


def test_animal_mnist_shifts():
    mod = R.get("animal_mnist")
    x, y = R.load_splits("animal_mnist", 0, 50, 100)["test"]
    ox, oy = mod.outline(x, y)
    assert np.array_equal(oy, y) and (ox <= x).all() and ox.sum() < 0.7 * x.sum()  # contour only
    lx, _ = mod.lowres(x, y)
    blocks = lx.reshape(len(lx), 8, 4, 8, 4)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant on 4x4 blocks: 8x8 content
    assert len(np.unique(lx)) <= 17


def test_imagenet_rows_are_valid_and_the_zero_shot_head_is_built_from_them():
    import torch

    from gmixout_optim.finetune.models import build_model

    mod = R.get("animal_mnist")
    assert len(mod.IMAGENET_ROWS) == len(mod.CLASS_NAMES) == 10
    assert mod.IMAGENET_ROWS[mod.CLASS_NAMES.index("giraffe")] == ()
    assert all(0 <= i < 1000 for rows in mod.IMAGENET_ROWS for i in rows)
    from gmixout_optim.finetune.models import build_efficientnet_lite0

    full = build_efficientnet_lite0(imagenet_head=True)
    mapped, _ = build_model("efficientnet_lite0", 10, model_kwargs={"imagenet_head": "animal_mnist"})
    assert mapped.head_init == "imagenet:animal_mnist"
    zebra = mod.CLASS_NAMES.index("zebra")
    assert torch.equal(mapped.classifier.weight[zebra], full.classifier.weight[340])
    assert torch.allclose(mapped.classifier.weight[6], full.classifier.weight.mean(0))
    with pytest.raises(ValueError, match="imagenet_head only"):
        build_model("efficientnet_lite0", 10, model_kwargs={"img_size": 64})
