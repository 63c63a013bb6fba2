"""Support draw: which local elements of a tensor train in an episode.

Element at global offset ``g`` of segment ``(start, length, key, offset)`` is in the
support ``S`` of episode ``e`` iff ``philox_uniform(philox_seed(seed, key, e), g) < keep``
(``keep`` compared in fp32 on both paths). Its local index is ``start + g - offset``.
One Philox evaluation (counter ``g >> 2``) serves four consecutive global offsets, so a
segment whose ``offset`` is not a multiple of 4 starts or ends inside a group of four.
``S`` is returned sorted, padded with -1 to ``capacity``. If more than ``capacity``
elements are drawn, the first ``capacity`` are stored and the true count ``n > capacity``
is returned: the caller must check ``n <= capacity`` (and grow or raise).
"""
from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple, Sequence

import torch

from ._common import launch
from ._dispatch import HAS_TRITON, note, tl, triton, use_triton
from ._table import upload
from .philox import _SCALE, philox4x32_torch, philox_seed

_CHUNK = 1 << 14  # Philox counters (4 elements each) per PyTorch chunk: temporaries stay in cache


class Segment(NamedTuple):
    """Local positions ``[start, start+length)`` hold global elements ``[offset, offset+length)``
    of the logical tensor ``key``."""
    start: int
    length: int
    key: int
    offset: int


def support_capacity(numel: int, keep: float) -> int:
    """Fixed support buffer size: ``min(numel, ceil(numel*keep + 6*sqrt(numel*keep*(1-keep))) + 16)``."""
    return min(numel, math.ceil(numel * keep + 6 * math.sqrt(numel * keep * (1 - keep))) + 16)


def _check_segments(segments: Sequence[Segment]) -> list[Segment]:
    segs = []
    for s in segments:
        s = Segment(*(operator.index(x) for x in s))
        if s.start < 0 or s.length < 0 or s.key < 0 or s.offset < 0:
            raise ValueError(f"segment fields must be >= 0, got {s}")
        if s.length:
            segs.append(s)
    segs.sort(key=lambda s: s.start)
    for a, b in zip(segs, segs[1:]):
        if a.start + a.length > b.start:
            raise ValueError(f"segments overlap: {a} and {b}")
    return segs


def _check_keep(keep: float) -> float:
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep (= 1 - p) must be in (0, 1], got {keep}")
    return keep


def _index_dtype(segs: list[Segment], index_dtype) -> torch.dtype:
    if index_dtype is not None:
        return index_dtype
    end = max((s.start + s.length for s in segs), default=0)
    return torch.int32 if end <= 2**31 else torch.int64


@functools.lru_cache(maxsize=64)
def _fold_threshold(keep: float) -> int:
    """``T`` such that, for every uint32 word ``x`` with ``y = fold(x)`` (the int32 view,
    negatives folded with ``~``), ``uint_to_uniform(x) < keep32`` iff ``y < T``.

    Why an exact threshold exists: ``u(y) = fp32(fp32(y) * scale)`` is non-decreasing in
    ``y`` (int-to-float rounding and multiplication by a positive constant with
    round-to-nearest are both monotone), so ``{y in [0, 2^31): u(y) < keep32}`` is a prefix
    ``[0, T)``. ``T`` is found by bisection on ``u`` computed with the same fp32 ops as
    ``uint_to_uniform_torch``; the loop invariant ``u(lo-1) < keep32 <= u(hi)`` (with
    ``u(-1) = -inf``, ``u(2^31) = +inf``) makes ``T = hi`` exact for all 2^31 values of ``y``."""
    keep32 = torch.tensor(keep, dtype=torch.float32)
    scale = torch.tensor(_SCALE, dtype=torch.float32)

    def below(y: int) -> bool:
        return bool(torch.tensor(y, dtype=torch.int32).to(torch.float32) * scale < keep32)

    lo, hi = 0, 1 << 31  # invariant: every y < lo is below, hi is not (or hi = 2^31)
    while lo < hi:
        mid = (lo + hi) // 2
        if below(mid):
            lo = mid + 1
        else:
            hi = mid
    return hi


def _hits(words: torch.Tensor, t: int) -> torch.Tensor:
    """``fold(x) < t`` for uint32 words ``x`` in int64: ``x < t`` or ``~x = 2^32-1-x < t``,
    i.e. ``x`` in the cyclic interval ``[-t, t)`` mod 2^32, tested as ``(x + t) mod 2^32 < 2t``
    (``t <= 2^31``, so the two halves do not overlap)."""
    return (words + t).bitwise_and_(0xFFFFFFFF) < 2 * t


def draw_support_torch(segments, seed, episode, keep, capacity, device, index_dtype=None):
    """PyTorch draw: per chunk of ``2^14`` Philox counters, the four words of each counter are
    interleaved into ``4 * 2^14`` consecutive elements, then the segment's ends are cut off.
    Returns ``(support, n)``."""
    segs, keep = _check_segments(segments), _check_keep(keep)
    capacity = operator.index(capacity)
    idt = _index_dtype(segs, index_dtype)
    support = torch.full((capacity,), -1, dtype=idt, device=device)
    t = _fold_threshold(keep)
    n = 0
    for s in segs:
        s64 = philox_seed(seed, s.key, episode)
        g_end = s.offset + s.length
        q_end = (g_end + 3) >> 2
        for q0 in range(s.offset >> 2, q_end, _CHUNK):
            q1 = min(q0 + _CHUNK, q_end)
            q = torch.arange(q0, q1, dtype=torch.int64, device=device)
            words = torch.stack(philox4x32_torch(s64, q), dim=1).view(-1)  # element 4*q0 + i
            lo, hi = max(s.offset, 4 * q0), min(g_end, 4 * q1)  # global elements of this chunk
            hit = torch.nonzero(_hits(words[lo - 4 * q0:hi - 4 * q0], t)).view(-1)
            hit += lo - s.offset + s.start
            m = hit.numel()
            if n < capacity:
                take = min(m, capacity - n)
                support[n:n + take] = hit[:take].to(idt)
            n += m
    return support, n


class SupportPlan:
    """The block table of a grouped draw: every tensor's support in one launch per pass.

    ``tensors`` is one ``(segments, capacity)`` per tensor, ``keeps`` one ``keep`` each. The
    supports land in one flat buffer, tensor ``t`` at ``[offsets[t], offsets[t] + capacity_t)``
    (sorted, padded with -1, as :func:`draw_support` returns them), and their sizes in one
    int64 device tensor. The table depends only on the segments, so it is built once (one
    host-to-device copy) and reused by every redraw; a redraw uploads only the Philox keys.

    A program takes ``BLOCK / 4`` consecutive Philox counters of one segment and uses all four
    words of each (``4q + w`` is element ``g``), so a segment whose ends are not multiples of 4
    masks the words outside ``[offset, offset + length)``.
    """

    def __init__(self, tensors, keeps, device, index_dtype=None):
        self.device = torch.device(device)
        tensors = [(_check_segments(segs), operator.index(cap)) for segs, cap in tensors]
        self.keeps = [_check_keep(k) for k in keeps]
        if len(self.keeps) != len(tensors):
            raise ValueError(f"one keep per tensor: {len(tensors)} tensors, {len(self.keeps)} keeps")
        self.segments = [segs for segs, _ in tensors]
        self.capacities = [cap for _, cap in tensors]
        self.offsets = [0]
        for cap in self.capacities:
            self.offsets.append(self.offsets[-1] + cap)
        self.index_dtype = _index_dtype([s for segs in self.segments for s in segs], index_dtype)
        self.block = launch("support")[0]
        q = self.block // 4
        rows = {k: [] for k in ("q0", "g_lo", "g_hi", "l_base", "seg", "tensor")}
        self.first_block, seg_id = [], 0
        for t, segs in enumerate(self.segments):
            self.first_block.append(len(rows["q0"]))
            for s in segs:
                q_first, q_end = s.offset >> 2, ((s.offset + s.length - 1) >> 2) + 1
                for q0 in range(q_first, q_end, q):
                    for k, v in zip(rows, (q0, s.offset, s.offset + s.length, s.start - s.offset, seg_id, t)):
                        rows[k].append(v)
                seg_id += 1
        self.first_block.append(len(rows["q0"]))
        self.num_blocks = len(rows["q0"])
        # every int64 table in one upload (a per-tensor draw builds a plan each time), then views;
        # blocks [t_first[t], t_end[t]) belong to tensor t
        tables = dict(rows, t_first=self.first_block[:-1], t_end=self.first_block[1:], cap=self.capacities,
                      out_off=self.offsets[:-1])
        packed = upload([x for v in tables.values() for x in v], torch.int64, self.device)
        views, pos = {}, 0
        for k, v in tables.items():
            views[k] = packed[pos:pos + len(v)]
            pos += len(v)
        self.rows = {k: views[k] for k in rows}
        self.t_first, self.t_end, self.cap, self.out_off = (views[k] for k in ("t_first", "t_end", "cap", "out_off"))
        self.keep32 = upload(self.keeps, torch.float32, self.device)

    def seeds(self, seed: int, episodes) -> list[int]:
        """The Philox key of each segment, in table order (``episodes``: one per tensor)."""
        episodes = list(episodes)
        if len(episodes) != len(self.segments):
            raise ValueError(f"one episode per tensor: {len(self.segments)} tensors, {len(episodes)} episodes")
        return [philox_seed(seed, s.key, e) for segs, e in zip(self.segments, episodes) for s in segs]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Tensor ``t``'s support: a view of the flat buffer."""
        return [flat[a:b] for a, b in zip(self.offsets, self.offsets[1:])]


def draw_support_grouped_torch(plan: SupportPlan, seed, episodes):
    """Reference of the grouped draw: :func:`draw_support_torch` per tensor, concatenated.
    Returns ``(flat_support, n)`` with ``n`` an int64 tensor, one size per tensor."""
    flat = torch.full((plan.offsets[-1],), -1, dtype=plan.index_dtype, device=plan.device)
    sizes = []
    for segs, cap, keep, e, view in zip(plan.segments, plan.capacities, plan.keeps, episodes, plan.split(flat)):
        sup, n = draw_support_torch(segs, seed, e, keep, cap, plan.device, plan.index_dtype)
        view.copy_(sup)
        sizes.append(n)
    return flat, torch.tensor(sizes, dtype=torch.int64, device=plan.device)


if HAS_TRITON:

    @triton.jit
    def _draw_hits(q0, g_lo, g_hi, seed, keep, Q: tl.constexpr):
        """Hits of the four elements ``4q + w`` of counters ``q0 .. q0 + Q``: one Philox each."""
        q = q0 + tl.arange(0, Q)
        r0, r1, r2, r3 = tl.randint4x(seed, q)
        g = 4 * q
        h0 = (tl.uint_to_uniform_float(r0) < keep) & (g >= g_lo) & (g < g_hi)
        h1 = (tl.uint_to_uniform_float(r1) < keep) & (g + 1 >= g_lo) & (g + 1 < g_hi)
        h2 = (tl.uint_to_uniform_float(r2) < keep) & (g + 2 >= g_lo) & (g + 2 < g_hi)
        h3 = (tl.uint_to_uniform_float(r3) < keep) & (g + 3 >= g_lo) & (g + 3 < g_hi)
        return g, h0.to(tl.int32), h1.to(tl.int32), h2.to(tl.int32), h3.to(tl.int32)

    @triton.jit
    def _count_kernel(q0s, g_los, g_his, segs, tensors, seeds, keeps, counts, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        seed = tl.load(seeds + tl.load(segs + b))
        keep = tl.load(keeps + tl.load(tensors + b))
        _, h0, h1, h2, h3 = _draw_hits(tl.load(q0s + b), tl.load(g_los + b), tl.load(g_his + b), seed, keep,
                                       BLOCK // 4)
        tl.store(counts + b, tl.sum(h0 + h1 + h2 + h3, axis=0).to(tl.int64))

    @triton.jit
    def _write_kernel(q0s, g_los, g_his, l_bases, segs, tensors, seeds, keeps, scan, t_firsts, t_ends,
                      out_offs, caps, support, sizes, BLOCK: tl.constexpr):
        """``scan[b]``: hits in all blocks before ``b``; tensor ``t`` owns blocks
        ``[t_first[t], t_end[t])``, so its size is a difference of two scans, written by its
        first block, and a hit's rank is the scan within its tensor plus the counts before it."""
        b = tl.program_id(0)
        t = tl.load(tensors + b)
        seed = tl.load(seeds + tl.load(segs + b))
        g, h0, h1, h2, h3 = _draw_hits(tl.load(q0s + b), tl.load(g_los + b), tl.load(g_his + b), seed,
                                       tl.load(keeps + t), BLOCK // 4)
        c = h0 + h1 + h2 + h3
        t_first = tl.load(t_firsts + t)
        base = tl.load(scan + t_first)
        tl.store(sizes + t, tl.load(scan + tl.load(t_ends + t)) - base, mask=b == t_first)
        # rank of each hit within its tensor: earlier blocks, earlier counters, earlier words
        first = tl.load(scan + b) - base + tl.cumsum(c, axis=0).to(tl.int64) - c
        cap = tl.load(caps + t)
        out = support + tl.load(out_offs + t)
        local = g + tl.load(l_bases + b)
        dt = support.dtype.element_ty
        tl.store(out + first, local.to(dt), mask=(h0 != 0) & (first < cap))
        tl.store(out + first + h0, (local + 1).to(dt), mask=(h1 != 0) & (first + h0 < cap))
        tl.store(out + first + h0 + h1, (local + 2).to(dt), mask=(h2 != 0) & (first + h0 + h1 < cap))
        tl.store(out + first + h0 + h1 + h2, (local + 3).to(dt), mask=(h3 != 0) & (first + h0 + h1 + h2 < cap))


def draw_support_grouped_triton(plan: SupportPlan, seed, episodes, out=None):
    """Grouped draw: a count launch, a scan of the counts (three small torch ops), a write
    launch; no host sync. Returns ``(flat_support, n)`` (``n`` on the device)."""
    r = plan.rows
    seeds = upload(plan.seeds(seed, episodes), torch.int64, plan.device)
    flat = out if out is not None else torch.empty(plan.offsets[-1], dtype=plan.index_dtype, device=plan.device)
    flat.fill_(-1)
    n = torch.zeros(len(plan.capacities), dtype=torch.int64, device=plan.device)  # tensors without blocks
    note("launch", "draw_support", 2)
    if not plan.num_blocks:
        return flat, n
    block, warps = plan.block, launch("support")[1]
    counts = torch.zeros(plan.num_blocks + 1, dtype=torch.int64, device=plan.device)
    _count_kernel[(plan.num_blocks,)](r["q0"], r["g_lo"], r["g_hi"], r["seg"], r["tensor"], seeds, plan.keep32,
                                      counts[1:], BLOCK=block, num_warps=warps)
    scan = counts.cumsum_(0)  # scan[b] = hits in blocks before b (all tensors)
    _write_kernel[(plan.num_blocks,)](r["q0"], r["g_lo"], r["g_hi"], r["l_base"], r["seg"], r["tensor"], seeds,
                                      plan.keep32, scan, plan.t_first, plan.t_end, plan.out_off, plan.cap, flat, n,
                                      BLOCK=block, num_warps=warps)
    note("launch", "draw_support", 4)  # zeros, count, cumsum, write
    return flat, n


def draw_support_grouped(plan: SupportPlan, seed, episodes, out=None):
    """Every tensor's support of its episode in one grouped draw (see :class:`SupportPlan`).

    Returns ``(flat_support, n)``: ``plan.split(flat_support)[t]`` is tensor ``t``'s support
    and ``n[t]`` its true size (``> capacity_t`` on overflow, when the first ``capacity_t``
    are stored, as in :func:`draw_support`). The caller checks all the sizes at once:
    ``bool((n > plan.cap).any())``, one host sync per redraw, or later.
    """
    if use_triton(plan.device):
        return draw_support_grouped_triton(plan, seed, episodes, out)
    flat, n = draw_support_grouped_torch(plan, seed, episodes)
    if out is not None:
        out.copy_(flat)
        flat = out
    return flat, n


def draw_support_triton(segments, seed, episode, keep, capacity, device, index_dtype=None):
    """Triton draw of one tensor: the grouped draw of a one-tensor plan (one host sync, for ``n``)."""
    capacity = operator.index(capacity)
    plan = SupportPlan([(segments, capacity)], [keep], device, index_dtype)
    support, n = draw_support_grouped_triton(plan, seed, [episode])
    note("sync", "draw_support")
    return support, int(n[0])


def draw_support(segments, seed, episode, keep, capacity, device, index_dtype=None):
    """Draw the sorted support of ``episode``; returns ``(support, n)`` (see the module docstring).

    ``index_dtype`` defaults to int32, or int64 when a local index reaches 2^31.
    """
    if use_triton(device):
        return draw_support_triton(segments, seed, episode, keep, capacity, device, index_dtype)
    return draw_support_torch(segments, seed, episode, keep, capacity, device, index_dtype)
