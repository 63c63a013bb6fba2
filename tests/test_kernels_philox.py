"""PyTorch Philox against Triton's own randint4x, and u(g) against the kernels' Triton code, bit for
bit (interpreter on CPU, real kernel on GPU)."""
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
def test_torch_philox_equals_triton_randint4x(seed64):
    # All four words of Triton's own generator (tl.randint4x, counter (c_lo, c_hi, 0, 0)).
    c = _offsets(DEVICE)
    expected = philox.philox4x32_triton(seed64, c)
    actual = philox.philox4x32_torch(seed64, c)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, "exact", f"seed {seed64}, word {k}")


@pytest.mark.parametrize("seed64", SEEDS[:4] + SEEDS[-1:])
def test_torch_uniform_equals_triton_uniform(seed64):
    # u(g) as the support kernels compute it (randint4x(seed, g >> 2), word g & 3, tl's conversion)
    g = _offsets(DEVICE)
    expected = philox.philox_uniform_triton(seed64, g)
    assert_close(philox.philox_uniform_torch(seed64, g), expected, "exact", f"seed {seed64}")


def test_uniform_is_word_g_mod_4_of_counter_g_div_4():
    # The definition written out with plain Python ints for the conversion.
    seed, g = 987654321, torch.arange(2**32 - 10, 2**32 + 10)
    words = philox.philox4x32_torch(seed, g >> 2)
    u = philox.philox_uniform_torch(seed, g)
    for i, gi in enumerate(g.tolist()):
        x = words[gi & 3][i].item()
        y = x ^ 0xFFFFFFFF if x >= 2**31 else x  # int32 view, negatives folded with ~x
        expected = torch.tensor(float(y), dtype=torch.float32) * torch.tensor(4.6566127342e-10)
        assert u[i].item() == expected.item()


def test_int32_counters_give_the_same_words():
    # randint4x with int32 counters (hi counter word 0) equals the int64 counter below 2^31.
    c = torch.arange(5, 5 + 40000, device=DEVICE)
    out = torch.empty((c.numel(), 4), dtype=torch.int64, device=DEVICE)
    philox._randint4x_kernel[(3,)](c.to(torch.int32), out, 123, c.numel(), BLOCK=16384)
    for k, w in enumerate(philox.philox4x32_torch(123, c)):
        assert_close(w, out[:, k], "exact", f"int32 counters, word {k}")


def test_wrapping_and_halves_products_agree():
    # The fast int64 product (wraps mod 2^64) against the 16-bit-halves one and Python ints.
    x = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1] + list(range(3, 3000, 7)) * 3)
    for c in (philox._ROUND_A, philox._ROUND_B):
        expected = ([(v * c) >> 32 for v in x.tolist()], [(v * c) & 0xFFFFFFFF for v in x.tolist()])
        for mul in (philox._mul32_wrap, philox._mul32_halves):
            hi, lo = mul(x.clone(), c)
            assert (hi.tolist(), lo.tolist()) == expected, mul.__name__


def test_uniform_range_and_moments():
    u = philox.philox_uniform_torch(philox.philox_seed(1, 2, 3), torch.arange(200000))
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    # mean of 2e5 U(0,1): sd = 0.2887/sqrt(2e5) = 6.5e-4; 6 sd bound
    assert abs(u.mean().item() - 0.5) < 6 * 6.5e-4
    # neighbours (words of one counter, and across counters) must not be correlated:
    # lag-k correlation sd = 1/sqrt(2e5), k = 1..4
    for k in range(1, 5):
        c = torch.corrcoef(torch.stack([u[:-k], u[k:]]))[0, 1].item()
        assert abs(c) < 6 / 200000 ** 0.5, k


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
    with pytest.raises(TypeError, match="counters must be int64"):
        philox.philox4x32_torch(0, torch.arange(3, dtype=torch.int32))
