"""merge_episode: Triton against the PyTorch reference, both merge rules, with/without anchor."""
import pytest
import torch

from gmixout_optim.kernels import merge
from gmixout_optim.kernels.support import Segment, draw_support_torch, support_capacity
from gmixout_optim.kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KEEP = 0.5
LAM = 0.3
COEFFS = {"ema": (1 - LAM) / KEEP, "residual": 1 - LAM}


@pytest.mark.parametrize("numel", [0, 1, 40001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", list(COEFFS))
def test_triton_merge_equals_torch(numel, dtype, rule):
    gen = torch.Generator().manual_seed(numel)
    big = torch.randn(numel + 10, generator=gen).to(DEVICE, dtype)
    cap = support_capacity(numel, KEEP)
    support, n = draw_support_torch([Segment(0, numel, 0, 0)], 3, 1, KEEP, cap, DEVICE)
    s = support[:n].long() + 4
    residual = (0.01 * torch.randn(cap, generator=gen)).to(DEVICE)
    anchor = None
    if dtype != torch.float32:  # 16-bit: the stored anchor is used; w[S] is not read (poisoned)
        anchor = big[s].clone()
        big[s] = float("nan")
    ref, out = big.clone(), big.clone()
    merge.merge_episode_torch(ref[4:4 + numel], support, n, residual, anchor, KEEP, COEFFS[rule])
    merge.merge_episode_triton(out[4:4 + numel], support, n, residual, anchor, KEEP, COEFFS[rule])
    assert_close(out, ref, "elementwise", f"merged weights ({rule})")
    assert not ref.isnan().any()
