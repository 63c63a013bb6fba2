"""remap_state: the grouped Triton remap against the per-tensor PyTorch rule (searchsorted)."""
import pytest
import torch

from gmixout_optim.kernels import remap
from gmixout_optim.kernels.support import Segment, SupportPlan, draw_support_grouped_torch
from gmixout_optim.kernels.testing import assert_close, poison

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _supports(numels, keeps, caps, episode):
    plan = SupportPlan([([Segment(0, m, k, 0)], c) for k, (m, c) in enumerate(zip(numels, caps))], keeps, DEVICE)
    return plan, *draw_support_grouped_torch(plan, 7, [episode] * len(numels))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_grouped_remap_equals_per_tensor_rule(impl):
    # awkward sizes: empty tensors, one element, a support past one interpreter block
    # (16384 slots), very different keeps (long and short runs of the old support per block)
    numels = [0, 1, 5, 40001, 3000, 70]
    keeps = [0.5, 1.0, 0.5, 0.6, 0.05, 0.9]
    caps = numels
    plan, old_flat, old_n = _supports(numels, keeps, caps, 0)
    _, new_flat, new_n = _supports(numels, keeps, caps, 1)
    gen = torch.Generator().manual_seed(0)
    src = [[torch.randn(c, generator=gen).to(DEVICE) for c in caps] for _ in range(2)]
    expected = [[v.clone() for v in s] for s in src]
    for t, (a, b) in enumerate(zip(plan.offsets, plan.offsets[1:])):
        remap.remap_state_torch(old_flat[a:b], old_n[t], new_flat[a:b], new_n[t], [e[t] for e in expected])
    dst = [[poison(torch.empty(c, device=DEVICE)) for c in caps] for _ in range(2)]
    rplan = remap.RemapPlan(caps, DEVICE)
    fn = getattr(remap, f"remap_state_grouped_{impl}")
    fn(rplan, old_flat, old_n, new_flat, new_n, src, dst)
    for k in range(2):
        for t in range(len(caps)):
            assert_close(dst[k][t], expected[k][t], "exact", f"state {k} of tensor {t}")
    # the rule itself, spelled out on the big tensor: carried where the element was drawn before
    t = 3
    a, b = plan.offsets[t], plan.offsets[t + 1]
    old = old_flat[a:a + old_n[t]].tolist()
    where = {e: j for j, e in enumerate(old)}
    new = new_flat[a:a + new_n[t]].tolist()
    carried = [src[0][t][where[e]].item() if e in where else 0.0 for e in new]
    assert torch.equal(dst[0][t][:len(new)].cpu(), torch.tensor(carried))
    assert 0 < sum(e in where for e in new) < len(new)
    assert bool((dst[0][t][len(new):] == 0).all())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_remap_after_an_overflowed_draw(impl):
    # capacities below the drawn sizes: both supports hold their first `capacity` elements and
    # report the true n > capacity; the remap must stay inside each tensor's slots
    numels, keeps = [40001, 3000], [0.5, 0.5]
    caps = [15000, 1000]
    plan, old_flat, old_n = _supports(numels, keeps, caps, 0)
    _, new_flat, new_n = _supports(numels, keeps, caps, 1)
    assert bool((old_n > torch.tensor(caps, device=DEVICE)).all())
    src = [[torch.randn(c).to(DEVICE) for c in caps]]
    expected = [[v.clone() for v in src[0]]]
    for t, (a, b) in enumerate(zip(plan.offsets, plan.offsets[1:])):
        remap.remap_state_torch(old_flat[a:b], min(old_n[t], caps[t]), new_flat[a:b], min(new_n[t], caps[t]),
                                expected[0][t:t + 1])
    dst = [[poison(torch.empty(c, device=DEVICE)) for c in caps]]
    getattr(remap, f"remap_state_grouped_{impl}")(remap.RemapPlan(caps, DEVICE), old_flat, old_n, new_flat, new_n,
                                                  src, dst)
    for t in range(2):
        assert_close(dst[0][t], expected[0][t], "exact", f"tensor {t}")
