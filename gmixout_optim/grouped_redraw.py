"""The grouped redraw: the lanes of the grouped step (:mod:`.grouped`) whose tensors all end an
episode at the same step are merged, redrawn and remapped together.

Per lane: one merge launch, one grouped draw (a count and a write launch around a scan; supports
bit for bit the per-tensor draw's), one remap launch for all per-slot inner-state entries into
scratch and one foreach copy back into the state's own buffers (``remap``; ``carry`` zeroes the
tails, ``reset`` clears), the residuals zeroed in one foreach op, the anchors read in one launch,
and one host sync: the sizes, for the capacity check and the host's ``support_size``. A draw over
capacity, a changed capacity (``p`` edited), inner states of different layouts, or a lane some
of whose tensors do not end now are left to the per-tensor redraw (``episode.merge`` /
``episode.start``), which sizes the buffers anew.
"""
from __future__ import annotations

import torch

from .episode import merge_coefficient
from .grouped import CACHE_ATTR, Lane, is_enabled, lane_key
from .kernels import (RemapPlan, SupportPlan, TensorGroup, draw_support_grouped, merge_episode_grouped,
                      read_anchor_grouped, remap_state_grouped)
from .kernels._dispatch import note
from .sharding import local
from .state import SUPPORT_SIZE, capacity, per_element_keys
from .step import Work

__all__ = ["redraw"]


def redraw(opt, ending: list[tuple]) -> list[tuple]:
    """End the episodes of ``ending`` (``(w, group, gi, i, work)`` of each tensor whose episode
    ended at this step) where a whole lane of the grouped step just taken ends together: one
    merge launch, one draw (two launches and a scan), one remap launch (and a foreach copy back
    into the state's buffers) and one host sync (the sizes, for the capacity check and the
    host's ``support_size``) per lane. Returns the tensors left to the per-tensor redraw
    (``episode.merge`` / ``episode.start``)."""
    cache = vars(opt).get(CACHE_ATTR)
    stepped, rest = (cache.stepped if cache is not None else None), list(ending)
    if cache is not None:
        cache.stepped = None
    if not is_enabled() or not stepped or not ending:
        return rest
    by_st = {id(entry[4].st): entry for entry in ending}
    for lane, items in stepped:
        if all(id(item.st) in by_st for item in items) and _redraw_lane(opt, lane, items):
            done = {id(item.st) for item in items}
            rest = [entry for entry in rest if id(entry[4].st) not in done]
    return rest


def _redraw_lane(opt, lane: Lane, items: list[Work]) -> bool:
    state, policy, group = opt.state, opt.state_policy, lane.group
    inner_states = [state.get(item.st["residual"], {}) for item in items]
    caps = group.capacities
    keys = [per_element_keys(s, cap) for s, cap in zip(inner_states, caps)]
    if any(k != keys[0] or set(s) != set(inner_states[0]) for k, s in zip(keys, inner_states)) or any(
            s[k].dtype != torch.float32 for s in inner_states for k in keys[0]):
        return False  # inner states of different layouts: the per-tensor rules apply
    keys = keys[0]
    if any(capacity(local(item.w).numel(), keep) != cap for item, keep, cap in zip(items, group.keeps, caps)):
        return False  # p was changed (or the buffers grew): the per-tensor path sizes the buffers anew
    if lane.plans is None:
        plan = SupportPlan([(item.st["segments"], item.st["support"].numel()) for item in items], group.keeps,
                           group.device, index_dtype=group.index_dtype)
        lane.plans = plan, RemapPlan(plan.capacities, group.device)
    plan, remap_plan = lane.plans
    episodes = [item.st["episode"] + 1 for item in items]
    flat, n = draw_support_grouped(plan, opt.seed, episodes)
    note("sync", "redraw")
    sizes = n.tolist()  # the one sync of a redraw: the capacity check and the host's sizes
    if any(m > cap for m, cap in zip(sizes, plan.capacities)):
        return False  # ~1e-9 a draw: the per-tensor path grows the buffers (and says so)
    residuals = [item.st["residual"] for item in items]
    anchors = [item.st["anchor"] for item in items]  # stored: the step just taken made sure
    merge_episode_grouped(group, residuals, anchors,
                          [merge_coefficient(item.group, opt.merge_rule) for item in items])
    if not inner_states[0]:
        pass  # nothing to carry (the per-tensor path's rule too)
    elif policy == "remap":
        old = torch.cat(group.supports)
        # the kernel reads and writes distinct buffers; the state keeps its own (born in
        # state.py / by the inner optimizer), so it is remapped into scratch and copied back
        current = [[s[k] for s in inner_states] for k in keys]
        moved = [[torch.empty_like(v) for v in values] for values in current]
        remap_state_grouped(remap_plan, old, group.n, flat, n, current, moved)
        note("launch", "remap_state")
        torch._foreach_copy_([v for values in current for v in values], [v for values in moved for v in values])
    elif policy == "carry":
        torch._foreach_zero_([s[k][m:] for s, m in zip(inner_states, sizes) for k in keys])
    else:  # reset
        for s in inner_states:
            s.clear()
    supports = plan.split(flat)
    for item, support, m in zip(items, supports, sizes):
        item.st.update(support=support, episode=item.st["episode"] + 1, episode_step=0)
        item.st[SUPPORT_SIZE] = m
    torch._foreach_zero_(residuals)
    lane.group = TensorGroup(group.params, supports, group.keeps, n)
    lane.key = lane_key(items)
    read_anchor_grouped(lane.group, anchors)  # W = A on the new support: A[S] stored exactly
    return True
