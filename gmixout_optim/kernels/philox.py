"""Counter-based random numbers: Triton's ``tl.rand`` reproduced bit for bit in PyTorch.

``philox_uniform(seed, g)`` is Philox4x32-10 with key ``(seed_lo, seed_hi)`` and counter
``(g_lo, g_hi, 0, 0)``; the first output word ``x`` becomes a float as ``tl.rand`` does it:
read ``x`` as int32, fold negatives with ``~x`` (so ``x in [0, 2^31)``), convert to fp32
and multiply by the fp32 constant ``4.6566127342e-10``. For offsets below 2^32 this equals
``tl.rand(seed, g)`` with int32 or int64 offsets; above, it equals ``tl.rand`` with int64
offsets (which use the same counter). A run drawn on GPU therefore resumes on CPU with the
same supports.

The PyTorch path holds 32-bit words in int64 tensors (torch has no full uint32 arithmetic)
and forms the 64-bit products from 16-bit halves so nothing overflows.
"""
from __future__ import annotations

import operator

import torch

from ._dispatch import HAS_TRITON, tl, triton

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


def _mul32(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``x * c`` for uint32 ``x`` (held in int64) and constant ``c``,
    from 16-bit halves of ``c`` so no intermediate exceeds 2^49 (torch's uint64 multiply is
    not vectorised: ~10x slower than these int64 ops)."""
    c_hi, c_lo = c >> 16, c & 0xFFFF
    t = x * c_lo
    u = x * c_hi
    u += t >> 16                      # x*c = u*2^16 + (t & 0xffff)
    hi = u >> 16
    lo = u.bitwise_and_(0xFFFF).bitwise_left_shift_(16).bitwise_or_(t.bitwise_and_(0xFFFF))
    return hi, lo


def _check_seed(seed64: int) -> int:
    seed64 = operator.index(seed64)
    if not 0 <= seed64 < 1 << 63:
        raise ValueError(f"seed64 must be in [0, 2**63) (use philox_seed), got {seed64}")
    return seed64


def philox_uniform_torch(seed64: int, offsets: torch.Tensor) -> torch.Tensor:
    """PyTorch ``tl.rand(seed64, offsets)``: fp32 uniforms in [0, 1), one per int64 offset."""
    seed64 = _check_seed(seed64)
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    k0, k1 = seed64 & _M32, seed64 >> 32
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for r in range(_N_ROUNDS):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        new_c0 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        if r == _N_ROUNDS - 1:
            c0 = new_c0
            break  # only the first word is used
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = new_c0, lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    # int32 view, negatives folded with ~x: for a uint32 word that is x ^ 0xffffffff.
    x = torch.where(c0 >= 1 << 31, c0 ^ _M32, c0).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)


if HAS_TRITON:

    @triton.jit
    def _philox_uniform_kernel(offsets_ptr, out_ptr, seed, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < numel
        g = tl.load(offsets_ptr + i, mask=m, other=0)
        tl.store(out_ptr + i, tl.rand(seed, g), mask=m)


def philox_uniform_triton(seed64: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand`` itself on int64 offsets (used to test the PyTorch path bit for bit)."""
    seed64 = _check_seed(seed64)
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    offsets = offsets.contiguous().view(-1)
    out = torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
    if offsets.numel():
        block = 16384
        _philox_uniform_kernel[(triton.cdiv(offsets.numel(), block),)](
            offsets, out, seed64, offsets.numel(), BLOCK=block)
    return out


def philox_uniform(seed64: int, offsets: torch.Tensor) -> torch.Tensor:
    """Dispatching ``tl.rand(seed64, offsets)`` (see the module docstring)."""
    from ._dispatch import use_triton
    if use_triton(offsets):
        return philox_uniform_triton(seed64, offsets)
    return philox_uniform_torch(seed64, offsets)
