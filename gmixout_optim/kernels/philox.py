"""Counter-based random numbers: Triton's Philox reproduced bit for bit in PyTorch.

``philox_uniform(seed, g)`` (the uniform of global element ``g``) uses all four output
words of one Philox evaluation per group of four elements::

    q = g >> 2
    (r0, r1, r2, r3) = Philox4x32-10(key=(seed_lo, seed_hi), counter=(q_lo, q_hi, 0, 0))
    x = r_(g & 3);  u = fp32(x as int32, negatives folded with ~x) * fp32(4.6566127342e-10)

i.e. ``tl.randint4x(seed, g >> 2)``, word ``g & 3``, converted by Triton's
``uint_to_uniform_float`` (the conversion of ``tl.rand``), so ``u`` is in [0, 1).
A run drawn on GPU therefore resumes on CPU with the same supports.

The PyTorch path holds 32-bit words in int64 tensors (torch has no full uint32 arithmetic)
and takes the high and low words of each 32x32-bit product from one wrapping int64 multiply
(checked at import; otherwise from 16-bit halves, which never overflow).
"""
from __future__ import annotations

import operator

import torch

from ._common import launch
from ._dispatch import HAS_TRITON, tl, triton, use_triton

_M64 = (1 << 64) - 1
_M32 = 0xFFFFFFFF
# Philox4x32 constants, as in triton/language/random.py (and Salmon et al., SC'11).
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_N_ROUNDS = 10
_SCALE = 4.6566127342e-10  # tl.rand's fp32 scale: the largest with (2^31-1)*scale < 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def philox_seed(seed: int, key: int, episode: int) -> int:
    """The Philox key of one (run seed, tensor key, episode): a splitmix64 chain.

    ``h = sm(sm(sm(seed) ^ key) ^ episode) >> 1``. The result is below 2^63 so Triton
    receives it as a non-negative int64 and its ``seed.to(uint64)`` keeps every bit.
    ``seed`` may be any integer (taken mod 2^64); ``key`` and ``episode`` must be >= 0.
    """
    seed, key, episode = (operator.index(x) for x in (seed, key, episode))
    if key < 0 or episode < 0:
        raise ValueError(f"key and episode must be >= 0, got key={key}, episode={episode}")
    h = _splitmix64(seed & _M64)
    h = _splitmix64(h ^ (key & _M64))
    h = _splitmix64(h ^ (episode & _M64))
    return h >> 1


def _mul32_halves(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``x * c`` for uint32 ``x`` (held in int64) and constant ``c``,
    from 16-bit halves of ``c`` so no intermediate exceeds 2^49 (the portable fallback)."""
    c_hi, c_lo = c >> 16, c & 0xFFFF
    t = x * c_lo
    u = x * c_hi
    u += t >> 16                      # x*c = u*2^16 + (t & 0xffff)
    hi = u >> 16
    lo = u.bitwise_and_(0xFFFF).bitwise_left_shift_(16).bitwise_or_(t.bitwise_and_(0xFFFF))
    return hi, lo


def _mul32_wrap(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) words of ``x * c`` from one int64 product that wraps mod 2^64: ``p = x*c - 2^64``
    when ``x*c >= 2^63``, and the arithmetic shift ``(p >> 32) & (2^32-1)`` still gives the high
    word. ~3x faster than :func:`_mul32_halves` (torch's uint64 multiply is not vectorised)."""
    p = x * c
    hi = (p >> 32).bitwise_and_(_M32)
    return hi, p.bitwise_and_(_M32)


def _int64_mul_wraps() -> bool:
    """torch's int64 multiply wraps mod 2^64 on the platforms we know (vector and scalar
    loops); C++ does not promise it, so check once (a vectorised body plus a scalar tail)."""
    x = torch.tensor([_M32, 1 << 31, 3, 0] * 17 + [_M32], dtype=torch.int64)
    ok = True
    for c in (_ROUND_A, _ROUND_B):
        hi, lo = _mul32_wrap(x.clone(), c)
        ok &= hi.tolist() == [(v * c) >> 32 for v in x.tolist()]
        ok &= lo.tolist() == [(v * c) & _M32 for v in x.tolist()]
    return ok


_mul32 = _mul32_wrap if _int64_mul_wraps() else _mul32_halves


def _check_seed(seed64: int) -> int:
    seed64 = operator.index(seed64)
    if not 0 <= seed64 < 1 << 63:
        raise ValueError(f"seed64 must be in [0, 2**63) (use philox_seed), got {seed64}")
    return seed64


def _check_int64(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")


def philox4x32_torch(seed64: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed64, counters)`` in PyTorch: the four uint32 words (in int64 tensors)
    of Philox4x32-10 with key ``(seed_lo, seed_hi)`` and counter ``(c_lo, c_hi, 0, 0)``."""
    seed64 = _check_seed(seed64)
    _check_int64("counters", counters)
    k0, k1 = seed64 & _M32, seed64 >> 32
    c0 = counters & _M32
    c1 = (counters >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        new_c0 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        c0, c1, c2, c3 = new_c0, lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uint_to_uniform_torch(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` on uint32 words held in int64: fp32 in [0, 1)."""
    # int32 view, negatives folded with ~x: for a uint32 word that is x ^ 0xffffffff.
    y = torch.where(x >= 1 << 31, x ^ _M32, x).to(torch.int32)
    return y.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)


def philox_uniform_torch(seed64: int, offsets: torch.Tensor) -> torch.Tensor:
    """PyTorch ``u(g)`` (module docstring): fp32 uniforms in [0, 1), one per int64 offset >= 0.

    This is the definition, one Philox per offset; the support draw computes one Philox per
    group of four consecutive offsets instead (same bits)."""
    seed64 = _check_seed(seed64)
    _check_int64("offsets", offsets)
    words = torch.stack(philox4x32_torch(seed64, offsets >> 2), dim=-1)
    x = words.gather(-1, (offsets & 3).unsqueeze(-1)).squeeze(-1)
    return uint_to_uniform_torch(x)


if HAS_TRITON:

    @triton.jit
    def philox_uniform_tl(seed, g):
        """``u(g)`` in Triton, for an int64 block ``g`` of global offsets."""
        r0, r1, r2, r3 = tl.randint4x(seed, g >> 2)
        w = g & 3
        x = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
        return tl.uint_to_uniform_float(x)

    @triton.jit
    def _philox_uniform_kernel(offsets_ptr, out_ptr, seed, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < numel
        g = tl.load(offsets_ptr + i, mask=m, other=0)
        tl.store(out_ptr + i, philox_uniform_tl(seed, g), mask=m)

    @triton.jit
    def _randint4x_kernel(counters_ptr, out_ptr, seed, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < numel
        c = tl.load(counters_ptr + i, mask=m, other=0)
        r0, r1, r2, r3 = tl.randint4x(seed, c)
        # words as int64 in [0, 2^32): the PyTorch path's representation
        tl.store(out_ptr + 4 * i, r0.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64) & 0xFFFFFFFF, mask=m)


def _launch(kernel, seed64: int, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if inp.numel():
        block, warps = launch("philox")  # 16384 a program spilled 13 KB a thread on sm_90
        kernel[(triton.cdiv(inp.numel(), block),)](inp, out, seed64, inp.numel(), BLOCK=block,
                                                   num_warps=warps)
    return out


def philox4x32_triton(seed64: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x`` itself on int64 counters, words as in :func:`philox4x32_torch`
    (used to test the PyTorch Philox bit for bit)."""
    seed64 = _check_seed(seed64)
    _check_int64("counters", counters)
    counters = counters.contiguous().view(-1)
    out = torch.empty((counters.numel(), 4), dtype=torch.int64, device=counters.device)
    return tuple(_launch(_randint4x_kernel, seed64, counters, out).unbind(1))


def philox_uniform_triton(seed64: int, offsets: torch.Tensor) -> torch.Tensor:
    """``u(g)`` computed by the Triton kernels' own code (``philox_uniform_tl``)."""
    seed64 = _check_seed(seed64)
    _check_int64("offsets", offsets)
    offsets = offsets.contiguous().view(-1)
    out = torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
    return _launch(_philox_uniform_kernel, seed64, offsets, out)


def philox_uniform(seed64: int, offsets: torch.Tensor) -> torch.Tensor:
    """Dispatching ``u(g)`` for int64 offsets ``g >= 0`` (see the module docstring)."""
    if use_triton(offsets):
        return philox_uniform_triton(seed64, offsets)
    return philox_uniform_torch(seed64, offsets)
