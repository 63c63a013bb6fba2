"""gather_grad: Triton against the PyTorch reference over dtypes, sizes, views, index types."""
import pytest
import torch

from gmixout_optim.kernels import gather
from gmixout_optim.kernels.support import Segment, draw_support_torch, support_capacity
from gmixout_optim.kernels.testing import assert_close, poison

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KEEP = 0.5  # n ~ numel/2: 40001 elements give two programs of 16384 and a ragged third
SIZES = [0, 1, 16385, 40001]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _grad(numel, dtype, view):
    g = torch.randn(numel + 40, generator=torch.Generator().manual_seed(numel)).to(DEVICE, dtype)
    return g[13:13 + numel] if view else g[:numel].clone()


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", [False, True])
def test_triton_gather_equals_torch(numel, dtype, view):
    grad = _grad(numel, dtype, view)
    cap = support_capacity(numel, KEEP)
    support, n = draw_support_torch([Segment(0, numel, 1, 0)], 0, 0, KEEP, cap, DEVICE)
    ref = gather.gather_grad_torch(grad, support, n, KEEP, poison(torch.empty(cap, device=DEVICE)))
    out = gather.gather_grad_triton(grad, support, n, KEEP, poison(torch.empty(cap, device=DEVICE)))
    assert_close(out, ref, "elementwise", "gathered gradient")
    # the reference itself: grad[S]/keep on the support, zeros on the padding
    assert torch.equal(ref[:n], grad[support[:n].long()].float() / KEEP)
    assert bool((ref[n:] == 0).all())


def test_int64_support():
    grad = _grad(40001, torch.bfloat16, True)
    support, n = draw_support_torch([Segment(0, 40001, 1, 0)], 0, 0, KEEP, 40001, DEVICE,
                                    index_dtype=torch.int64)
    ref = gather.gather_grad_torch(grad, support, n, KEEP, poison(torch.empty(40001, device=DEVICE)))
    out = gather.gather_grad_triton(grad, support, n, KEEP, poison(torch.empty(40001, device=DEVICE)))
    assert_close(out, ref, "elementwise", "int64 support")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_is_rejected(impl):
    fn = getattr(gather, f"gather_grad_{impl}")
    s = torch.arange(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="n must be"):
        fn(torch.zeros(8), s, 5, 0.5, torch.zeros(4))
    with pytest.raises(ValueError, match="fp32"):
        fn(torch.zeros(8), s, 2, 0.5, torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        fn(torch.zeros(8, 2)[:, 0], s, 2, 0.5, torch.zeros(4))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan"), "overflow"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter, on purpose
def test_found_inf_is_set_by_a_nonfinite_gathered_value(impl, bad):
    # The flag says whether grad[S]/keep holds an inf/NaN: values off the support do not count,
    # a finite bf16 gradient that overflows fp32 once divided by keep does, and a set flag
    # stays set (one flag collects every tensor's verdict).
    fn = getattr(gather, f"gather_grad_{impl}")
    numel = 40001
    grad = _grad(numel, torch.float32, False)
    support, n = draw_support_torch([Segment(0, numel, 1, 0)], 0, 0, KEEP, numel, DEVICE)
    off = torch.ones(numel, dtype=torch.bool, device=DEVICE)
    off[support[:n].long()] = False
    outside = off.nonzero()[7].item()
    grad[outside] = float("nan")  # never gathered: must not set the flag
    if bad is not None:
        grad[support[n - 3].long()] = 3e38 if bad == "overflow" else bad
    flag = torch.zeros(1, device=DEVICE)
    out = fn(grad, support, n, 0.1 if bad == "overflow" else KEEP, poison(torch.empty(numel, device=DEVICE)), flag)
    assert flag.item() == (0.0 if bad is None else 1.0)
    expected = gather.gather_grad_torch(grad, support, n, 0.1 if bad == "overflow" else KEEP,
                                        torch.empty(numel, device=DEVICE))
    assert_close(out, expected, "elementwise", "gather with the check")
    flag.fill_(1.0)
    fn(_grad(numel, torch.float32, False), support, n, KEEP, out, flag)
    assert flag.item() == 1.0, "the flag is never cleared by a gather"
    with pytest.raises(ValueError, match="found_inf"):
        fn(grad, support, n, KEEP, out, torch.zeros(1, dtype=torch.int32, device=DEVICE))
