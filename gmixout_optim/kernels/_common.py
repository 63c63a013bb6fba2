"""Small helpers shared by the per-op launchers."""
from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, INTERPRET, tl

# Elements per Triton program. The interpreter costs ~10 ms a program, so it gets big blocks;
# on a GPU 2048 elements over 8 warps (8 per thread) keep the fused step's registers unspilled.
BLOCK = 16384 if INTERPRET else 2048
NUM_WARPS = 8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for weights of ``dtype``: fp32 for 16/32-bit, fp64 for fp64 (torch promotion)."""
    return torch.promote_types(torch.float32, dtype)


def tl_dtype(d: torch.dtype):
    """The Triton dtype of a torch compute dtype (fp32 or fp64); only reached on the Triton path."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[d]


def scatter_(param_flat: torch.Tensor, support_n: torch.Tensor, values: torch.Tensor) -> None:
    """``param_flat[support_n] = values`` (cast to the weight dtype) for the PyTorch path.

    ``index_copy_`` with int64 indices is ~2.5x faster than ``index_put_`` on CPU, and the
    support has no duplicates, so the two are the same.
    """
    param_flat.index_copy_(0, support_n.long(), values.to(param_flat.dtype))


def grid(count: int) -> tuple[int]:
    return ((count + BLOCK - 1) // BLOCK,)


if HAS_TRITON:
    from ._dispatch import triton

    @triton.jit
    def cast_to(x, DT: tl.constexpr):
        """``x.to(DT)`` rounding to nearest even for bf16 too, on every device.

        Triton's own fp32->bf16 cast rounds to nearest even on a GPU but truncates in the
        interpreter; doing the rounding on the bits gives torch's result in both (NaN -> 0x7FC0).
        """
        if DT == tl.bfloat16:
            b = x.to(tl.float32).to(tl.uint32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            r = tl.where(x != x, 0x7FC0, r)
            return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DT)
