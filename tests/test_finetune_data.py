"""Embedded data: splits, test-set names, corruptions, digits, model input."""
import numpy as np
import pytest
import torch

from gmixout_optim.finetune import data as D


def test_splits_are_disjoint_stratified_and_fixed_by_seed():
    s = D.load_mnist_splits(seed=0, n_val=100, n_test=200)
    assert [len(s[k][1]) for k in ("train", "val", "test")] == [4700, 100, 200]
    for k in ("val", "test"):  # stratified: exactly n/10 per class
        assert np.bincount(s[k][1], minlength=10).tolist() == [len(s[k][1]) // 10] * 10
    # Disjoint: no image appears in two splits (compare raw bytes; MNIST has no exact duplicates here).
    keys = {k: {im.tobytes() for im in s[k][0]} for k in s}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    again = D.load_mnist_splits(seed=0, n_val=100, n_test=200)
    assert all(np.array_equal(s[k][0], again[k][0]) for k in s)
    other = D.load_mnist_splits(seed=1, n_val=100, n_test=200)
    assert not np.array_equal(s["test"][0], other["test"][0])
    x = s["train"][0]
    assert x.shape[1:] == (32, 32) and x.dtype == np.uint8
    assert x[:, :2].max() == 0 and x[:, :, -2:].max() == 0  # MNIST 28x28 padded by 2


@pytest.mark.parametrize("name,kind,corr,sev", [
    ("test", "test", None, None), ("id", "test", None, None), ("val", "val", None, None),
    ("digits", "digits", None, None), ("corruption:fog:3", "corruption", "fog", 3),
    ("corruption:jpeg_compression:5", "corruption", "jpeg_compression", 5),
])
def test_parse_valid_names(name, kind, corr, sev):
    spec = D.parse_test_set(name)
    assert (spec.kind, spec.corruption, spec.severity) == (kind, corr, sev)


@pytest.mark.parametrize("name,match", [
    ("mnist", "unknown test set 'mnist'"), ("corruption:fog", "corruption:NAME:SEVERITY"),
    ("corruption:smoke:3", "unknown corruption 'smoke'"), ("corruption:fog:0", "severity '0'"),
    ("corruption:fog:6", "severity '6'"), ("corruption:fog:x", "severity 'x'"), ("", "unknown test set"),
])
def test_parse_bad_names_say_what_is_allowed(name, match):
    with pytest.raises(ValueError, match=match):
        D.parse_test_set(name)


def test_corruption_list_matches_the_suite():
    from imagecorruptions import get_corruption_names
    assert tuple(get_corruption_names("all")) == D.CORRUPTIONS
    assert set(D.DEMO_CORRUPTIONS) <= set(D.CORRUPTIONS) and len(D.DEMO_OOD_SETS) == 10


def test_corruption_is_seeded_and_changes_images():
    x, _ = D.load_test_set("test", n_test=100, limit=8)
    state = np.random.get_state()
    a = D.corrupt_images(x, "gaussian_noise", 3)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global numpy RNG left as it was
    b = D.corrupt_images(x, "gaussian_noise", 3)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    diff = np.abs(a[..., 0].astype(int) - x.astype(int)).mean()
    assert diff > 5  # severity 3 noise (std ~0.18 of the range) changes pixels by tens of levels
    stronger = np.abs(D.corrupt_images(x, "gaussian_noise", 5)[..., 0].astype(int) - x.astype(int)).mean()
    assert stronger > diff


def test_load_test_set_corruption_uses_the_id_test_split():
    x, y = D.load_test_set("corruption:brightness:1", n_test=100, limit=5)
    xt, yt = D.load_test_set("test", n_test=100, limit=5)
    assert np.array_equal(y, yt) and x.shape == (5, 32, 32, 3)


def test_digits_in_mnist_format():
    x, y = D.load_digits_mnist_format()
    assert x.shape == (1797, 32, 32) and x.dtype == np.uint8 and len(y) == 1797
    assert x.max() >= 250  # scaled to the 0-255 range
    assert x[:, :6].max() == 0 and x[:, -6:].max() == 0  # 20x20 digit box centred like MNIST's
    assert sorted(set(y.tolist())) == list(range(10))


def test_model_input_normalises_and_resizes():
    imgs = np.zeros((2, 32, 32), np.uint8)
    imgs[1] = 255
    t = D.to_model_input(imgs, 32)
    assert t.shape == (2, 3, 32, 32)
    assert torch.all(t[0] == -1) and torch.all(t[1] == 1)  # (x/255 - 0.5)/0.5
    assert D.to_model_input(imgs, 48).shape == (2, 3, 48, 48)
    rgb = np.stack([imgs] * 3, -1)
    assert torch.equal(D.to_model_input(rgb, 32), t)


def test_batches_are_seeded_and_cover_the_data():
    x, y = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 2, 2), torch.arange(10)
    a = D.TensorBatches(x, y, 5, seed=3)
    seen = torch.cat([a.next()[1], a.next()[1]])
    assert sorted(seen.tolist()) == list(range(10))  # one epoch = every example once
    b = D.TensorBatches(x, y, 5, seed=3)
    assert torch.equal(torch.cat([b.next()[1], b.next()[1]]), seen)
    with pytest.raises(ValueError, match="batch_size"):
        D.TensorBatches(x, y, 0, seed=0)


def test_every_corruption_gives_the_same_images_twice():
    # impulse_noise and glass_blur ignore numpy's global generator: without their own seed=
    # every call gave other images (issue 14, item 15). Check all 19 at a severity where each acts.
    x, _ = D.load_test_set("test", n_test=100, limit=3)
    state = np.random.get_state()
    for c in D.CORRUPTIONS:
        a, b = D.corrupt_images(x, c, 5), D.corrupt_images(x, c, 5)
        assert np.array_equal(a, b), f"{c}: two calls gave different images"
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global generator is left as it was


def test_per_image_seeds_make_an_image_independent_of_the_ones_before_it():
    x, _ = D.load_test_set("test", n_test=100, limit=3)
    for c in ("gaussian_noise", "impulse_noise", "glass_blur"):
        a = D.corrupt_images(x, c, 3)
        assert not np.array_equal(a[0], D.corrupt_images(x, c, 3, seed=1)[0]), c  # the seed matters
        # the same image at position 0 and at position 1 gets another draw (seeds differ per index) ...
        twice = D.corrupt_images(np.stack([x[0], x[0]]), c, 3)
        assert not np.array_equal(twice[0], twice[1]), c
        # ... and the first image is the same whatever follows it
        assert np.array_equal(D.corrupt_images(x[:1], c, 3)[0], a[0]), c


def test_saturate_leaves_grey_images_unchanged_and_is_detected():
    x, _ = D.load_test_set("test", n_test=100, limit=4)
    assert D.same_images(D.corrupt_images(x, "saturate", 3), x)  # grey pixels have no saturation to scale
    assert not D.same_images(D.corrupt_images(x, "saturate", 5), x)
    assert not D.same_images(D.corrupt_images(x, "fog", 3), x)
