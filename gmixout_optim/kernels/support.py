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
from ._dispatch import HAS_TRITON, tl, triton, use_triton
from .philox import _SCALE, philox4x32_torch, philox_seed

if HAS_TRITON:
    from .philox import philox_uniform_tl

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


if HAS_TRITON:

    @triton.jit
    def _count_kernel(blk_global, blk_len, blk_seed, counts, keep, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        g0 = tl.load(blk_global + b)
        ln = tl.load(blk_len + b)
        seed = tl.load(blk_seed + b)
        j = tl.arange(0, BLOCK)
        hit = (philox_uniform_tl(seed, g0 + j) < keep) & (j < ln)
        tl.store(counts + b, tl.sum(hit.to(tl.int32), axis=0))

    @triton.jit
    def _write_kernel(blk_global, blk_local, blk_len, blk_seed, blk_out, support, capacity, keep,
                      BLOCK: tl.constexpr):
        b = tl.program_id(0)
        g0 = tl.load(blk_global + b)
        l0 = tl.load(blk_local + b)
        ln = tl.load(blk_len + b)
        seed = tl.load(blk_seed + b)
        base = tl.load(blk_out + b)
        j = tl.arange(0, BLOCK)
        hit = (philox_uniform_tl(seed, g0 + j) < keep) & (j < ln)
        pos = base + tl.cumsum(hit.to(tl.int64), axis=0) - 1  # rank of each hit: keeps order
        tl.store(support + pos, (l0 + j).to(support.dtype.element_ty), mask=hit & (pos < capacity))


def draw_support_triton(segments, seed, episode, keep, capacity, device, index_dtype=None):
    """Triton draw: count hits per block, exclusive-scan the counts, write each block's hits."""
    segs, keep = _check_segments(segments), _check_keep(keep)
    capacity = operator.index(capacity)
    idt = _index_dtype(segs, index_dtype)
    support = torch.full((capacity,), -1, dtype=idt, device=device)
    if not segs:
        return support, 0
    # One row per block of one segment (built on the host: segments are few).
    blk, warps = launch("support_count")
    g, l, ln, sd = [], [], [], []
    for s in segs:
        nb = triton.cdiv(s.length, blk)
        j = torch.arange(nb, dtype=torch.int64) * blk
        g.append(j + s.offset)
        l.append(j + s.start)
        ln.append((s.length - j).clamp(max=blk).to(torch.int32))
        sd.append(torch.full((nb,), philox_seed(seed, s.key, episode), dtype=torch.int64))
    g, l, ln, sd = (torch.cat(x).to(device) for x in (g, l, ln, sd))
    nblk = g.numel()
    counts = torch.empty(nblk, dtype=torch.int32, device=device)
    _count_kernel[(nblk,)](g, ln, sd, counts, keep, BLOCK=blk, num_warps=warps)
    ends = torch.cumsum(counts.to(torch.int64), 0)
    starts = ends - counts
    _write_kernel[(nblk,)](g, l, ln, sd, starts, support, capacity, keep, BLOCK=blk, num_warps=warps)
    return support, int(ends[-1])


def draw_support(segments, seed, episode, keep, capacity, device, index_dtype=None):
    """Draw the sorted support of ``episode``; returns ``(support, n)`` (see the module docstring).

    ``index_dtype`` defaults to int32, or int64 when a local index reaches 2^31.
    """
    if use_triton(device):
        return draw_support_triton(segments, seed, episode, keep, capacity, device, index_dtype)
    return draw_support_torch(segments, seed, episode, keep, capacity, device, index_dtype)
