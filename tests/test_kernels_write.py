"""support_anchor and write_weights: Triton against the PyTorch reference."""
import pytest
import torch

from gmixout_optim.kernels import write
from gmixout_optim.kernels.support import Segment, draw_support_torch, support_capacity
from gmixout_optim.kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KEEP = 0.5
SIZES = [0, 1, 16385, 40001]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAD = 7  # the parameter is an offset view into a bigger flat buffer (a ZeRO partition)


def _setup(numel, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + numel)
    big = torch.randn(numel + 2 * PAD, generator=gen).to(DEVICE, dtype)
    cap = support_capacity(numel, KEEP)
    support, n = draw_support_torch([Segment(0, numel, 2, 0)], seed, 0, KEEP, cap, DEVICE)
    residual = (0.01 * torch.randn(cap, generator=gen)).to(DEVICE)
    residual[n:] = 0
    return big, support, n, residual


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_triton_support_anchor_equals_torch(numel, dtype):
    big, support, n, residual = _setup(numel, dtype)
    w = big[PAD:PAD + numel]
    ref = write.support_anchor_torch(w, support, n, residual, KEEP)
    out = write.support_anchor_triton(w, support, n, residual, KEEP)
    assert_close(out, ref, "elementwise", "anchor on the support")
    assert ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_write_weights_equals_torch(numel, dtype):
    big, support, n, residual = _setup(numel, dtype)
    s = support[:n].long() + PAD
    # 16-bit weights keep their anchor in the weight dtype; fp32 ones derive it.
    if dtype == torch.float32:
        anchor = write.support_anchor_torch(big[PAD:PAD + numel], support, n, residual, KEEP)
    else:
        anchor = big[s].clone()
    residual = residual + 0.003  # a new residual: every written value changes
    residual[n:] = 0
    big_ref, big_out = big.clone(), big.clone()
    for b in (big_ref, big_out):
        b[s] = float("nan")  # poison: write_weights must not read w on the support
    write.write_weights_torch(big_ref[PAD:PAD + numel], support, n, anchor, residual, KEEP)
    write.write_weights_triton(big_out[PAD:PAD + numel], support, n, anchor, residual, KEEP)
    assert_close(big_out, big_ref, "elementwise", "written weights")
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[s] = False
    assert torch.equal(big_ref[outside], big[outside]), "elements off the support must not change"
    assert not big_ref.isnan().any()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_is_rejected(impl):
    s = torch.arange(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="residual"):
        getattr(write, f"support_anchor_{impl}")(torch.zeros(8), s, 4, torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="anchor_values"):
        getattr(write, f"write_weights_{impl}")(torch.zeros(8), s, 4, torch.zeros(2), torch.zeros(4), 0.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter numpy: inf/NaN inputs on purpose
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_16_bit_matches_torch_on_ties_and_specials(dtype):
    # fp32 values whose dropped bits are exactly half an ulp (ties to even, both parities),
    # just below/above half, the largest finite fp32, +-inf and NaN.
    base = torch.randn(20000, generator=torch.Generator().manual_seed(0)).view(torch.int32)
    base = base & ~0xFFFF  # bf16-representable; for fp16, ties come from the lower bits below
    low = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x18000, 0x1000, 0x3000], dtype=torch.int32)
    vals = (base.view(-1, 1) | low).flatten().view(torch.float32)
    vals = torch.cat([vals, torch.tensor([3.4028235e38, -3.4028235e38, float("inf"),
                                          -float("inf"), float("nan"), 0.0, -0.0]),
                      # NaNs whose rounding would carry into the exponent/sign bits
                      torch.tensor([0x7FFFFFFF, -1, 0x7F80FFFF], dtype=torch.int32).view(torch.float32)
                      ]).to(DEVICE)
    n = vals.numel()
    support = torch.arange(n, dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(n, device=DEVICE)
    ref = torch.full((n,), 7.0, dtype=dtype, device=DEVICE)
    out = ref.clone()
    write.write_weights_torch(ref, support, n, vals, zero, KEEP)
    write.write_weights_triton(out, support, n, vals, zero, KEEP)
    assert_close(out, ref, "exact", f"fp32 -> {dtype} rounding")
