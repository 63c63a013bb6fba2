"""The weights outside ``step()``: ``consolidate``, ``finalize`` and ``anchor_weights`` of
:class:`~gmixout_optim.optimizer.GMixoutOptimizer` (the public methods, with their documentation,
are on the class; these functions do the work), and the refusal of what must not run while the
parameters hold the anchor.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from . import episode
from .sharding import flat, local
from .state import positions

__all__ = ["refuse", "running_episodes", "close_episodes", "anchor_weights"]


def refuse(opt: Any, what: str) -> None:
    """RuntimeError if ``opt``'s parameters hold the anchor (inside ``anchor_weights()``)."""
    if opt._in_anchor_view:
        raise RuntimeError(
            f"GMixoutOptimizer.{what} inside `with opt.anchor_weights():`: the parameters hold the anchor "
            "there, not the training weights of the running episode, so a step would be lost and a "
            "checkpoint would not resume. Call it after the with-block (evaluate or save the model inside "
            "it), or call finalize() to make the anchor the model")


def running_episodes(opt: Any) -> Iterator[tuple[torch.Tensor, dict, dict]]:
    """``(w, st, group)`` of every GMixout tensor inside an episode (its support drawn)."""
    for group in opt.param_groups:
        if group["gmixout"]:
            for w in group["params"]:
                st = opt._state.get(w)
                if st and "support" in st:
                    yield w, st, group


@torch.no_grad()
def close_episodes(opt: Any, merge_running: bool) -> None:
    """End every running episode (merged if ``merge_running``, else discarded); drop its state."""
    for w, st, group in list(running_episodes(opt)):
        opt._unstepped.discard(st["residual"])
        coeff = episode.merge_coefficient(group, opt.merge_rule) if merge_running else 0.0
        episode.close(opt._state, w, st, group, coeff)


@contextmanager
def anchor_weights(opt: Any):
    """``GMixoutOptimizer.anchor_weights`` (see there)."""
    refuse(opt, "anchor_weights()")
    saved = []
    with torch.no_grad():
        for w, st, group in list(running_episodes(opt)):
            idx = positions(w, st)[: st["support_size"]].long()
            saved.append((w, idx, flat(local(w))[idx].clone()))
            episode.merge(w, st, group, 0.0)
    opt._in_anchor_view = True
    try:
        yield opt
    finally:
        opt._in_anchor_view = False
        with torch.no_grad():
            for w, idx, values in saved:
                flat(local(w)).index_copy_(0, idx, values)
