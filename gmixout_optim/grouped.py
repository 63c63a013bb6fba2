"""The grouped GPU step: a param group's tensors in one launch per op, no host sync.

:func:`takes` says when it runs: every GMixout tensor with a gradient resolved to a Triton
implementation by :func:`step.resolve` (CUDA tensors, or a forced ``"triton"`` backend), all on
one device, and not an init-only step. Otherwise the per-tensor path of :mod:`step` runs,
unchanged (the CPU / torch path always).

A *lane* is the tensors of one param group that share an implementation (``"fused"``: the
Adam/AdamW kernel; ``"triton"``: the inner optimizer steps the residuals) and a weight,
gradient and index dtype. Per step and lane:

1. with ``skip_nonfinite``, one fp32 device flag, zeroed once per step; ``gather_grad_grouped``
   writes ``grad[S]/keep`` into a compact buffer and sets the flag on an inf/NaN; dense
   gradients set the same flag (GradScaler's check);
2. fused: ``fused_adamw_step_grouped`` reads the compact gradients (without the check, the
   gradients themselves), the step counts, lr and the support sizes on the device and honours
   the flag: a skipped step changes no weight, state or step count;
   unfused: the compact gradients are the residuals' ``.grad``, the inner optimizer steps, and
   ``write_weights_grouped`` writes ``W[S] = A[S] + v/keep`` from the stored anchor.

The verdict is read without waiting for it: the flag is copied to pinned memory behind an
event and read at a later step, so ``skipped_steps`` and the warning come one step late
(reading ``opt.skipped_steps`` or ``state_dict()`` waits for it). Episode counters advance at
once and step back when a late verdict says the step was skipped; a step that can end an
episode first waits for every verdict (one sync per episode), so merges and redraws happen at
exactly the per-tensor path's steps. The host decides at once, with one sync on the flag, when
the inner optimizer steps anything (dense parameters, unfused lanes: it cannot honour a device
flag). Sharded ranks (``set_sync_group``) all-reduce the flag where ``sharding.agree`` votes,
without reading it (or read it when that is another device).

At an episode's end, :func:`.grouped_redraw.redraw` ends a lane whose tensors all end together: one merge, one
grouped draw (supports bit for bit the per-tensor draw's), one remap of the inner state, and one
host sync (the sizes: the capacity check and the host's ``support_size``).

A lane's tables (:class:`~.kernels.TensorGroup`: pointers to the weights and supports, the
sizes on the device), its compact buffers, draw and remap plans and step-count vector are cached
and rebuilt when a tensor they point to is replaced (a per-tensor redraw's new support, a
capacity growth, ``load_state_dict``, ``consolidate``, a parameter's new storage): the cache key
is the identity and address of each such tensor, compared every step. The lane's tables hold
those tensors, so an address in the key cannot be reused by another tensor while the lane
lives. The step counts of a fused lane are one fp32 vector; each residual's
``inner_state["step"]`` is a 0-d view of it (a checkpoint keeps torch AdamW's layout; a loaded
count is copied into a new vector).
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from .kernels import (RemapPlan, SupportPlan, TensorGroup, fused_adamw_step_grouped, gather_grad_grouped,
                      write_weights_grouped)
from .kernels._dispatch import note
from .kernels._table import upload
from .sharding import agree, agrees_alone, flat, flat_grad, local, vote_device
from .state import SUPPORT_SIZE, anchor
from .step import Work, adam_hyperparameters, adam_state, clear_unstepped, inner_step

__all__ = ["set_enabled", "is_enabled", "takes", "step", "settle", "CACHE_ATTR", "Lane", "lane_key"]

_enabled = True
# The optimizer attribute holding its cache (see _cache); a copy of the optimizer leaves it out.
CACHE_ATTR = "_grouped_cache"


def set_enabled(flag: bool) -> None:
    """Take the grouped step where it applies (the default), or always the per-tensor path
    (for comparisons and debugging)."""
    global _enabled
    _enabled = bool(flag)


def is_enabled() -> bool:
    return _enabled


class _Pending(NamedTuple):
    """A step whose non-finite verdict is still on its way to the host."""

    value: torch.Tensor  # the flag's copy (pinned host memory on CUDA)
    event: Any  # recorded after the copy (None on the CPU: the copy is done)
    counted: list  # (w, st, episode) of each tensor whose episode_step the step advanced


class Lane:
    """The cached tables of one lane (see the module docstring)."""

    def __init__(self, items: list[Work], key: tuple, device: torch.device):
        self.key = key
        sizes = [item.st[SUPPORT_SIZE] for item in items]
        self.group = TensorGroup([flat(local(item.w)) for item in items], [item.st["support"] for item in items],
                                 [1.0 - item.group["p"] for item in items], upload(sizes, torch.int64, device))
        self.fused = items[0].impl == "fused"  # else the inner optimizer steps the residuals
        self.plans: tuple[SupportPlan, RemapPlan] | None = None  # built at the lane's first grouped redraw
        self.compact: list[torch.Tensor] | None = None
        self.steps: torch.Tensor | None = None
        self.step_views: list[torch.Tensor] = []

    def compact_grads(self) -> list[torch.Tensor]:
        """Views of one flat fp32 buffer, one capacity each: the gathered gradients."""
        if self.compact is None:
            g = self.group
            flat = torch.empty(sum(g.capacities), dtype=torch.float32, device=g.device)
            self.compact = list(torch.split(flat, g.capacities))
        return self.compact

    def step_counts(self, inner_states: list[dict]) -> torch.Tensor:
        """The lane's step-count vector, every ``inner_state["step"]`` a view of it."""
        current = [s["step"] for s in inner_states]
        if self.steps is not None and all(c is v for c, v in zip(current, self.step_views)):
            return self.steps
        device = self.group.device
        on_device = [torch.is_tensor(c) and c.device == device for c in current]
        if all(on_device):  # e.g. the views of a lane rebuilt after a redraw: no host copy
            steps = torch.stack([c.reshape(()).to(torch.float32) for c in current])
        elif not any(on_device):  # host values (a fresh state, a loaded checkpoint): one upload
            steps = upload([float(c) for c in current], torch.float32, device)
        else:
            steps = torch.stack([c.reshape(()).to(torch.float32) if d else upload([float(c)], torch.float32, device)[0]
                                 for c, d in zip(current, on_device)])
        self.steps, self.step_views = steps, list(steps.unbind())
        for s, view in zip(inner_states, self.step_views):
            s["step"] = view
        return steps


class _Cache:
    def __init__(self) -> None:
        self.lanes: dict[tuple, Lane] = {}
        self.flags: dict = {}  # the non-finite flag (and a constant 1) per device
        self.pending: list[_Pending] = []
        self.stepped: list[tuple[Lane, list[Work]]] | None = None  # the lanes of the step being counted


def _cache(opt) -> _Cache:
    cache = vars(opt).get(CACHE_ATTR)
    if cache is None:
        cache = vars(opt)[CACHE_ATTR] = _Cache()
    return cache


def takes(fused: list[Work], unfused: list[Work], dense: list[torch.Tensor]) -> bool:
    """Whether this step runs grouped (see the module docstring; init-only steps are the caller's).

    Row-major weights only (others address their support through memory positions), whose
    stored anchor has their dtype (a weight cast mid-episode keeps its old anchor until the
    next episode start)."""
    work = fused + unfused
    if not _enabled or not work or any(item.impl not in ("fused", "triton") for item in work):
        return False
    device = local(work[0].w).device
    return (all(local(item.w).device == device and local(item.w).is_contiguous()
                and item.st.get("anchor", item.w).dtype == item.w.dtype for item in work)
            and all(local(w.grad).device == device for w in dense))


def _lanes(cache: _Cache, fused: list[Work], device: torch.device) -> list[tuple[Lane, list[Work]]]:
    by_lane: dict[tuple, list[Work]] = {}
    for item in fused:
        lane_id = (id(item.group), item.impl, item.w.dtype, item.w.grad.dtype, item.st["support"].dtype)
        by_lane.setdefault(lane_id, []).append(item)
    lanes = {}
    for lane_id, items in by_lane.items():
        key = lane_key(items)
        lane = cache.lanes.get(lane_id)
        lanes[lane_id] = lane if lane is not None and lane.key == key else Lane(items, key, device)
    cache.lanes = lanes  # lanes not stepped now are dropped (and their tensors released)
    return [(lanes[lane_id], items) for lane_id, items in by_lane.items()]


def lane_key(items: list[Work]) -> tuple:
    """What a lane's tables depend on: each weight's and support's identity, address and size."""
    return tuple((id(it.w), local(it.w).data_ptr(), local(it.w).numel(), id(it.st["support"]),
                  it.st["support"].data_ptr(), it.st["support"].numel(), it.st[SUPPORT_SIZE], it.group["p"])
                 for it in items)


def _flag(cache: _Cache, device: torch.device) -> torch.Tensor:
    flag = cache.flags.get(device)
    if flag is None:
        flag = cache.flags[device] = torch.empty(1, dtype=torch.float32, device=device)
    note("launch", "found_inf")
    return flag.zero_()


def _one(cache: _Cache, device: torch.device) -> torch.Tensor:
    one = cache.flags.get((device, "one"))
    if one is None:
        one = cache.flags[(device, "one")] = torch.ones(1, dtype=torch.float32, device=device)
    return one


def _agree_on_device(cache: _Cache, sync: Any, flag: torch.Tensor) -> torch.Tensor | None:
    """The ranks' verdict, all-reduced where it lies without reading it: the same two votes as
    ``sharding.agree`` (this rank steps: not an init-only step; the flag: not finite), so ranks
    taking either path make matching calls. None where the votes go elsewhere (the host decides)."""
    import torch.distributed as dist
    if vote_device(sync) != flag.device:
        return None
    votes = torch.cat([_one(cache, flag.device), flag])
    note("launch", "found_inf", 2)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=sync)
    return votes[1:]


def _read_now(flag: torch.Tensor) -> bool:
    """The flag's value on the host (a sync on a GPU): True if a gradient was not finite."""
    if flag.device.type != "cpu":
        note("sync", "found_inf")
    return bool(flag.item())


def _count_skip(opt, late: bool) -> None:
    opt._skipped_steps += 1
    when = " (the GPU's verdict is read one step later)" if late else ""
    warnings.warn(f"GMixoutOptimizer: non-finite gradient, step skipped ({opt._skipped_steps} skipped so far)"
                  f"{when}", RuntimeWarning, stacklevel=4)


def settle(opt, wait: bool = True) -> None:
    """Read the verdicts of earlier grouped steps: count and warn about each skipped one and step
    its episode counters back. ``wait=False`` reads only those already on the host."""
    cache = vars(opt).get(CACHE_ATTR)
    while cache is not None and cache.pending:
        record = cache.pending[0]
        if record.event is not None and not record.event.query():
            if not wait:
                return
            note("sync", "found_inf")
            record.event.synchronize()
        cache.pending.pop(0)
        if record.value.item() != 0:  # host memory: no device sync
            for w, st, episode in record.counted:
                # unless the episode was closed or the state replaced (consolidate, load) since
                if opt.state.get(w) is st and st["episode"] == episode and st["episode_step"] > 0:
                    st["episode_step"] -= 1
            _count_skip(opt, late=True)


def _defer(cache: _Cache, flag: torch.Tensor, fused: list[Work]) -> None:
    if flag.device.type == "cuda":
        value = torch.empty(1, dtype=torch.float32, pin_memory=True)
        note("launch", "found_inf")
        value.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        value, event = flag.clone(), None
    cache.pending.append(_Pending(value, event, [(item.w, item.st, item.st["episode"]) for item in fused]))


def step(opt, fused: list[Work], unfused: list[Work], dense: list[torch.Tensor], sync: Any) -> bool:
    """Run the step grouped; False if it was skipped (known now, already counted), True if it ran
    or its verdict is pending (the caller counts the step; :func:`settle` may take it back)."""
    cache = _cache(opt)
    cache.stepped = None
    settle(opt, wait=False)
    inner, state = opt.inner, opt.state
    work = fused + unfused
    device = local(work[0].w).device
    lanes = _lanes(cache, work, device)
    grads = {id(lane): [flat_grad(item.w) for item in items] for lane, items in lanes}
    # A[S]: stored, or derived once after loading a checkpoint of format 2 or older
    anchors = {id(lane): [anchor(item.w, item.st, 1.0 - item.group["p"], item.kernels.support_anchor)
                          for item in items] for lane, items in lanes}
    flag = _flag(cache, device) if opt._skip_nonfinite else None
    for lane, _ in lanes:  # a fused lane without the check reads the gradients itself
        if flag is not None or not lane.fused:
            gather_grad_grouped(lane.group, grads[id(lane)], lane.compact_grads(), flag)
    if flag is not None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in (local(w.grad) for w in dense):
            if g.numel():
                by_dtype.setdefault(g.dtype, []).append(g)
        for dense_grads in by_dtype.values():  # GradScaler's check (x * 1 is x), one dtype a call
            note("launch", "found_inf")
            torch._amp_foreach_non_finite_check_and_unscale_(dense_grads, flag, _one(cache, device))
    agreed = None
    if flag is not None and not (dense or unfused) and not agrees_alone(sync):
        agreed = _agree_on_device(cache, sync, flag)
    if dense or unfused or (not agrees_alone(sync) and agreed is None):
        # the inner optimizer's step cannot honour a device flag (nor a vote the host reads
        # elsewhere): decide now
        finite = flag is None or not _read_now(flag)
        if not agrees_alone(sync):
            _, finite = agree(sync, False, finite)
        if not finite:
            _count_skip(opt, late=False)
            return False
        found_inf = None
    else:
        found_inf = flag if agreed is None else agreed
    if opt._unstepped:  # an engine's probe laid out inner state: gone before the first real step
        clear_unstepped(state, opt._unstepped, [item.st["residual"] for item in work] + dense)
    stepped_by_inner = []  # (lane, residuals, A[S]) of the lanes the inner optimizer steps
    for lane, items in lanes:
        group = items[0].group
        residuals = [item.st["residual"] for item in items]
        if not lane.fused:
            for residual, g in zip(residuals, lane.compact_grads()):
                residual.grad = g
            stepped_by_inner.append((lane, residuals, anchors[id(lane)]))
            continue
        inner_states = [adam_state(state, r) for r in residuals]
        lr = group["lr"]
        lr = lr if torch.is_tensor(lr) and lr.device == device and lr.numel() == 1 else float(lr)
        fused_adamw_step_grouped(
            lane.group, None if flag is not None else grads[id(lane)], residuals,
            [s["exp_avg"] for s in inner_states], [s["exp_avg_sq"] for s in inner_states],
            anchors[id(lane)], steps=lane.step_counts(inner_states), lr=lr,
            compact_grads=lane.compact_grads() if flag is not None else None, found_inf=found_inf,
            **adam_hyperparameters(group, inner))
    if dense or stepped_by_inner:
        inner_step(inner, state, skip={item.w for item in fused})
    for lane, residuals, anchors in stepped_by_inner:
        write_weights_grouped(lane.group, anchors, residuals)
        for residual in residuals:
            residual.grad = None
    if found_inf is not None:
        if any(item.st["episode_step"] + 1 >= item.group["resample_every"] for item in fused):
            # this step may end an episode (counters may still count a skipped step: never too
            # few): every verdict first, so the merge and the redraw happen at the right step
            settle(opt, wait=True)
            if _read_now(found_inf):
                _count_skip(opt, late=False)
                return False
        else:
            _defer(cache, found_inf, fused)
    cache.stepped = lanes
    return True
