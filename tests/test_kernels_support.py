"""Support draw: Triton against the PyTorch reference, and the draw's own properties."""
import math

import pytest
import torch

from gmixout_optim.kernels import support as sp
from gmixout_optim.kernels.philox import philox_seed, philox_uniform_torch, uint_to_uniform_torch
from gmixout_optim.kernels.support import Segment, support_capacity
from gmixout_optim.kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    "empty": [],
    "zero_length": [Segment(0, 0, 0, 0)],
    "one": [Segment(0, 1, 0, 0)],
    "block_plus_one": [Segment(0, 16385, 3, 0)],
    "offset_past_2^32": [Segment(7, 30001, 1, 2**32 - 12345)],
    # ZeRO-3 style: pieces of several keys in one flat tensor, given out of order, with gaps
    "pieces": [Segment(40000, 9000, 5, 123), Segment(0, 16383, 2, 0), Segment(20000, 17, 9, 2**31 - 3)],
    # segments starting and ending inside one group of four (one Philox counter)
    "inside_one_counter": [Segment(0, 1, 6, 1), Segment(1, 2, 6, 5), Segment(3, 3, 7, 2**32 + 1)],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_triton_draw_equals_torch(name, keep):
    segs = CASES[name]
    numel = max((s.start + s.length for s in segs), default=0)
    cap = support_capacity(numel, keep)
    ref, n_ref = sp.draw_support_torch(segs, 11, 3, keep, cap, DEVICE)
    out, n = sp.draw_support_triton(segs, 11, 3, keep, cap, DEVICE)
    assert n == n_ref
    assert_close(out, ref, "exact", f"support {name}")


def test_reference_follows_the_definition():
    # Element g of segment (start, length, key, offset) is in S iff philox_uniform(...) < keep.
    segs = CASES["pieces"]
    keep, seed, ep = 0.3, 5, 2
    expected = []
    for s in sorted(segs):
        u = philox_uniform_torch(philox_seed(seed, s.key, ep), torch.arange(s.length) + s.offset)
        expected.append(torch.nonzero(u < torch.tensor(keep)).flatten() + s.start)
    expected = torch.cat(expected)
    support, n = sp.draw_support_torch(segs, seed, ep, keep, 30000, "cpu")
    assert n == expected.numel()
    assert torch.equal(support[:n].long(), expected) and bool((support[n:] == -1).all())


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("cuts", [(17001,), (3, 33003), (65537, 65538)])
def test_sharded_draw_matches_unsharded(impl, cuts):
    # Shards of one logical tensor draw exactly the pieces of the unsharded support; the cuts
    # are not multiples of 4, so shards split the four words of one Philox counter (and the
    # first cut of the last case is one past a PyTorch chunk boundary, 4 * 2^14).
    draw = getattr(sp, f"draw_support_{impl}")
    numel, keep = 70000, 0.2
    full, nf = draw([Segment(0, numel, 4, 0)], 1, 0, keep, numel, DEVICE)
    bounds = [0, *cuts, numel]
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        part, n = draw([Segment(0, hi - lo, 4, lo)], 1, 0, keep, hi - lo, DEVICE)
        pieces.append(part[:n].long() + lo)
    assert torch.equal(torch.cat(pieces), full[:nf].long())


@pytest.mark.parametrize("keep", [1e-9, 0.1, 0.3, 0.5, 0.9, 1 - 2**-24, 1.0])
def test_integer_threshold_equals_float_comparison(keep):
    # fold(x) < T  <=>  uint_to_uniform(x) < keep32, by monotonicity (see _fold_threshold);
    # here checked at the words where it could break: around T, 2^32 - T and the ends.
    t = sp._fold_threshold(keep)
    keep32 = torch.tensor(keep, dtype=torch.float32)
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1] + [b + d for b in (t, 2**32 - t)
                                                                for d in range(-2, 3)])
    words = words[(words >= 0) & (words < 2**32)]
    assert torch.equal(sp._hits(words, t), uint_to_uniform_torch(words) < keep32)
    if t < 2**31:  # T is the first folded value at or above keep
        u = uint_to_uniform_torch(torch.tensor([t - 1, t]))
        assert u[0] < keep32 <= u[1] or (t == 0 and keep32 <= u[1])


def test_fraction_within_binomial_bounds_and_episodes_independent():
    numel, keep = 200000, 0.1
    cap = support_capacity(numel, keep)
    sd = math.sqrt(numel * keep * (1 - keep))
    masks = []
    for ep in range(3):
        s, n = sp.draw_support_torch([Segment(0, numel, 0, 0)], 0, ep, keep, cap, "cpu")
        assert abs(n - numel * keep) < 6 * sd and n <= cap
        assert bool((s[1:n] > s[:n - 1]).all()), "support must be sorted and unique"
        m = torch.zeros(numel, dtype=torch.bool)
        m[s[:n].long()] = True
        masks.append(m)
    # independent redraws overlap on ~keep^2 of the elements (binomial, 6 sd)
    both = (masks[0] & masks[1]).sum().item()
    assert abs(both - numel * keep**2) < 6 * math.sqrt(numel * keep**2)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_overflow_returns_true_count_and_truncates(impl):
    draw = getattr(sp, f"draw_support_{impl}")
    full, n = draw([Segment(0, 40000, 1, 0)], 2, 0, 0.5, 40000, DEVICE)
    small, n2 = draw([Segment(0, 40000, 1, 0)], 2, 0, 0.5, 100, DEVICE)
    assert n2 == n > 100
    assert torch.equal(small, full[:100])


def test_index_dtype():
    s32, _ = sp.draw_support_torch([Segment(0, 10, 0, 0)], 0, 0, 0.5, 10, "cpu")
    s64, _ = sp.draw_support_torch([Segment(2**31 - 5, 10, 0, 0)], 0, 0, 0.5, 10, "cpu")
    forced, _ = sp.draw_support_triton([Segment(0, 20000, 0, 0)], 0, 0, 0.5, 20000, DEVICE,
                                       index_dtype=torch.int64)
    ref, _ = sp.draw_support_torch([Segment(0, 20000, 0, 0)], 0, 0, 0.5, 20000, DEVICE)
    assert s32.dtype == torch.int32 and s64.dtype == torch.int64 and forced.dtype == torch.int64
    assert torch.equal(forced, ref.long())


@pytest.mark.parametrize("segs,keep,match", [
    ([Segment(0, 10, 0, 0), Segment(5, 10, 1, 0)], 0.5, "overlap"),
    ([Segment(0, -1, 0, 0)], 0.5, ">= 0"),
    ([Segment(0, 10, 0, 0)], 0.0, "keep"),
    ([Segment(0, 10, 0, 0)], 1.5, "keep"),
])
def test_bad_input_is_rejected(segs, keep, match):
    with pytest.raises(ValueError, match=match):
        sp.draw_support(segs, 0, 0, keep, 10, "cpu")


def test_capacity_formula():
    assert support_capacity(0, 0.1) == 0 and support_capacity(10, 0.1) == 10
    assert support_capacity(10**6, 0.1) == math.ceil(1e5 + 6 * math.sqrt(1e6 * 0.09)) + 16


# Several tensors in one grouped draw: multi-segment tensors, an empty one, unaligned segment
# ends, different keeps and episodes, one capacity too small (overflow).
GROUP = [
    (CASES["pieces"], 0.3, 4),
    ([], 0.5, 0),
    (CASES["inside_one_counter"], 0.5, 1),
    (CASES["offset_past_2^32"], 0.1, 2),
    ([Segment(0, 9000, 11, 6)], 0.9, 5),
]


def _group_plan(overflow=False):
    tensors, keeps, episodes = [], [], []
    for segs, keep, ep in GROUP:
        numel = max((s.start + s.length for s in segs), default=0)
        cap = support_capacity(numel, keep)
        tensors.append((segs, cap // 3 if overflow and numel > 1000 else cap))
        keeps.append(keep)
        episodes.append(ep)
    return sp.SupportPlan(tensors, keeps, DEVICE), episodes


@pytest.mark.parametrize("overflow", [False, True])
def test_grouped_draw_equals_per_tensor_draws(overflow):
    plan, episodes = _group_plan(overflow)
    flat, n = sp.draw_support_grouped_triton(plan, 11, episodes)
    ref_flat, ref_n = sp.draw_support_grouped_torch(plan, 11, episodes)
    assert n.dtype == torch.int64 and n.device == flat.device
    assert torch.equal(n.cpu(), ref_n.cpu())
    assert_close(flat, ref_flat, "exact", "grouped supports")
    # the reference is the per-tensor draw, tensor by tensor, in the flat layout
    for (segs, keep, ep), view, cap, nt in zip(GROUP, plan.split(flat), plan.capacities, n.tolist()):
        one, n1 = sp.draw_support_torch(segs, 11, ep, keep, cap, DEVICE, plan.index_dtype)
        assert n1 == nt
        assert_close(view, one, "exact", f"tensor {segs}")
    assert bool((n > plan.cap).any()) == overflow


def test_grouped_draw_does_not_wait_for_the_device():
    # Sizes stay on the device, the tables were uploaded when the plan was built: the draw
    # itself uploads only the Philox keys (once) and never reads a device value back.
    from gmixout_optim.kernels._dispatch import record

    plan, episodes = _group_plan()
    with record() as events:
        sp.draw_support_grouped_triton(plan, 11, episodes)
    assert not [k for k in events if k[0] == "sync"]
    if DEVICE == "cuda":
        assert events[("upload", "copy")] == 1
    assert events[("launch", "draw_support")] == 6
