"""Comparison helpers and the tolerance table for Triton-vs-PyTorch kernel tests.

Kept in the library (like ``torch.testing``) so the optimizer's own fused-vs-unfused tests
can use the same justified tolerances.

Why the tolerances are not all zero (the interpreter itself is exact except where noted):
- ``/ keep`` by a Python scalar: torch on CUDA multiplies by the reciprocal (<= 1 ulp);
  the kernels divide (``div_rn``), as torch does on CPU.
- Triton on a GPU may contract ``a*b + c`` into one FMA; torch's vectorised CPU ``lerp``,
  ``addcmul`` and ``add(alpha=)`` already use FMA, the interpreter does not (<= 1 ulp per op).
- A 16-bit result is the rounding of an fp32 value; a 1-ulp fp32 difference can move it
  across a rounding boundary, hence one ulp of the 16-bit type (2^-7 bf16, 2^-10 fp16
  relative, at the bottom of a binade).
- Sums like ``m + w*(g - m)`` can cancel, so an error of a few ulp of the *operands* is a
  large relative error of a small result. The absolute part of each tolerance is therefore
  relative to the largest expected magnitude of the tensor: an element passes when
  ``|actual - expected| <= atol * max|expected| + rtol * |expected|``.
"""
from __future__ import annotations

import torch

_FP32_ULP = 2.0 ** -23

# (atol, rtol) by kind of result and dtype, atol relative to max|expected| (see above);
# "exact" results must match bit for bit.
TOLERANCES = {
    # philox words, uniforms and drawn supports: integer/bit outputs, any difference is a bug.
    "exact": {None: (0.0, 0.0)},
    # one or two roundings (gather, support_anchor, write_weights, merge_episode).
    "elementwise": {
        torch.float32: (2 * _FP32_ULP, 2 * _FP32_ULP),
        torch.float64: (2 * _FP32_ULP, 2 * _FP32_ULP),   # the residual term is fp32 either way
        torch.bfloat16: (2 * _FP32_ULP, 2.0 ** -7),
        torch.float16: (2 * _FP32_ULP, 2.0 ** -10),
    },
    # the fused Adam/AdamW step over a few steps: ~8 roundings per step in fp32 (m, s, denom,
    # update), each <= 1 ulp apart, compounding over the steps of a test: 16 ulp.
    "adam_state": {torch.float32: (16 * _FP32_ULP, 16 * _FP32_ULP)},
    # weights after the fused step: a + v/keep with v within "adam_state" (|v/keep| << |a|).
    "adam_weights": {
        torch.float32: (4 * _FP32_ULP, 4 * _FP32_ULP),
        torch.float64: (4 * _FP32_ULP, 4 * _FP32_ULP),
        torch.bfloat16: (4 * _FP32_ULP, 2.0 ** -7),
        torch.float16: (4 * _FP32_ULP, 2.0 ** -10),
    },
}


def tolerance(kind: str, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """``(atol, rtol)`` from :data:`TOLERANCES`."""
    table = TOLERANCES[kind]
    return table[None] if None in table else table[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, what: str = "") -> None:
    """Compare with the tolerance of ``kind``; NaN where the reference has none fails (poison).

    On failure the message says how many elements differ and the first positions.
    """
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: shape/dtype {tuple(actual.shape)} {actual.dtype} "
                             f"!= {tuple(expected.shape)} {expected.dtype}")
    if kind == "exact" or not actual.is_floating_point():
        if actual.is_floating_point():
            # compare bits (so -0.0 != 0.0), but any NaN equals any NaN: NaN payloads differ
            # between devices (torch makes 0xFFFF on CPU, 0x7FFF on CUDA for bf16)
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
            diff = (actual.view(bits) != expected.view(bits)) & ~(actual.isnan() & expected.isnan())
        else:
            diff = actual != expected
        bad = diff.nonzero().flatten()
        if bad.numel():
            raise AssertionError(f"{what}: {bad.numel()} of {actual.numel()} elements differ "
                                 f"(exact), first at {bad[:8].tolist()}: "
                                 f"{actual[bad[:8]].tolist()} vs {expected[bad[:8]].tolist()}")
        return
    atol, rtol = tolerance(kind, actual.dtype)
    a, e = actual.double(), expected.double()
    finite = e[e.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    # equal values pass whatever the tolerance (inf - inf is NaN, so infinities need this)
    ok = ((a - e).abs() <= atol * scale + rtol * e.abs()) | (a == e) | (a.isnan() & e.isnan())
    bad = (~ok).nonzero().flatten()
    if bad.numel():
        raise AssertionError(f"{what}: {bad.numel()} of {actual.numel()} elements outside "
                             f"atol={atol:g}*{scale:g} rtol={rtol:g} ({kind}), first at {bad[:8].tolist()}: "
                             f"{actual[bad[:8]].tolist()} vs {expected[bad[:8]].tolist()}")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with NaN (floats) or -7 (integers) so elements a kernel forgot show up."""
    return t.fill_(float("nan") if t.is_floating_point() else -7)
