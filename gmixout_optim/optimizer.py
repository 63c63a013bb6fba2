"""GMixoutOptimizer: GMixout as a wrapper around any torch optimizer."""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import kernels
from .kernels import Segment, support_capacity
from .kernels._dispatch import use_triton

__all__ = ["GMixoutOptimizer"]

try:  # FSDP2 parameters are DTensors: the optimizer works on their local shards.
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # pragma: no cover - torch built without distributed
    _DTensor = None

MERGE_RULES = ("ema", "residual")
STATE_POLICIES = ("remap", "carry", "reset")
GROUP_KEYS = ("gmixout", "p", "ema_decay", "resample_every")
# A GMixout tensor's per-episode buffers (the inner optimizer's state of the residual is
# keyed by the residual itself). consolidate()/finalize() drop them.
COMPACT_KEYS = ("support", "residual", "anchor")
STATE_FORMAT = 1


def _check_p(p: Any, where: str = "") -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p{where} must be a float in [0, 1) (the masking probability), got {p!r}")


def _check_ema_decay(lam: Any, where: str = "") -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"ema_decay{where} must be a float in [0, 1], got {lam!r}")


def _check_resample_every(k: Any, where: str = "") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"resample_every{where} must be a positive int (optimizer steps per episode), got {k!r}")


def _build_inner(inner: Any, groups: list[dict], inner_kwargs: dict) -> Optimizer:
    """Build the inner optimizer from a torch.optim name, an Optimizer class or a factory."""
    if isinstance(inner, str):
        cls = getattr(torch.optim, inner, None)
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)) or issubclass(cls, GMixoutOptimizer):
            allowed = sorted(
                n for n, c in vars(torch.optim).items()
                if isinstance(c, type) and issubclass(c, Optimizer) and c is not Optimizer
                and not issubclass(c, GMixoutOptimizer)
            )
            raise ValueError(f"inner={inner!r} is not an optimizer of torch.optim; allowed names: {allowed}")
        inner = cls
    if isinstance(inner, type):
        if not issubclass(inner, Optimizer) or issubclass(inner, GMixoutOptimizer):
            raise TypeError(f"inner must be a torch.optim.Optimizer subclass (not GMixoutOptimizer), got {inner!r}")
        sig = inspect.signature(inner.__init__)
        if not any(prm.kind is prm.VAR_KEYWORD for prm in sig.parameters.values()):
            accepted = [n for n in sig.parameters if n not in ("self", "params")]
            unknown = sorted(set(inner_kwargs) - set(accepted))
            if unknown:
                raise ValueError(
                    f"inner optimizer {inner.__name__} does not accept {unknown}; it accepts {accepted}")
        return inner(groups, **inner_kwargs)
    if callable(inner):
        built = inner(groups, **inner_kwargs)
        if not isinstance(built, Optimizer):
            raise TypeError(f"the inner factory {inner!r} returned {type(built).__name__}, not a torch Optimizer")
        return built
    raise TypeError(f"inner must be a torch.optim name, an Optimizer class or a factory, got {inner!r}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's elements of ``t``: a DTensor's local shard (a view: in-place writes reach
    the parameter, e.g. FSDP2's sharded storage), any other tensor itself."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


def _shard_group(t: torch.Tensor) -> Any:
    """The process group over which DTensor ``t`` is sharded (None if it is only replicated)."""
    from torch.distributed.tensor import Shard

    dims = [m for m, placement in enumerate(t.placements) if isinstance(placement, Shard)]
    return t.device_mesh.get_group(dims[0]) if dims else None


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
    state: the support indices, :math:`v`, the inner optimizer's state of :math:`v`
    (and :math:`A[S]` for 16-bit parameters; fp32 parameters derive it as
    :math:`W[S] - v/(1-p)`). Supports come from a counter-based RNG keyed by
    (seed, tensor key, episode, global element offset): they are regenerated, never
    stored densely, and identical however the tensor is sharded (see ``set_locator``).

    Inner state across a redraw (``state_policy``): ``remap`` keeps the state of
    coordinates in both supports and zeroes the rest; ``carry`` keeps the compact
    vectors as they are; ``reset`` clears the inner state of the tensor.

    Non-finite gradients: with ``skip_nonfinite=True`` (default) a step whose gradients
    on the support (or on a dense parameter) hold inf/nan is skipped as a whole: no
    weight, state or counter changes, and ``skipped_steps`` counts it (as a loss scaler
    would). With ``False`` no check is made (one device sync less per step).

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
        **inner_kwargs: Any,
    ) -> None:
        _check_p(p)
        _check_ema_decay(ema_decay)
        _check_resample_every(resample_every)
        if merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {MERGE_RULES}, got {merge!r}")
        if state_policy not in STATE_POLICIES:
            raise ValueError(f"state_policy must be one of {STATE_POLICIES}, got {state_policy!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")

        if isinstance(params, Optimizer):
            if isinstance(params, GMixoutOptimizer):
                raise TypeError("params is already a GMixoutOptimizer; wrap the inner optimizer once")
            if inner is not None or inner_kwargs:
                raise ValueError(
                    "an optimizer instance was given: set its hyperparameters on it; got "
                    f"inner={inner!r} and inner kwargs {sorted(inner_kwargs)}")
            if any(len(s) for s in params.state.values()):
                raise ValueError("wrap the inner optimizer before its first step: it already holds state")
            inner_opt = params
        else:
            if isinstance(params, torch.Tensor):
                raise TypeError("params must be an iterable of tensors or dicts, not a tensor")
            groups = list(params)
            if groups and not isinstance(groups[0], dict):
                groups = [{"params": groups}]
            inner_opt = _build_inner("AdamW" if inner is None else inner, groups, inner_kwargs)

        self._inner = inner_opt
        self._merge = merge
        self._state_policy = state_policy
        self._seed = seed
        self._skip_nonfinite = skip_nonfinite
        self._locator: Callable | None = None
        self._sync_group: Any = None
        self._support_size: dict[torch.Tensor, int] = {}
        self.skipped_steps = 0
        defaults = dict(inner_opt.defaults)
        defaults.update(gmixout=True, p=p, ema_decay=ema_decay, resample_every=resample_every)
        # Optimizer.__init__ re-adds the inner groups through add_param_group (which fills and
        # checks the GMixout keys) and sets `state`/`param_groups` through the properties.
        super().__init__(list(inner_opt.param_groups), defaults)

    # -- engine-facing plumbing --------------------------------------------------------

    @property
    def inner(self) -> Optimizer:
        """The wrapped optimizer (it steps the residuals and the dense parameters)."""
        return self._inner

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
        for key in GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        where = f" of param group {len(self.param_groups)}"
        if not isinstance(param_group["gmixout"], bool):
            raise ValueError(f"'gmixout'{where} must be a bool, got {param_group['gmixout']!r}")
        _check_p(param_group["p"], where)
        _check_ema_decay(param_group["ema_decay"], where)
        _check_resample_every(param_group["resample_every"], where)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if param_group["gmixout"]:
            for prm in params:
                if not prm.is_floating_point():
                    raise ValueError(
                        f"GMixout trains real floating-point tensors; a parameter{where} has dtype {prm.dtype}")
        param_group["params"] = params
        self._inner.add_param_group(param_group)

    def set_sync_group(self, group: Any = "shards") -> None:
        """Have the ranks that share a sharded tensor take the same step decisions.

        Sharded engines show each rank only its shard of the gradient: with a sync group,
        a non-finite value on any rank skips the step on all, and an init-only step
        (all-zero gradients on empty state) happens only when it is one on every rank.
        It costs one small all-reduce per step, and every rank of the group must call
        ``step()`` together (the engines do). ``group``: a process group, ``"shards"``
        (the shard group of the first DTensor parameter: FSDP2/HSDP), ``"world"`` (the
        default group, once initialised: DeepSpeed ZeRO), or ``None`` (off).
        The integrations set it.
        """
        self._sync_group = group

    def set_locator(self, locator: Callable[[torch.Tensor, int, int], list[Segment] | None] | None) -> None:
        """Say where each tensor's elements sit in the logical (unsharded) model.

        ``locator(tensor, group_index, index_in_group)`` returns a list of
        ``Segment(start, length, key, offset)``: local positions ``[start, start+length)``
        hold elements ``[offset, offset+length)`` of logical tensor ``key``. Supports are
        drawn per logical element, so any sharding of the same model draws the same
        supports. ``None`` (or a locator returning ``None``) means one segment keyed by
        the tensor's position in ``param_groups``. Set it before the first step.
        """
        if locator is not None and not callable(locator):
            raise TypeError(f"locator must be callable or None, got {locator!r}")
        self._locator = locator

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one GMixout step (see the class docstring for the math)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse, dense = self._tensors_with_grad()
        if not sparse and not dense and self._sync_group is None:
            return loss
        fresh = [w for w, _ in sparse if "episode" not in self._state.get(w, {})]
        fresh += [w for w in dense if not self._state.get(w)]
        init_only = len(fresh) == len(sparse) + len(dense) and all(not _local(w.grad).any() for w in fresh)
        for w, (group, gi, i) in sparse:
            st = self._state[w]
            if "episode" not in st:
                st.update(episode=0, episode_step=0)
            if "support" not in st:
                self._start_episode(w, st, group, gi, i)

        fused = [(w, g) for w, (g, _, _) in sparse if self._fusable(w, g)]
        fused_set = set(w for w, _ in fused)
        unfused = [(w, g) for w, (g, _, _) in sparse if w not in fused_set]
        for w, group in unfused:
            st = self._state[w]
            residual = st["residual"]
            residual.grad = torch.empty_like(residual)
            kernels.gather_grad(_local(w.grad).view(-1), st["support"], self._support_size[w],
                                1.0 - group["p"], residual.grad)
        finite = init_only or not self._skip_nonfinite or self._all_finite(unfused, fused, dense)
        if self._sync_group is not None:
            init_only, finite = self._agree(init_only, finite)
        if init_only:
            self._initialize_inner(sparse, dense)
            return loss
        if not finite:
            for w, _ in unfused:
                self._state[w]["residual"].grad = None
            self.skipped_steps += 1
            warnings.warn(f"GMixoutOptimizer: non-finite gradient, step skipped "
                          f"({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=2)
            return loss

        anchors = [self._support_anchor(w, g) for w, g in unfused]
        if unfused or dense:
            self._inner_step(skip=fused_set)
        for (w, group), anchor in zip(unfused, anchors):
            st = self._state[w]
            kernels.write_weights(_local(w).view(-1), st["support"], self._support_size[w], anchor,
                                  st["residual"], 1.0 - group["p"])
            st["residual"].grad = None
        for w, group in fused:
            self._fused_adamw(w, group)

        for w, (group, gi, i) in sparse:
            st = self._state[w]
            st["episode_step"] += 1
            if st["episode_step"] >= group["resample_every"]:
                self._end_episode(w, st, group)
                st["episode"] += 1
                st["episode_step"] = 0
                self._start_episode(w, st, group, gi, i)
        return loss

    def _tensors_with_grad(self):
        sparse, dense = [], []
        for gi, group in enumerate(self.param_groups):
            for i, w in enumerate(group["params"]):
                if w.grad is None:
                    continue
                if w.grad.is_sparse:
                    raise TypeError(f"GMixoutOptimizer does not support sparse gradients "
                                    f"(param group {gi}, parameter {i}, layout {w.grad.layout})")
                if group["gmixout"]:
                    sparse.append((w, (group, gi, i)))
                else:
                    dense.append(w)
        return sparse, dense

    def _agree(self, init_only: bool, finite: bool) -> tuple[bool, bool]:
        """The step decisions, agreed over the sync group (see ``set_sync_group``)."""
        import torch.distributed as dist

        group = self._sync_group
        if group == "shards":
            group = next((_shard_group(w) for g in self.param_groups for w in g["params"]
                          if _DTensor is not None and isinstance(w, _DTensor)), None)
            if group is None:
                return init_only, finite
        elif group == "world":
            if not (dist.is_initialized() and dist.get_world_size() > 1):
                return init_only, finite
            group = None
        device = torch.device("cpu")
        if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        votes = torch.tensor([float(not init_only), float(not finite)], device=device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
        return votes[0].item() == 0.0, votes[1].item() == 0.0

    def _all_finite(self, unfused, fused, dense) -> bool:
        grads = [self._state[w]["residual"].grad for w, _ in unfused]
        for w, _ in fused:
            st = self._state[w]
            grads.append(_local(w.grad).view(-1)[st["support"][: self._support_size[w]].long()])
        grads += [_local(w.grad) for w in dense]
        grads = [g for g in grads if g.numel()]  # the inf-norm of an empty tensor is undefined
        if not grads:
            return True
        # max |g| per tensor is inf or nan iff the tensor holds one: one foreach op, one sync per device.
        by_device: dict[torch.device, list] = defaultdict(list)
        for norm in torch._foreach_norm(grads, float("inf")):
            by_device[norm.device].append(norm.float())
        return all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in by_device.values())

    def _support_anchor(self, w: torch.Tensor, group: dict) -> torch.Tensor:
        st = self._state[w]
        n = self._support_size[w]
        if "anchor" in st:
            return st["anchor"][:n]
        return kernels.support_anchor(_local(w).view(-1), st["support"], n, st["residual"], 1.0 - group["p"])

    @contextmanager
    def _residuals_in_groups(self, skip: set = frozenset()):
        """Show the inner optimizer the residuals in place of the GMixout tensors."""
        saved = [group["params"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                if group["gmixout"]:
                    group["params"] = [
                        self._state[w]["residual"] for w in group["params"]
                        if w not in skip and "residual" in self._state.get(w, {})
                    ]
            yield
        finally:
            for group, params in zip(self.param_groups, saved):
                group["params"] = params

    def _inner_step(self, skip: set = frozenset()) -> None:
        with self._residuals_in_groups(skip):
            self._inner.step()

    def _initialize_inner(self, sparse, dense) -> None:
        """Create the inner state without changing a weight or counting a step.

        Engines probe an optimizer with an all-zero-gradient step (DeepSpeed ZeRO-3 at
        init, DCP's ``_init_optim_state``) to lay out its state. The inner optimizer steps
        with lr 0 and zero residual gradients, dense weights are restored, and its step
        counters are zeroed, so the next real step is the first one.
        """
        for w, _ in sparse:
            residual = self._state[w]["residual"]
            residual.grad = torch.zeros_like(residual)
        saved_weights = [w.detach().clone() for w in dense]
        saved_lrs = []
        for group in self.param_groups:
            saved_lrs.append(group.get("lr"))
            if "lr" in group:
                group["lr"] = torch.zeros_like(group["lr"]) if torch.is_tensor(group["lr"]) else 0.0
        try:
            self._inner_step()
        finally:
            for group, lr in zip(self.param_groups, saved_lrs):
                if lr is not None:
                    group["lr"] = lr
        for w, saved in zip(dense, saved_weights):
            w.copy_(saved)
        touched = [self._state[w]["residual"] for w, _ in sparse] + list(dense)
        for t in touched:
            inner_state = self._state.get(t, {})
            step = inner_state.get("step")
            if torch.is_tensor(step):
                step.zero_()
            elif step is not None:
                inner_state["step"] = 0
        for w, _ in sparse:
            self._state[w]["residual"].grad = None

    # -- fused AdamW (CUDA + Triton) ---------------------------------------------------

    def _fusable(self, w: torch.Tensor, group: dict) -> bool:
        inner = self._inner
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW) or not use_triton(w):
            return False
        return not any(group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable"))

    def _fused_adamw(self, w: torch.Tensor, group: dict) -> None:
        st = self._state[w]
        residual = st["residual"]
        inner_state = self._state[residual]
        if not inner_state:
            inner_state["step"] = torch.tensor(0.0)
            inner_state["exp_avg"] = torch.zeros_like(residual)
            inner_state["exp_avg_sq"] = torch.zeros_like(residual)
        inner_state["step"] += 1
        beta1, beta2 = group["betas"]
        decoupled = isinstance(self._inner, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        kernels.fused_adamw_step(
            _local(w).view(-1), _local(w.grad).view(-1), st["support"], self._support_size[w], residual,
            inner_state["exp_avg"], inner_state["exp_avg_sq"], st.get("anchor"),
            step=int(inner_state["step"].item()), lr=float(group["lr"]), beta1=float(beta1),
            beta2=float(beta2), eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            decoupled=bool(decoupled), keep=1.0 - group["p"])

    # -- episodes ----------------------------------------------------------------------

    def _segments(self, w: torch.Tensor, gi: int, i: int) -> list[Segment]:
        segments = self._locator(w, gi, i) if self._locator is not None else None
        if segments is None:
            key = sum(len(g["params"]) for g in self.param_groups[:gi]) + i
            if _DTensor is not None and isinstance(w, _DTensor):
                raise ValueError(
                    f"param group {gi}, parameter {i} is a DTensor (FSDP2) and no locator is set: call "
                    "gmixout_optim.integrations.fsdp.attach(optimizer) after fully_shard, so that supports "
                    "follow the global element offsets of the shards and checkpoints keep every rank's state")
            segments = [Segment(0, _local(w).numel(), key, 0)]
        for seg in segments:
            if seg.start < 0 or seg.length < 0 or seg.start + seg.length > _local(w).numel() or seg.offset < 0:
                raise ValueError(f"locator returned {seg} for a tensor of {_local(w).numel()} elements")
        return segments

    def _start_episode(self, w: torch.Tensor, st: dict, group: dict, gi: int, i: int) -> None:
        """Draw the support of episode ``st['episode']``; zero the residual; apply the state policy."""
        if not _local(w).is_contiguous():
            raise ValueError(f"GMixout tensors must be contiguous (param group {gi}, parameter {i})")
        keep = 1.0 - group["p"]
        if "segments" not in st:
            st["segments"] = self._segments(w, gi, i)
        capacity = support_capacity(_local(w).numel(), keep)
        support, n = kernels.draw_support(st["segments"], self._seed, st["episode"], keep, capacity, w.device)
        if n > capacity:  # ~1e-9 per draw: grow rather than fail, and say so
            warnings.warn(f"support of {n} elements exceeds the buffer capacity {capacity}: "
                          "buffers grow (their shapes now differ from a fresh optimizer's)", RuntimeWarning)
            capacity = n
            support, n = kernels.draw_support(st["segments"], self._seed, st["episode"], keep, capacity, w.device)
        old_support, old_n = st.get("support"), self._support_size.get(w)
        if "residual" not in st or st["residual"].numel() != capacity:
            self._reallocate(w, st, capacity)
        residual = st["residual"]
        inner_state = self._state.get(residual)
        if inner_state:
            self._apply_state_policy(inner_state, residual.numel(), old_support, old_n, support, n)
        st["support"] = support
        self._support_size[w] = n
        residual.zero_()
        if "anchor" in st:
            st["anchor"].zero_()
            st["anchor"][:n] = _local(w).view(-1)[support[:n].long()]

    def _reallocate(self, w: torch.Tensor, st: dict, capacity: int) -> None:
        old = st.get("residual")
        residual = torch.zeros(capacity, dtype=torch.float32, device=w.device)
        if old is not None:
            inner_state = self._state.pop(old, {})
            for key, value in inner_state.items():
                if torch.is_tensor(value) and value.shape == old.shape:
                    grown = value.new_zeros(capacity)
                    m = min(capacity, old.numel())
                    grown[:m] = value[:m]
                    inner_state[key] = grown
            if inner_state:
                self._state[residual] = inner_state
        st["residual"] = residual
        if w.element_size() < 4:
            st["anchor"] = torch.zeros(capacity, dtype=w.dtype, device=w.device)

    def _apply_state_policy(self, inner_state: dict, capacity: int, old_support, old_n, support, n) -> None:
        """Carry the inner state of the residual across a redraw (see ``state_policy``)."""
        policy = self._state_policy
        if policy == "reset" or old_support is None:
            inner_state.clear()
            return
        per_element = [k for k, v in inner_state.items() if torch.is_tensor(v) and v.numel() == capacity and v.dim() == 1]
        if policy == "carry":
            for k in per_element:
                inner_state[k][n:] = 0
            return
        # remap: state follows the coordinates present in both supports.
        old = old_support[:old_n].long()
        new = support[:n].long()
        pos = torch.searchsorted(old, new).clamp_(max=max(old_n - 1, 0))
        found = old[pos] == new if old_n else torch.zeros_like(new, dtype=torch.bool)
        for k in per_element:
            value = inner_state[k]
            carried = torch.where(found, value[pos], torch.zeros((), dtype=value.dtype, device=value.device))
            value.zero_()
            value[:n] = carried

    def _merge_coefficient(self, group: dict) -> float:
        lam, keep = group["ema_decay"], 1.0 - group["p"]
        return (1.0 - lam) / keep if self._merge == "ema" else (1.0 - lam)

    def _end_episode(self, w: torch.Tensor, st: dict, group: dict, coeff: float | None = None) -> None:
        """Merge the residual into the anchor and write ``W = A`` on the support."""
        n = self._support_size[w]
        kernels.merge_episode(_local(w).view(-1), st["support"], n, st["residual"], st.get("anchor"),
                              1.0 - group["p"], self._merge_coefficient(group) if coeff is None else coeff)

    def _gmixout_tensors(self):
        for gi, group in enumerate(self.param_groups):
            if not group["gmixout"]:
                continue
            for i, w in enumerate(group["params"]):
                st = self._state.get(w)
                if st and "support" in st:
                    yield w, st, group

    @torch.no_grad()
    def consolidate(self) -> None:
        """End every running episode now: merge, ``W = A``, and drop all compact state.

        The next step starts the next episode with a fresh support. What is left per
        tensor is two counters, so the checkpoint loads on any sharding/world size.
        """
        self._close_episodes(merge_running=True)

    @torch.no_grad()
    def finalize(self, merge_running: bool = True) -> None:
        """Leave the parameters holding exactly the anchor: a plain dense model.

        ``merge_running=True`` merges the unfinished episode (a shortened last episode);
        ``False`` discards it, as the authors' code does.
        """
        self._close_episodes(merge_running)

    def _close_episodes(self, merge_running: bool) -> None:
        for w, st, group in list(self._gmixout_tensors()):
            self._end_episode(w, st, group, coeff=None if merge_running else 0.0)
            self._state.pop(st["residual"], None)
            for key in COMPACT_KEYS:
                st.pop(key, None)
            self._support_size.pop(w, None)
            st["episode"] += 1
            st["episode_step"] = 0

    @contextmanager
    def anchor_weights(self):
        """Within the block the parameters hold the anchor; the training weights come back bitwise."""
        saved = []
        with torch.no_grad():
            for w, st, group in list(self._gmixout_tensors()):
                idx = st["support"][: self._support_size[w]].long()
                saved.append((w, idx, _local(w).view(-1)[idx].clone()))
                self._end_episode(w, st, group, coeff=0.0)
        try:
            yield self
        finally:
            with torch.no_grad():
                for w, idx, values in saved:
                    _local(w).view(-1).index_copy_(0, idx, values)

    # -- checkpoints -------------------------------------------------------------------

    def _config(self) -> dict:
        return {"format": STATE_FORMAT, "merge": self._merge, "state_policy": self._state_policy,
                "seed": self._seed, "inner": type(self._inner).__name__}

    def state_dict(self) -> dict[str, Any]:
        """Torch's layout (state keyed by position in ``param_groups``) plus a ``gmixout`` block.

        A GMixout tensor's entry holds ``episode``, ``episode_step``, ``segments`` and,
        inside an episode, ``support``/``residual`` (``anchor`` for 16-bit tensors) and the
        inner optimizer's state of the residual under ``inner``.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        packed_groups, state, index = [], {}, 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(index, index + len(group["params"])))
            for w, pid in zip(group["params"], packed["params"]):
                st = self._state.get(w)
                if not st:
                    continue
                if group["gmixout"]:
                    entry = {k: v for k, v in st.items() if k != "segments"}
                    entry["segments"] = [list(s) for s in st["segments"]]
                    if "residual" in st:
                        entry["inner"] = dict(self._state.get(st["residual"], {}))
                    state[pid] = entry
                else:
                    state[pid] = dict(st)
            index += len(group["params"])
            packed_groups.append(packed)
        state_dict = {"state": state, "param_groups": packed_groups, "gmixout": self._config()}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; tensors are copied, keeping their dtypes (indices stay integers)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_compatible(state_dict)
        saved_groups = state_dict["param_groups"]
        id_to_param = {}
        for group, saved in zip(self.param_groups, saved_groups):
            id_to_param.update((pid, (w, group)) for pid, w in zip(saved["params"], group["params"]))
        self.state = defaultdict(dict)  # the setter shares it with the inner optimizer
        self._support_size = {}
        for pid, entry in state_dict["state"].items():
            if pid not in id_to_param:
                raise ValueError(f"state_dict has state for parameter id {pid}, which no param group lists")
            w, group = id_to_param[pid]
            if group["gmixout"]:
                self._load_gmixout_entry(w, entry, group)
            else:
                self._state[w] = {k: _to_like(v, w, k, group) for k, v in entry.items()}
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_gmixout_entry(self, w: torch.Tensor, entry: dict, group: dict) -> None:
        st = {"episode": int(entry["episode"]), "episode_step": int(entry["episode_step"]),
              "segments": [Segment(*map(int, s)) for s in entry["segments"]]}
        if "support" in entry:
            support = entry["support"]
            if support.is_floating_point():
                raise ValueError(f"state_dict holds support indices of dtype {support.dtype}; "
                                 "they must be integers (was it cast by a generic loader?)")
            n_saved = int((support >= 0).sum())
            numel = _local(w).numel()
            capacity = support_capacity(numel, 1.0 - group["p"])
            fits = support.numel() == capacity or support.numel() == n_saved > capacity
            if not fits or (n_saved and int(support[:n_saved].max()) >= numel):
                raise ValueError(
                    f"state_dict holds a support of {support.numel()} slots ({n_saved} used) for a tensor of "
                    f"{numel} elements, whose capacity is {capacity}: was it saved from another model?")
            st["support"] = support.to(device=w.device, copy=True)
            st["residual"] = entry["residual"].to(device=w.device, dtype=torch.float32, copy=True)
            if "anchor" in entry:
                st["anchor"] = entry["anchor"].to(device=w.device, dtype=w.dtype, copy=True)
            self._support_size[w] = n_saved
            inner = entry.get("inner", {})
            if inner:
                self._state[st["residual"]] = {k: _to_like(v, st["residual"], k, group) for k, v in inner.items()}
        self._state[w] = st

    def _check_compatible(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "gmixout" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"not a GMixoutOptimizer state_dict (top-level keys: {keys})")
        saved, mine = state_dict["gmixout"], self._config()
        for key in mine:
            if saved.get(key) != mine[key]:
                raise ValueError(f"state_dict was saved with {key}={saved.get(key)!r}, "
                                 f"this optimizer has {key}={mine[key]!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"param group {gi}: state_dict has {len(saved['params'])} parameters, "
                                 f"this optimizer has {len(group['params'])}")
            for key in GROUP_KEYS:
                if saved.get(key) != group[key]:
                    raise ValueError(f"param group {gi} was saved with {key}={saved.get(key)!r}, "
                                     f"this optimizer has {key}={group[key]!r}")

    def __repr__(self) -> str:
        return (f"GMixoutOptimizer(inner={type(self._inner).__name__}, p={self.defaults['p']}, "
                f"ema_decay={self.defaults['ema_decay']}, resample_every={self.defaults['resample_every']}, "
                f"merge={self._merge!r}, state_policy={self._state_policy!r}, seed={self._seed})")


def _to_like(value: Any, like: torch.Tensor, key: str, group: dict) -> Any:
    """Copy a loaded state value next to ``like`` as torch's loader would, but never cast integers.

    Floating values take ``like``'s dtype and device; ``step`` stays where it was saved
    unless the group is fused or capturable (then it lives on ``like``'s device, fp32).
    """
    if not torch.is_tensor(value):
        return value
    if key == "step":
        if group.get("fused") or group.get("capturable"):
            return value.to(dtype=torch.float32, device=like.device, copy=True)
        return value.clone()
    if not value.is_floating_point():
        return value.to(device=like.device, copy=True)
    return value.to(device=like.device, dtype=like.dtype, copy=True)
