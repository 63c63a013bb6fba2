"""PyTorch Philox against Triton's tl.rand, bit for bit (interpreter on CPU, real kernel on GPU)."""
import pytest
import torch

from gmixout_optim.kernels import philox
from gmixout_optim.kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _offsets(dev):
    # Every carry boundary of the 64-bit counter: around 2^31 (int32 sign), 2^32 (hi word), far.
    parts = [torch.arange(0, 20000), torch.arange(2**31 - 300, 2**31 + 300),
             torch.arange(2**32 - 300, 2**32 + 300), torch.tensor([2**40 + 7, 2**62 - 1, 2**63 - 1])]
    return torch.cat(parts).to(device=dev, dtype=torch.int64)


SEEDS = [0, 1, 2**31 - 1, 2**31, 2**32 + 5, 2**63 - 1, philox.philox_seed(0, 0, 0),
         philox.philox_seed(-3, 17, 4)]


@pytest.mark.parametrize("seed64", SEEDS)
def test_torch_philox_equals_tl_rand(seed64):
    g = _offsets(DEVICE)
    expected = philox.philox_uniform_triton(seed64, g)
    actual = philox.philox_uniform_torch(seed64, g)
    assert_close(actual, expected, "exact", f"seed {seed64}")


def test_int32_offsets_give_the_same_bits():
    # tl.rand with int32 offsets (hi counter word 0) equals the int64 counter below 2^31.
    g = torch.arange(5, 5 + 40000, device=DEVICE)
    out = torch.empty(g.numel(), device=DEVICE)
    philox._philox_uniform_kernel[(3,)](g.to(torch.int32), out, 123, g.numel(), BLOCK=16384)
    assert_close(philox.philox_uniform_torch(123, g), out, "exact", "int32 offsets")


def test_uniform_range_and_moments():
    u = philox.philox_uniform_torch(philox.philox_seed(1, 2, 3), torch.arange(200000))
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    # mean of 2e5 U(0,1): sd = 0.2887/sqrt(2e5) = 6.5e-4; 6 sd bound
    assert abs(u.mean().item() - 0.5) < 6 * 6.5e-4
    # adjacent counters must not be correlated: lag-1 correlation sd = 1/sqrt(2e5)
    c = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(c) < 6 / 200000 ** 0.5


def test_philox_seed_mixes_every_input():
    base = philox.philox_seed(0, 0, 0)
    variants = {philox.philox_seed(1, 0, 0), philox.philox_seed(0, 1, 0), philox.philox_seed(0, 0, 1),
                philox.philox_seed(0, 1, 1), philox.philox_seed(2**64, 0, 0)}
    assert base == philox.philox_seed(0, 0, 0) == philox.philox_seed(2**64, 0, 0)  # seed mod 2^64
    assert len(variants | {base}) == 5
    assert all(0 <= s < 2**63 for s in variants)


@pytest.mark.parametrize("bad", [dict(key=-1), dict(episode=-2)])
def test_philox_seed_rejects_negative_key_or_episode(bad):
    kw = dict(seed=0, key=0, episode=0) | bad
    with pytest.raises(ValueError, match="must be >= 0"):
        philox.philox_seed(**kw)


def test_uniform_rejects_bad_input():
    with pytest.raises(ValueError, match="seed64"):
        philox.philox_uniform_torch(2**63, torch.arange(3))
    with pytest.raises(TypeError, match="int64"):
        philox.philox_uniform_torch(0, torch.arange(3, dtype=torch.int32))
