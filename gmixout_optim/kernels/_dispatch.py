"""Backend selection shared by every kernel op.

Rule: a call goes to Triton when the backend is ``"triton"``, or when it is ``"auto"`` and
the tensor is on CUDA and Triton imports; everything else takes the PyTorch path.
The backend is set by :func:`set_backend` or, at import, the ``GMIXOUT_BACKEND`` variable.
Forcing ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before Triton is
imported (that is how the tests run the kernels without a GPU).
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch

BACKENDS = ("auto", "torch", "triton")

try:  # Triton is an optional extra: the PyTorch path works without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    HAS_TRITON = False

# Read once, at import, like the kernels' own decoration (triton.jit checks it then too).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def backend_from_env(environ=os.environ) -> str:
    """The backend named by ``GMIXOUT_BACKEND`` (``"auto"`` when unset or empty)."""
    return _check(environ.get("GMIXOUT_BACKEND", "").strip().lower() or "auto")


_backend = backend_from_env()


def set_backend(name: str) -> None:
    """Choose the kernel backend: ``"auto"`` (CUDA -> Triton, else PyTorch), ``"torch"`` or ``"triton"``."""
    global _backend
    _backend = _check(name)


def get_backend() -> str:
    """The backend set by :func:`set_backend` (or ``GMIXOUT_BACKEND``)."""
    return _backend


def use_triton(t: torch.Tensor | torch.device | str) -> bool:
    """Whether an op on tensor ``t`` (or on a device) runs the Triton kernel under the current backend."""
    device = t.device if isinstance(t, torch.Tensor) else torch.device(t)
    if _backend == "torch":
        return False
    if _backend == "auto":
        return HAS_TRITON and device.type == "cuda"
    if not HAS_TRITON:
        raise RuntimeError("backend 'triton' was forced but triton is not importable; "
                           "install the 'triton' extra or use set_backend('auto'|'torch')")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"backend 'triton' on {device.type} tensors needs TRITON_INTERPRET=1 "
                           "set before triton is imported; use set_backend('torch') instead")
    return True


def check_flat(name: str, t: torch.Tensor) -> None:
    """Kernels address tensors as flat, stride-1 arrays (an offset view of a bigger one is fine)."""
    if t.dim() != 1 or (t.numel() > 1 and t.stride(0) != 1):
        raise ValueError(f"{name} must be a 1-D contiguous tensor (a flat view), "
                         f"got shape {tuple(t.shape)} stride {tuple(t.stride())}")


def check_vec(name: str, t: torch.Tensor, n: int) -> None:
    """A flat per-support-slot tensor (residual, moments, anchor) covering the first ``n`` slots."""
    check_flat(name, t)
    if t.numel() < n:
        raise ValueError(f"{name} must have at least n={n} elements, got {t.numel()}")


def check_n(n: int, support: torch.Tensor) -> int:
    n = int(n)
    if not 0 <= n <= support.numel():
        raise ValueError(f"n must be in [0, {support.numel()}] (the support's capacity), got {n}")
    return n


# -- instrumentation ----------------------------------------------------------------------
# Every launcher calls note("launch", op) before each kernel launch (Triton, or a torch op it
# runs on the device between kernels), note("sync", op) where it waits for the device (a
# .item(), int(...), .tolist() of a device value) and note("upload", op) for a host-to-device
# copy, so a test can hold a step to its budget (one launch per op, no sync) without a GPU
# profiler. Counting costs one dict lookup when nobody records.
_recorders: list[Counter] = []


def note(kind: str, op: str, count: int = 1) -> None:
    """Count ``count`` events of ``kind`` ("launch", "sync", "upload") for ``op``."""
    for rec in _recorders:
        rec[(kind, op)] += count


@contextlib.contextmanager
def record():
    """``with record() as events:`` counts launches, syncs and uploads per op in the block.

    ``events`` is a ``Counter`` keyed by ``(kind, op)``; ``events[("launch", "gather")]`` is the
    number of gather launches. Only the PyTorch ops of the Triton launchers (and the Triton
    launches) are counted; the PyTorch reference path counts its syncs, not its ops.
    """
    rec: Counter = Counter()
    _recorders.append(rec)
    try:
        yield rec
    finally:
        # by identity: list.remove compares Counters by value, and nested ones can be equal
        del _recorders[next(i for i, r in enumerate(_recorders) if r is rec)]
