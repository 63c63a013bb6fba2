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

from ._common import launch
from ._dispatch import check_flat, note


def upload(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list as a device tensor without a host sync: staged in pinned memory and copied
    with ``non_blocking`` (torch's pinned-memory cache keeps the staging buffer alive until the
    copy is done). On the CPU, just the tensor."""
    device = torch.device(device)
    t = torch.tensor(list(values), dtype=dtype)
    if device.type == "cpu":
        return t
    note("upload", "copy")
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def pointers(tensors: Sequence[torch.Tensor | None], device) -> torch.Tensor:
    """int64 table of ``data_ptr()`` (0 for ``None``): the kernels cast it back to a pointer."""
    return upload([0 if t is None else t.data_ptr() for t in tensors], torch.int64, device)


def check_anchors(anchors: Sequence[torch.Tensor | None]) -> None:
    """The grouped ops take an anchor for every tensor (16-bit weights) or for none (fp32)."""
    if any(a is None for a in anchors) != all(a is None for a in anchors):
        raise ValueError("anchors must be given for every tensor of a group or for none")


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


class TensorGroup:
    """The tensors of one grouped launch per op: one weight dtype, one support index dtype.

    ``params``: each tensor's flat weights (views are fine); ``supports``: its support buffer
    (``capacity_t`` slots, e.g. the views of a grouped draw's flat buffer); ``keeps``: its
    ``1 - p``. ``n`` is the int64 device tensor of support sizes (set it from the grouped
    draw: ``group.n = n``, no host copy). The tables are built here once; build a new group
    when a weight or support buffer is replaced. Per-step tensors (gradients, state) are
    passed to each op and their pointer tables uploaded then (one async copy per table,
    only when an address changed since the last call with that argument).
    """

    def __init__(self, params: Sequence[torch.Tensor], supports: Sequence[torch.Tensor],
                 keeps: Sequence[float], n: torch.Tensor | None = None):
        if not (len(params) == len(supports) == len(keeps)):
            raise ValueError(f"one support and keep per tensor: {len(params)} params, "
                             f"{len(supports)} supports, {len(keeps)} keeps")
        if not params:
            raise ValueError("a TensorGroup needs at least one tensor")
        self.params, self.supports = list(params), list(supports)
        for name, ts in (("params", self.params), ("supports", self.supports)):
            for t in ts:
                check_flat(name, t)
            dtypes = {t.dtype for t in ts}
            if len(dtypes) != 1:
                raise ValueError(f"{name} of one group must share a dtype, got {sorted(map(str, dtypes))}")
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.index_dtype = self.supports[0].dtype
        self.keeps = [float(k) for k in keeps]
        self.capacities = [s.numel() for s in self.supports]
        self.blocks = SlotBlocks(self.capacities, launch("gather")[0], self.device)
        self.param_ptr = pointers(self.params, self.device)
        self.support_ptr = pointers(self.supports, self.device)
        self.keep = upload(self.keeps, torch.float32, self.device)
        self.n = n
        self.cache: dict = {}  # small device constants of the ops (hyperparameters), by value
        self._tables: dict = {}  # name -> (data_ptrs, device table): the last table of each argument

    def __len__(self) -> int:
        return len(self.params)

    def sizes(self) -> list[int]:
        """The support sizes on the host (a sync: for the PyTorch reference path)."""
        if self.n is None:
            raise ValueError("group.n (the support sizes) is not set")
        note("sync", "group_sizes")
        return [int(x) for x in self.n.tolist()]

    def table(self, tensors: Sequence[torch.Tensor | None], name: str, numel=None, dtype=None) -> torch.Tensor:
        """Pointer table of one per-tensor argument, checked: flat, one dtype (``dtype`` if
        given: the kernel reads every entry as that type), ``numel(t)`` elements at least."""
        if len(tensors) != len(self):
            raise ValueError(f"{name}: {len(tensors)} tensors for a group of {len(self)}")
        for t, x in enumerate(tensors):
            if x is None:
                continue
            check_flat(name, x)
            if x.device != self.device:
                raise ValueError(f"{name}[{t}] is on {x.device}, the group on {self.device}")
            if dtype is not None and x.dtype != dtype:
                raise ValueError(f"{name}[{t}] is {x.dtype}, expected {dtype}")
            if numel is not None and x.numel() < numel(t):
                raise ValueError(f"{name}[{t}] has {x.numel()} elements, needs {numel(t)}")
        # the state buffers are the same tensors step after step: upload only when an address changed
        ptrs = tuple(0 if x is None else x.data_ptr() for x in tensors)
        last = self._tables.get(name)
        if last is None or last[0] != ptrs:
            last = self._tables[name] = (ptrs, upload(ptrs, torch.int64, self.device))
        return last[1]
