"""The controlled benchmark (issue 12): the robust "pretrained" model and the inverted-digits data set.

Pretraining is run here with a 100-image train split and 2 steps (the split's n_val/n_test
leave 100 images), into a temporary cache directory.
"""
import numpy as np
import pytest
import torch

from gmixout_optim.finetune import data as D
from gmixout_optim.finetune import datasets as R
from gmixout_optim.finetune import robust_pretrain as RP

TINY = {"n_val": 2400, "n_test": 2500, "steps": 2, "batch_size": 4}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GMIXOUT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_inverted_pool_is_mnist_inverted_with_the_same_splits():
    mx, my = R.pool("mnist")
    ix, iy = R.pool("mnist_inverted")
    assert np.array_equal(iy, my) and np.array_equal(ix.astype(np.int16), 255 - mx.astype(np.int16))
    m, i = R.load_splits("mnist", 0, 500, 1000), R.load_splits("mnist_inverted", 0, 500, 1000)
    for k in ("train", "val", "test"):
        assert np.array_equal(i[k][0], 255 - m[k][0]) and np.array_equal(i[k][1], m[k][1])
    dx, dy = D.load_test_set("digits_inverted", dataset="mnist_inverted")
    sx, sy = D.load_digits_mnist_format()
    assert np.array_equal(dx, 255 - sx) and np.array_equal(dy, sy) and len(dy) == 1797


def test_augmented_pool_holds_eleven_renditions_of_the_train_split_only():
    rec = RP.recipe(TINY)
    x, y = RP.augmented_pool(rec)
    tx, ty = R.load_splits("mnist", 0, rec["n_val"], rec["n_test"])["train"]
    n = len(ty)
    assert x.shape == (11 * n, 32, 32, 3) and x.dtype == np.uint8 and np.array_equal(y, np.tile(ty, 11))
    assert np.array_equal(x[:n], np.repeat(tx[..., None], 3, -1))
    assert np.array_equal(x[n:2 * n, ..., 0], D.digits_style_lowres(tx))
    for j, c in enumerate(D.DEMO_CORRUPTIONS):
        part = x[(2 + j) * n:(3 + j) * n]
        assert not D.same_images(part, tx), c  # every corruption changes the images
    # Deterministic, and no val or test image (the fine-tuning task's splits) is among them.
    x2, _ = RP.augmented_pool(rec)
    assert np.array_equal(x, x2)
    held_out = {im.tobytes() for k in ("val", "test")
                for im in R.load_splits("mnist", 0, rec["n_val"], rec["n_test"])[k][0]}
    assert not held_out & {im.tobytes() for im in tx}


def test_checkpoint_is_built_once_and_reused(cache, monkeypatch):
    first = RP.load_or_build(TINY, progress=False)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    assert set(first["val_accuracy"]) == {"val", *(f"val+{c}:3" for c in D.DEMO_CORRUPTIONS)}
    monkeypatch.setattr(RP, "pretrain", lambda *a, **k: pytest.fail("rebuilt a cached checkpoint"))
    again = RP.load_or_build(TINY, progress=False)
    assert all(torch.equal(first["state_dict"][k], again["state_dict"][k]) for k in first["state_dict"])
    # Another recipe is another file.
    assert RP.cache_path(RP.recipe(TINY)) != RP.cache_path(RP.recipe({**TINY, "lr": 1e-3}))


def test_built_model_keeps_the_pretrained_digit_head_for_zero_shot(cache):
    from gmixout_optim.finetune.methods import make_method
    from gmixout_optim.finetune.models import build_model

    model, info = build_model("efficientnet_lite0_robust", 10, model_kwargs=TINY)
    ckpt = RP.load_or_build(TINY, progress=False)
    assert model.head_init == RP.HEAD_INIT and info.head_names == ["classifier"]
    assert torch.equal(model.classifier.weight, ckpt["state_dict"]["classifier.weight"])
    make_method("zero_shot", {}, 0, head_names=info.head_names).prepare(model, None)  # accepted
    with pytest.raises(ValueError, match="10-digit head"):
        build_model("efficientnet_lite0_robust", 5, model_kwargs=TINY)


def test_bad_recipe_and_split_are_refused_naming_the_values():
    with pytest.raises(ValueError, match="unknown model_kwargs key 'stpes'.*steps"):
        RP.recipe({"stpes": 3})
    RP.check_split({"seed": 0, "n_val": 500, "n_test": 1000}, RP.recipe())
    with pytest.raises(ValueError, match="pretraining split"):
        RP.check_split({"seed": 1, "n_val": 500, "n_test": 1000}, RP.recipe())
    with pytest.raises(ValueError, match="pretraining split"):
        RP.check_split({"dataset": "mnist_inverted", "seed": 0, "n_val": 400, "n_test": 1000}, RP.recipe())
    RP.check_split({"dataset": "animal_mnist", "seed": 1, "n_val": 400}, RP.recipe())  # another pool: any split
