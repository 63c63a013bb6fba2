"""Device tables for grouped launches: one kernel launch per op for many tensors.

A grouped kernel runs one program per *block* of one tensor's support slots; a block table
(built once, when the set of tensors or their capacities change) says which tensor and which
slots each program takes. The tensors themselves are reached through tables of their
``data_ptr()`` (int64, cast to a pointer in the kernel), so the optimizer keeps its own
per-tensor buffers and ``state_dict`` layout. A pointer table must be rebuilt whenever one
of its tensors is replaced (a new gradient tensor, a reallocated buffer): the kernels would
otherwise read freed memory. Rebuilding is one asynchronous host-to-device copy from pinned
memory, so it does not wait for the GPU.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _dispatch


def upload(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list as a device tensor without a host sync: staged in pinned memory and copied
    with ``non_blocking`` (torch's pinned-memory cache keeps the staging buffer alive until the
    copy is done). On the CPU, just the tensor."""
    device = torch.device(device)
    t = torch.tensor(list(values), dtype=dtype)
    if device.type == "cpu":
        return t
    _dispatch.note("upload", "copy")
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def pointers(tensors: Sequence[torch.Tensor | None], device) -> torch.Tensor:
    """int64 table of ``data_ptr()`` (0 for ``None``): the kernels cast it back to a pointer."""
    return upload([0 if t is None else t.data_ptr() for t in tensors], torch.int64, device)


class SlotBlocks:
    """Block table over the support slots ``[0, capacity_t)`` of tensors ``t = 0..T-1``.

    ``tensor[b]`` (int32) and ``start[b]`` (int64, first slot) for program ``b``; ``capacity``
    (int64, one per tensor) on the device too, for the kernels that pad up to it.
    """

    def __init__(self, capacities: Sequence[int], block: int, device):
        capacities = [int(c) for c in capacities]
        tensor, start = [], []
        for t, cap in enumerate(capacities):
            for s in range(0, cap, block):
                tensor.append(t)
                start.append(s)
        self.block = block
        self.num_blocks = len(tensor)
        self.capacities = capacities
        self.tensor = upload(tensor, torch.int32, device)
        self.start = upload(start, torch.int64, device)
        self.capacity = upload(capacities, torch.int64, device)
