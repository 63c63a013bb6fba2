"""Small helpers shared by the per-op launchers."""
from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, INTERPRET, tl

# Launch settings (elements per program, warps) per kernel on a GPU, chosen from the ptxas
# figures of `python -m gmixout_optim.kernels.aot` (table in docs/kernels.md): no spills, and
# at least half the SM's warp slots resident, so enough loads are in flight to cover DRAM
# latency. Gathers/scatters are latency bound: 8 elements a thread, 4 warps. The fused step
# holds ~10 live fp32 values per element: 4 a thread (1024 over 8 warps) keeps it at ~56
# registers (2048 over 8 warps needed 128: one block per SM quadrant, a quarter occupancy).
# The Philox kernels evaluate 10 rounds per counter (4 elements): 4 counters a thread.
LAUNCH = {
    "gather": (1024, 4),
    "anchor": (1024, 4),
    "write": (1024, 4),
    "merge": (1024, 4),
    "adamw": (1024, 8),
    "philox": (1024, 4),
    # the draw's count and write passes share one block table, hence one block size
    "support": (2048, 4),
    "remap": (1024, 8),
    # The grouped kernels run over one slot-block table per TensorGroup (its block: "gather"'s);
    # only their warps differ. The grouped step computes its step/lr scalars in fp64 from
    # device values: 8 warps needed 64-68 registers (a 12-byte spill on sm_80), 16 need 49.
    "adamw_grouped": (1024, 16),
}
# The interpreter costs ~10 ms a program whatever its size, so it gets big blocks (the tests'
# "block plus one" sizes are built around this figure).
INTERPRET_BLOCK = 16384


def launch(op: str) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of kernel ``op`` on this backend (see ``LAUNCH``)."""
    block, warps = LAUNCH[op]
    return (INTERPRET_BLOCK, warps) if INTERPRET else (block, warps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for weights of ``dtype``: fp32 for 16/32-bit, fp64 for fp64 (torch promotion)."""
    return torch.promote_types(torch.float32, dtype)


def tl_type(d: torch.dtype):
    """The Triton type of any torch dtype a kernel reads through a pointer table."""
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16, torch.int32: tl.int32, torch.int64: tl.int64}[d]


def tl_dtype(d: torch.dtype):
    """The Triton dtype of a torch compute dtype (fp32 or fp64); only reached on the Triton path."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[d]


def scatter_(param_flat: torch.Tensor, support_n: torch.Tensor, values: torch.Tensor) -> None:
    """``param_flat[support_n] = values`` (cast to the weight dtype) for the PyTorch path.

    ``index_copy_`` with int64 indices is ~2.5x faster than ``index_put_`` on CPU, and the
    support has no duplicates, so the two are the same.
    """
    param_flat.index_copy_(0, support_n.long(), values.to(param_flat.dtype))


def grid(count: int, block: int) -> tuple[int]:
    return ((count + block - 1) // block,)


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
