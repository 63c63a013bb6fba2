"""One ``GMixoutOptimizer.step()``: collect the tensors with a gradient, decide (the grouped GPU
step or the per-tensor path, an init-only step, a non-finite gradient, agreed between the ranks
of the sync group), call the implementations, then count the episodes, merging and redrawing
those that end. The math is in the class docstring; the functional core is :mod:`.step`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from . import capture, episode, grouped, grouped_redraw, sharding
from .anchor_view import refuse
from .step import Work, all_finite, clear_unstepped, gather_grads, gmixout_step, initialize_inner, resolve

__all__ = ["step", "count_step"]


def step(opt: Any, closure: Callable[[], Any] | None) -> Any:
    """``GMixoutOptimizer.step`` (see there); called under ``torch.no_grad``."""
    refuse(opt, "step()")
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    sparse, dense = capture.collect(opt)
    sync = sharding.sync_group(opt._sync_group, opt.param_groups)
    if not sparse and not dense and sharding.agrees_alone(sync):
        return loss
    fresh = [w for w, *_ in sparse if "episode" not in opt._state.get(w, {})]
    fresh += [w for w in dense if not opt._state.get(w)]
    init_only = len(fresh) == len(sparse) + len(dense) and all(not sharding.local(w.grad).any() for w in fresh)
    work = []
    for w, group, gi, i in sparse:
        st = episode.open_episode(opt, w, group, gi, i)
        if not init_only:
            capture.fold_left_grad(opt, w, st, stacklevel=4)  # the caller's frame, through the method
        impl, kernels = resolve(w, group, opt.inner)
        if impl == "fused" and capture.status(st) != capture.EMPTY:
            impl = "triton"  # the fused kernel gathers from a dense gradient; this one is compact
        work.append(Work(w, st, group, impl, kernels))
    fused = [item for item in work if item.impl == "fused"]
    unfused = [item for item in work if item.impl != "fused"]
    # captured (or clip_grad_norm_-gathered) gradients are compact: the grouped kernels read dense ones
    compact = any(capture.status(item.st) != capture.EMPTY for item in work)
    if not init_only and not compact and grouped.takes(fused, unfused, dense):
        if grouped.step(opt, fused, unfused, dense, sync):
            count_step(opt, sparse, work)
        return loss
    gather_grads([item for item in unfused if capture.status(item.st) == capture.EMPTY])
    for item in unfused:  # (SCALED: clip_grad_norm_ already set the residual's gradient)
        if capture.status(item.st) == capture.SUMMED:
            item.st["residual"].grad = capture.scale(item.st, 1.0 - item.group["p"])
    finite = init_only or not opt._skip_nonfinite or all_finite(unfused, fused, dense)
    init_only, finite = sharding.agree(sync, init_only, finite)
    if init_only:
        initialize_inner(opt.inner, opt._state, work, dense, opt._unstepped)
        return loss
    for item in work:  # step() consumes the captured / gathered support gradients
        item.st.pop(capture.GRAD_STATUS, None)
    if not finite:
        for item in unfused:
            item.st["residual"].grad = None
        opt.skipped_steps += 1
        warnings.warn(f"GMixoutOptimizer: non-finite gradient, step skipped "
                      f"({opt.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=3)
        return loss
    if opt._unstepped:
        clear_unstepped(opt._state, opt._unstepped, [item.st["residual"] for item in work] + dense)
    gmixout_step(opt.inner, opt._state, unfused, fused, dense)
    count_step(opt, sparse, work)
    return loss


def count_step(opt: Any, sparse: list, work: list[Work]) -> None:
    """Advance the episode counters of the tensors stepped; merge and redraw where one ends."""
    ending = []
    for (w, group, gi, i), item in zip(sparse, work):
        item.st["episode_step"] += 1
        if item.st["episode_step"] >= group["resample_every"]:
            ending.append((w, group, gi, i, item))
    for w, group, gi, i, item in grouped_redraw.redraw(opt, ending):  # those it did not redraw grouped
        episode.merge(w, item.st, group, episode.merge_coefficient(group, opt.merge_rule))
        item.st["episode"] += 1
        item.st["episode_step"] = 0
        episode.start_episode(opt, w, item.st, group, gi, i)
