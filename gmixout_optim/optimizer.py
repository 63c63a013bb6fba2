"""GMixoutOptimizer: GMixout as a wrapper around any torch optimizer.

This module holds the class (the math, its constructor, the public engine interface and the
public methods); the work is done by ``optimizer_step`` (one ``step()``: collect, decide, call,
count), ``state`` (per-tensor buffers), ``episode`` (draw / merge / remap), ``step`` (the
functional core and its resolver), ``grouped`` / ``grouped_redraw`` (the grouped GPU step and
redraw), ``capture`` (gradient capture, the clip norm), ``anchor_view`` (the weights outside
``step()``), ``sharding`` (where elements sit) and ``checkpoint`` (the saved format, its DCP view,
copies).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import anchor_view, capture, checkpoint, grouped, hparams, optimizer_step, sharding
from .inner import inner_from
from .kernels import Segment

__all__ = ["GMixoutOptimizer", "find_gmixout"]


class GMixoutOptimizer(Optimizer):
    r"""GMixout (Revisiting Mixout, arXiv 2510.06982) at the optimizer level.

    Every GMixout tensor :math:`W` keeps an anchor :math:`A` (initially the pretrained
    weights). Training runs in episodes of :math:`k` = ``resample_every`` optimizer steps.
    Episode :math:`e` trains only a random support :math:`S_e` (each element in it with
    probability :math:`s = 1 - p`) as a residual :math:`v`, zero at the episode's start:

    .. math::
        W &= A + \mathrm{scatter}(S_e, v) / (1 - p)
            \qquad\text{(what the forward pass sees; } W = A \text{ off } S_e)\\
        \nabla_v &= \nabla_W[S_e] / (1 - p)
            \qquad\text{(the inner optimizer, AdamW by default, updates } v)\\
        A[S_e] &\leftarrow A[S_e] + (1 - \lambda)\, v / (1 - p)
            \qquad\text{(end of episode, merge="ema": } A \leftarrow \lambda A + (1-\lambda) W)\\
        A[S_e] &\leftarrow A[S_e] + (1 - \lambda)\, v
            \qquad\text{(end of episode, merge="residual": the authors' code)}

    then :math:`W \leftarrow A`, :math:`v \leftarrow 0` and :math:`S_{e+1}` is drawn.
    :math:`\lambda` = ``ema_decay`` is the weight on the old anchor (1 keeps the
    pretrained anchor: Mixout with period k; 0 folds each episode in fully). Steps
    1..k form episode 0; merge and redraw happen at the end of the step that completes
    an episode, so the next forward pass sees the merged anchor.

    The parameter itself holds :math:`W`; the optimizer keeps, per tensor, only compact
    state: the support indices, :math:`v`, the inner optimizer's state of :math:`v` and
    :math:`A[S]` (stored exactly, in the parameter's dtype: ``ema_decay=1`` gives back the
    pretrained weights bit for bit). Supports come from a counter-based RNG keyed by
    (seed, tensor key, episode, global element offset): they are regenerated, never
    stored densely, and identical however the tensor is sharded (see ``set_locator``).
    DTensor (FSDP2) parameters are recognised: the optimizer steps their local shards in
    place, keyed by the shards' global element offsets, and checkpoints them for DCP.
    Weights in any dense memory layout (channels_last, transposed) train like their
    contiguous twins; gradients may have any layout.

    Not supported, refused at construction: an inner optimizer whose ``step`` needs a closure
    (LBFGS), a parameter listed twice, a weight whose memory has gaps or overlaps.
    ``step()`` is excluded from ``torch.compile`` (it runs eagerly; compile the model).

    Inner state across a redraw (``state_policy``): ``remap`` keeps the state of
    coordinates in both supports and zeroes the rest; ``carry`` keeps the compact
    vectors as they are; ``reset`` clears the inner state of the tensor.

    Non-finite gradients: with ``skip_nonfinite=True`` (default) a step whose gradients
    on the support (or on a dense parameter) hold inf/nan is skipped as a whole: no
    weight, state or counter changes, and ``skipped_steps`` counts it (as a loss scaler
    would). With ``False`` no check is made (one device sync less per step). On the grouped
    GPU path (see docs/DESIGN.md) the check stays on the device and the count and warning
    come one step late; reading ``skipped_steps`` waits for the last verdict.

    Gradient capture (``capture_grads=True``): a post-accumulate-grad hook on each GMixout
    tensor keeps only :math:`\nabla_W[S_e]` in a compact fp32 buffer (summed over
    micro-batches) and frees the dense gradient as soon as autograd has accumulated it, so
    no dense weight gradient outlives its layer's backward. Results are bitwise those of
    ``capture_grads=False``. ``step()`` consumes the captured gradients; ``zero_grad()``
    empties them; clip with :meth:`clip_grad_norm_` (``torch.nn.utils.clip_grad_norm_`` over
    the model does not see them). Works in one process and under FSDP2 (its hooks run on
    the sharded parameter after the reduce-scatter); refused under DDP and DeepSpeed, where
    the hook would see a gradient that is not the one the step must use
    (:mod:`gmixout_optim.capture`).

    Args:
        params: parameters or param groups, or an existing torch optimizer to wrap.
            Group keys ``gmixout`` (False trains the group densely with the inner
            optimizer), ``p``, ``ema_decay``, ``resample_every`` override the defaults.
        inner: a ``torch.optim`` name, an Optimizer class, or a factory
            ``f(param_groups, **inner_kwargs)``; ignored when ``params`` is an optimizer.
        p: masking probability in [0, 1); the support fraction is ``1 - p``.
        ema_decay: :math:`\lambda` in [0, 1].
        resample_every: episode length :math:`k` in optimizer steps.
        merge: ``"ema"`` or ``"residual"``.
        state_policy: ``"remap"``, ``"carry"`` or ``"reset"``.
        seed: RNG seed of the supports.
        skip_nonfinite: skip a step with a non-finite gradient (see above).
        capture_grads: keep only the support gradients (see above).
        **inner_kwargs: passed to the inner optimizer (e.g. ``lr=1e-5``).
    """

    def __init__(
        self,
        params: Iterable | Optimizer,
        inner: Any = None,
        *,
        p: float = 0.9,
        ema_decay: float = 0.3,
        resample_every: int = 50,
        merge: str = "ema",
        state_policy: str = "remap",
        seed: int = 0,
        skip_nonfinite: bool = True,
        capture_grads: bool = False,
        **inner_kwargs: Any,
    ) -> None:
        checked = hparams.check_kwargs(dict(p=p, ema_decay=ema_decay, resample_every=resample_every, merge=merge,
                                            state_policy=state_policy, seed=seed, skip_nonfinite=skip_nonfinite,
                                            capture_grads=capture_grads))
        # add_param_group (called by Optimizer.__init__ below) registers the capture hooks.
        self._capture_grads = checked["capture_grads"]
        self._capture_hooks: dict = {}
        self._capture_index: dict = {}
        inner_opt = inner_from(params, inner, inner_kwargs, GMixoutOptimizer)
        self._inner = inner_opt
        self._merge = checked["merge"]
        self._state_policy = checked["state_policy"]
        self._seed = checked["seed"]
        self._skip_nonfinite = checked["skip_nonfinite"]
        self._locator: Callable | None = None
        self._sync_group: Any = "auto"
        self._in_anchor_view = False
        # Inner-state entries laid out by an init-only step and not stepped since (keyed by the
        # residual or the dense parameter): see step.initialize_inner.
        self._unstepped: set[torch.Tensor] = set()
        self.skipped_steps = 0
        defaults = dict(inner_opt.defaults)
        defaults.update(gmixout=True, **{k: checked[k] for k in ("p", "ema_decay", "resample_every")})
        # Optimizer.__init__ re-adds the inner groups through add_param_group (which fills and
        # checks the GMixout keys) and sets `state`/`param_groups` through the properties.
        super().__init__(list(inner_opt.param_groups), defaults)

    # -- what the optimizer is -----------------------------------------------------------

    @property
    def inner(self) -> Optimizer:
        """The wrapped optimizer (it steps the residuals and the dense parameters)."""
        return self._inner

    @property
    def merge_rule(self) -> str:
        """``merge``: how a finished episode enters the anchor."""
        return self._merge

    @property
    def state_policy(self) -> str:
        """``state_policy``: what the inner state does at a redraw."""
        return self._state_policy

    @property
    def seed(self) -> int:
        """The seed of the support draws."""
        return self._seed

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (waits for a grouped step's pending verdict)."""
        grouped.settle(self)
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_steps = value

    @property
    def param_groups(self) -> list[dict]:
        # The inner optimizer's list itself: DeepSpeed and schedulers edit and reassign it.
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self._inner.param_groups = groups

    @property
    def state(self) -> defaultdict:
        # One mapping shared with the inner optimizer: dense parameters and residuals are
        # keys of the inner optimizer; GMixout tensors are keys of ours.
        return self._state

    @state.setter
    def state(self, value: dict) -> None:
        self._state = value if isinstance(value, defaultdict) else defaultdict(dict, value)
        if hasattr(self, "_inner"):
            self._inner.state = self._state

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; ``gmixout``, ``p``, ``ema_decay``, ``resample_every`` default to the optimizer's."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        where = f" of param group {len(self.param_groups)}"
        for key in hparams.GROUP_KEYS:
            param_group[key] = hparams.check(key, param_group.get(key, self.defaults[key]), where)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        gi = len(self.param_groups)
        first: dict[torch.Tensor, int] = {}
        for i, prm in enumerate(params):
            if prm in first:  # torch only warns; a repeated tensor would take two steps per step
                raise ValueError(f"param group {gi}, parameter {i} (shape {tuple(prm.shape)}) is listed more than "
                                 f"once (also as parameter {first[prm]}); list each parameter once")
            first[prm] = i
        if param_group["gmixout"]:
            for i, prm in enumerate(params):
                if not prm.is_floating_point():
                    raise ValueError(
                        f"GMixout trains real floating-point tensors; a parameter{where} has dtype {prm.dtype}")
                sharding.check_layout(prm, gi, i)
        param_group["params"] = params
        capture.check_group(self, param_group, where)
        self._inner.add_param_group(param_group)
        capture.install_hooks(self, param_group, where)

    # -- the public engine interface -------------------------------------------------------

    def set_locator(self, locator: Callable[[torch.Tensor, int, int], list[Segment] | None] | None) -> None:
        """Say where each tensor's elements sit in the logical (unsharded) model.

        ``locator(tensor, group_index, index_in_group)`` returns a list of
        ``Segment(start, length, key, offset)``: local positions ``[start, start+length)``
        hold elements ``[offset, offset+length)`` of logical tensor ``key``. Supports are
        drawn per logical element, so any sharding of the same model draws the same
        supports. ``None`` (or a locator returning ``None``) means the default: one segment
        keyed by :meth:`tensor_key`, or, for a DTensor (FSDP2), its local shard's global
        element offsets. Set it before the first step.
        """
        if locator is not None and not callable(locator):
            raise TypeError(f"locator must be callable or None, got {locator!r}")
        self._locator = locator

    def tensor_key(self, group_index: int, index: int) -> int:
        """The default logical key of parameter ``index`` of group ``group_index``: its position
        over all groups (the key a plain single-process optimizer uses)."""
        return sharding.default_key(self.param_groups, group_index, index)

    def locate(self, tensor: torch.Tensor, group_index: int, index: int) -> list[Segment]:
        """The segments of ``tensor`` (parameter ``index`` of group ``group_index``): the
        locator's answer, or the default (see :meth:`set_locator`)."""
        segments = self._locator(tensor, group_index, index) if self._locator is not None else None
        if segments is None:
            segments = sharding.default_segments(tensor, self.param_groups, group_index, index)
        return sharding.check_segments(list(segments), tensor)

    def set_sync_group(self, group: Any = "shards") -> None:
        """Have the ranks that see different shards of a gradient take the same step decisions
        (skip a non-finite step on all; an init-only step only when it is one on every rank),
        with one small all-reduce per step; every rank of the group must call ``step()``.
        ``group``: a process group, ``"shards"`` (the first DTensor's shard group: FSDP2/HSDP),
        ``"world"`` (DeepSpeed ZeRO), ``"auto"`` (default: ``"shards"`` if a parameter is a
        DTensor, else off) or ``None`` (off)."""
        self._sync_group = group

    def restart_episodes(self, episode_number: int, group_index: int | None = None) -> None:
        """Make every GMixout tensor (of group ``group_index``, or of all groups) start episode
        ``episode_number`` at its next step, with no compact or inner state. Engines use it to
        resume a consolidated checkpoint whose optimizer state they cannot load (another world
        size); the support of that episode is drawn at the next step."""
        if isinstance(episode_number, bool) or not isinstance(episode_number, int) or episode_number < 0:
            raise ValueError(f"episode must be an int >= 0 (the episode to start), got {episode_number!r}")
        checkpoint.restart_episodes(self, episode_number, group_index)

    # -- the step (gmixout_optim.optimizer_step) -------------------------------------------

    # torch.compile cannot trace the step (data-dependent support sizes, per-tensor Python state:
    # its first compiled call went wrong): it runs eagerly, a compiled caller breaks its graph here.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one GMixout step (see the class docstring for the math); never compiled."""
        return optimizer_step.step(self, closure)

    # -- gradient capture (gmixout_optim.capture) -------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad``, and empty the captured / already gathered support gradients."""
        super().zero_grad(set_to_none)
        capture.clear_all(self)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """Clip the gradients this optimizer steps with by their total norm; returns that norm.

        Those gradients are, for a GMixout tensor, its residual's gradient ``grad[S] / keep``
        (captured, or gathered now), and for a dense parameter its ``.grad``; they are scaled
        by ``min(1, max_norm / (norm + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` does.
        (``torch.nn.utils.clip_grad_norm_`` over the model measures the dense weight
        gradients instead, and does not see captured ones.) Call it after the last backward
        and before ``step()``. Sharded tensors (FSDP2): the norm covers every shard (one
        all-reduce over the shard group).
        """
        return capture.clip_grad_norm(self, max_norm, norm_type, error_if_nonfinite, foreach)

    # -- weights outside step() (gmixout_optim.anchor_view) ---------------------------------

    def consolidate(self) -> None:
        """End every running episode now: merge, ``W = A``, and drop all compact state.

        The next step starts the next episode with a fresh support. What is left per
        tensor is two counters, so the checkpoint loads on any sharding/world size.
        """
        anchor_view.refuse(self, "consolidate()")
        anchor_view.close_episodes(self, merge_running=True)

    def finalize(self, merge_running: bool = True) -> None:
        """Leave the parameters holding exactly the anchor: a plain dense model.

        ``merge_running=True`` merges the unfinished episode (a shortened last episode);
        ``False`` discards it, as the authors' code does.
        """
        anchor_view.refuse(self, "finalize()")
        anchor_view.close_episodes(self, merge_running)

    def anchor_weights(self):
        """Within the block the parameters hold the anchor; the training weights come back bitwise.

        Evaluate or save the model there. ``step()``, ``state_dict()``, ``load_state_dict()``,
        ``consolidate()`` and ``finalize()`` raise RuntimeError inside the block: the
        parameters do not hold the training weights the running episode belongs to.
        """
        return anchor_view.anchor_weights(self)

    # -- checkpoints and copies (gmixout_optim.checkpoint) -----------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Torch's layout (state keyed by position in ``param_groups``) plus a ``gmixout`` block;
        DTensor parameters' compact state as DTensors (see :mod:`gmixout_optim.checkpoint`)."""
        anchor_view.refuse(self, "state_dict()")
        grouped.settle(self)  # episode counters of grouped steps whose verdict is pending
        return checkpoint.save(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` (format 1, 2 or 3, directly or through DCP); tensors are
        copied, keeping their dtypes (indices stay integers)."""
        anchor_view.refuse(self, "load_state_dict()")
        grouped.settle(self)  # pending verdicts belong to the run being replaced, not the loaded one
        checkpoint.load(self, state_dict)

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, ``pickle``) carry everything: the inner optimizer, the state,
        the counters, and step like the original. An optimizer with a locator (set by an engine
        integration) is refused: the locator refers to the engine's tensors, not the copy's."""
        return checkpoint.copy_state(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(checkpoint.restore_inner(state))

    def __repr__(self) -> str:
        return (f"GMixoutOptimizer(inner={type(self._inner).__name__}, p={self.defaults['p']}, "
                f"ema_decay={self.defaults['ema_decay']}, resample_every={self.defaults['resample_every']}, "
                f"merge={self._merge!r}, state_policy={self._state_policy!r}, seed={self._seed})")


def find_gmixout(obj: Any) -> GMixoutOptimizer:
    """The GMixoutOptimizer inside ``obj``: itself, an ``AcceleratedOptimizer`` (``.optimizer``),
    a DeepSpeed engine (``.basic_optimizer``) or a ZeRO wrapper (``.optimizer``)."""
    seen = obj
    for _ in range(4):
        if isinstance(seen, GMixoutOptimizer):
            return seen
        seen = getattr(seen, "basic_optimizer", None) or getattr(seen, "optimizer", None)
    raise TypeError(f"no GMixoutOptimizer inside {type(obj).__name__}")
