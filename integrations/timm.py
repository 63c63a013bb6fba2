"""GMixout in timm's optimizer factory: ``create_optimizer_v2(model, opt="gmixout", ...)``.

Call :func:`register` once (explicitly: importing this module changes nothing), then::

    import timm.optim
    opt = timm.optim.create_optimizer_v2(model, opt="gmixout", lr=1e-4, weight_decay=0.05,
                                         layer_decay=0.75, p=0.9, ema_decay=0.3, resample_every=50)

returns a :class:`~gmixout_optim.GMixoutOptimizer` (AdamW inside; ``opt="gmixout_sgd"``:
SGD inside, with timm's ``sgd`` defaults: momentum 0.9, Nesterov). timm builds its param
groups first (weight decay off for 1-D tensors and the model's ``no_weight_decay()``;
per-layer ``lr_scale`` with ``layer_decay``); each of its groups is then split into a
GMixout part (the tensors :func:`~gmixout_optim.gmixout_param_groups` trains with GMixout:
Linear/Conv weights outside the head) and a dense part, both keeping the group's
``weight_decay``, ``lr_scale`` and other keys. timm's schedulers apply ``lr_scale`` as for
any timm optimizer. ``p``, ``ema_decay``, ``resample_every``, ``merge``, ``state_policy``,
``seed`` and ``skip_nonfinite`` go to GMixout and are checked by
:mod:`gmixout_optim.hparams`; every other keyword goes to the inner optimizer, which
refuses what it does not know, exactly as ``GMixoutOptimizer(...)`` does. ``head_names=``
overrides the head that stays dense (timm models name theirs via ``get_classifier()``).

How it plugs in (tested with timm 1.0.31). The documented route is
``OptimizerRegistry.register(OptimInfo(...))``; :func:`register` adds ``gmixout`` and
``gmixoutsgd`` there, copying the flags and defaults of timm's ``adamw`` and ``sgd``. Two
things that route cannot do need ONE more change, made on timm's ``default_registry``
instance only (its ``create_optimizer`` attribute, the method every ``create_optimizer_v2``
call goes through) and undone by :func:`unregister`:

* timm builds the param groups before it calls the optimizer class, so the class never sees
  the model; the wrapper computes the GMixout tensors from the model and hands them on;
* timm's name parser keeps only the text after the last ``_`` (``"gmixout_sgd"`` would be
  plain ``"sgd"``), so the wrapper maps ``gmixout_sgd`` to ``gmixoutsgd`` first.

Every other optimizer name passes through the wrapper untouched.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
from torch import nn

from gmixout_optim import GMixoutOptimizer, gmixout_param_groups, hparams

__all__ = ["NAMES", "TESTED_TIMM", "register", "unregister", "is_registered", "split_param_groups"]

TESTED_TIMM = "1.0.31"
# registry key -> the timm optimizer whose class (the inner optimizer), flags and defaults it takes
_INNER = {"gmixout": "adamw", "gmixoutsgd": "sgd"}
# what users may pass as opt= -> registry key (timm's parser cannot see past an underscore)
NAMES = {"gmixout": "gmixout", "gmixoutsgd": "gmixoutsgd", "gmixout_sgd": "gmixoutsgd"}

_infos: dict[str, Any] = {}  # registry key -> the OptimInfo registered by us (identity marks ours)
_wrapper: Callable | None = None  # the create_optimizer wrapper installed on default_registry


def _registry() -> Any:
    """timm's ``default_registry`` (a private name: checked here, where it is used)."""
    try:
        from timm.optim import OptimizerRegistry
        from timm.optim import _optim_factory as factory
    except ImportError as err:
        raise ImportError(f"the timm route needs timm (tested with {TESTED_TIMM}): pip install "
                          f"'gmixout-optim[timm]'") from err
    registry = getattr(factory, "default_registry", None)
    if not isinstance(registry, OptimizerRegistry) or not isinstance(getattr(registry, "_optimizers", None), dict):
        import timm
        raise RuntimeError(f"timm {timm.__version__} has no timm.optim._optim_factory.default_registry with an "
                           f"_optimizers dict; this integration was tested with timm {TESTED_TIMM}")
    return registry


def split_param_groups(params: Iterable, gmixout_tensors: Iterable[torch.Tensor] | None) -> list[dict]:
    """Split each param group into its GMixout part and its dense part, in that order.

    ``params``: tensors or param groups (timm's). Both parts keep every key of their group
    (``weight_decay``, ``lr_scale``, ...); empty parts are left out. A group that already
    says ``"gmixout"`` (e.g. from a ``param_group_fn``) is kept as it is. ``gmixout_tensors``:
    the tensors to train with GMixout; ``None`` is allowed only when every group says
    ``"gmixout"`` (e.g. groups from ``gmixout_param_groups``).
    """
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or param groups, not a tensor")
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    if gmixout_tensors is None:
        if groups and all("gmixout" in g for g in groups):
            return groups
        raise ValueError("the timm 'gmixout' optimizers need to know which tensors GMixout trains: create them with "
                         "timm.optim.create_optimizer_v2(model, opt='gmixout', ...) after "
                         "gmixout_optim.integrations.timm.register(), or pass param groups that all carry a "
                         "'gmixout' key (gmixout_param_groups(model))")
    sparse_ids = {id(t) for t in gmixout_tensors}
    out = []
    for group in groups:
        if "gmixout" in group:  # the caller decided for this group: keep it
            out.append(group)
            continue
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        sparse = [t for t in tensors if id(t) in sparse_ids]
        dense = [t for t in tensors if id(t) not in sparse_ids]
        out += [{**group, "params": part, "gmixout": flag} for part, flag in ((sparse, True), (dense, False)) if part]
    return out


def _factory(key: str, inner: type) -> Callable[..., GMixoutOptimizer]:
    """The callable timm's registry calls as ``opt_class(param_groups, **opt_args)``."""

    def build(params: Iterable, gmixout_tensors: Iterable[torch.Tensor] | None = None,
              **kwargs: Any) -> GMixoutOptimizer:
        ours, inner_kwargs = hparams.split_kwargs(kwargs, where=f" (timm opt={key!r})")
        return GMixoutOptimizer(split_param_groups(params, gmixout_tensors), inner=inner, **ours, **inner_kwargs)

    build.__name__ = build.__qualname__ = f"GMixout_{inner.__name__}"
    build.__doc__ = f"GMixoutOptimizer with {inner.__name__} inside, built from timm's param groups."
    return build


def _make_wrapper(registry: Any) -> Callable:
    original = type(registry).create_optimizer  # the class's method: the instance attribute is ours

    def create_optimizer(model_or_params: Any, opt: str, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        name = opt.lower() if isinstance(opt, str) else opt
        if isinstance(name, str) and name.startswith("lookahead_") and name[len("lookahead_"):] in NAMES:
            raise ValueError(f"opt={opt!r}: timm's Lookahead around GMixout is not supported (GMixout already "
                             "keeps an anchor of the weights); use opt='gmixout' or 'gmixout_sgd'")
        if name not in NAMES:
            return original(registry, model_or_params, opt, *args, **kwargs)
        head_names = kwargs.pop("head_names", None)
        if isinstance(model_or_params, nn.Module):
            groups = gmixout_param_groups(model_or_params, head_names=head_names)
            kwargs["gmixout_tensors"] = [t for g in groups if g["gmixout"] for t in g["params"]]
        elif head_names is not None:
            raise ValueError("head_names needs the model: pass the model to create_optimizer_v2")
        return original(registry, model_or_params, NAMES[name], *args, **kwargs)

    create_optimizer.__doc__ = ("timm's OptimizerRegistry.create_optimizer, with the GMixout names added by "
                                "gmixout_optim.integrations.timm.register() (unregister() removes this wrapper)")
    return create_optimizer


def register() -> list[str]:
    """Add ``gmixout`` and ``gmixout_sgd`` to timm's optimizer factory; returns the names.

    Explicit (nothing happens at import), idempotent, undone by :func:`unregister`. Refuses
    to replace an optimizer of the same name that is not ours, or a ``create_optimizer``
    that someone else already replaced on timm's registry.
    """
    global _wrapper
    import timm.optim

    registry = _registry()
    current = registry.__dict__.get("create_optimizer")
    if current is not None and current is not _wrapper:
        raise RuntimeError(f"timm's default_registry.create_optimizer is already replaced by {current!r}; "
                           "cannot register GMixout on top of it")
    for alias, key in NAMES.items():
        known = registry._optimizers.get(alias)
        if known is not None and known is not _infos.get(key):
            raise ValueError(f"timm already has an optimizer named {alias!r} ({known.opt_class!r}); "
                             "unregister it before registering GMixout")
    for key, base in _INNER.items():
        if key in registry._optimizers:  # ours (checked above): registered before
            continue
        info = timm.optim.get_optimizer_info(base)
        inner = timm.optim.get_optimizer_class(info, bind_defaults=False)
        if not (isinstance(inner, type) and issubclass(inner, torch.optim.Optimizer)):
            raise RuntimeError(f"timm's {base!r} is {inner!r}, not a torch Optimizer class (tested with timm "
                               f"{TESTED_TIMM})")
        _infos[key] = dataclasses.replace(
            info, name=key, opt_class=_factory(key, inner),
            description=f"GMixout (arXiv 2510.06982) around {inner.__name__}, with timm's {base!r} defaults")
        registry.register(_infos[key])
    for alias, key in NAMES.items():
        if alias != key and alias not in registry._optimizers:
            registry.register_alias(alias, key)
    if current is None:
        _wrapper = _make_wrapper(registry)
        registry.create_optimizer = _wrapper
    return sorted(NAMES)


def unregister() -> None:
    """Undo :func:`register` (a no-op for what is not ours)."""
    global _wrapper
    registry = _registry()
    for alias, key in NAMES.items():
        if key in _infos and registry._optimizers.get(alias) is _infos[key]:
            del registry._optimizers[alias]
    if _wrapper is not None and registry.__dict__.get("create_optimizer") is _wrapper:
        del registry.create_optimizer
    _wrapper = None


def is_registered() -> bool:
    """Whether :func:`register` is in effect on timm's default registry."""
    registry = _registry()
    return (_wrapper is not None and registry.__dict__.get("create_optimizer") is _wrapper
            and all(registry._optimizers.get(k) is _infos.get(k) for k in _INNER))
