"""The comparison helper the kernel tests rely on must itself be able to fail."""
import pytest
import torch

from gmixout_optim.kernels.testing import assert_close, poison, tolerance


def test_exact_compares_bits_but_not_nan_payloads():
    a = torch.tensor([1.0, float("nan"), 0.0])
    assert_close(a, a.clone(), "exact")
    other_nan = torch.tensor([1.0, 0.0, 0.0]).view(torch.int32)
    other_nan[1] = 0x7FC00001
    assert_close(a, torch.tensor(other_nan.view(torch.float32).tolist()), "exact")
    with pytest.raises(AssertionError, match="1 of 3 elements differ"):
        assert_close(a, torch.tensor([1.0, float("nan"), -0.0]), "exact")
    with pytest.raises(AssertionError, match="differ"):
        assert_close(torch.tensor([1, 2]), torch.tensor([1, 3]), "exact")


def test_tolerance_is_relative_to_the_largest_magnitude():
    atol, rtol = tolerance("elementwise", torch.float32)
    e = torch.tensor([100.0, 1e-3])
    # an error of atol*max on the small element passes; twice the whole bound fails
    assert_close(e + torch.tensor([0.0, atol * 100]), e, "elementwise")
    with pytest.raises(AssertionError, match="outside"):
        assert_close(e + torch.tensor([0.0, 2 * (atol * 100 + rtol * 1e-3)]), e, "elementwise")


def test_poison_shows_unwritten_elements():
    expected = torch.zeros(4)
    with pytest.raises(AssertionError, match="1 of 4"):
        assert_close(poison(torch.empty(4)).index_fill_(0, torch.arange(3), 0.0), expected, "elementwise")
    assert bool((poison(torch.empty(3, dtype=torch.int32)) == -7).all())


def test_shape_and_dtype_must_match():
    with pytest.raises(AssertionError, match="shape/dtype"):
        assert_close(torch.zeros(3), torch.zeros(3, dtype=torch.float64), "elementwise")
