"""The inner optimizer that GMixout wraps: built from a name, a class or a factory, checked."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["build_inner", "inner_from", "check_inner_class"]


def check_inner_class(cls: type) -> None:
    """Refuse an optimizer that cannot be GMixout's inner optimizer.

    ``torch.optim.Optimizer`` itself has no update rule. An optimizer whose ``step`` needs a
    closure (LBFGS) re-evaluates the loss while it moves its parameters, but GMixout hands it
    the support residuals, which the loss does not read: it would search along a loss that
    never changes.
    """
    if cls is Optimizer:
        raise TypeError("inner=torch.optim.Optimizer is the abstract base class, it has no update rule; "
                        "pass a concrete optimizer, e.g. 'AdamW' or torch.optim.SGD")
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"inner optimizer {cls.__name__} needs a closure in every step (it re-evaluates the loss while it "
            "moves its parameters); GMixout hands it the support residuals, which the loss does not read. "
            "Use a first-order optimizer, e.g. 'AdamW' or 'SGD'")


def build_inner(inner: Any, groups: list[dict], inner_kwargs: dict, wrapper: type) -> Optimizer:
    """Build the inner optimizer from a torch.optim name, an Optimizer class or a factory
    (never ``wrapper``, the GMixout class itself, or a subclass of it)."""
    if isinstance(inner, str):
        cls = getattr(torch.optim, inner, None)
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)) or cls is Optimizer or issubclass(cls, wrapper):
            allowed = sorted(
                n for n, c in vars(torch.optim).items()
                if isinstance(c, type) and issubclass(c, Optimizer) and c is not Optimizer
                and not issubclass(c, wrapper)
            )
            raise ValueError(f"inner={inner!r} is not an optimizer of torch.optim; allowed names: {allowed}")
        inner = cls
    if isinstance(inner, type):
        if not issubclass(inner, Optimizer) or issubclass(inner, wrapper):
            raise TypeError(f"inner must be a torch.optim.Optimizer subclass (not {wrapper.__name__}), got {inner!r}")
        check_inner_class(inner)  # before building: LBFGS also refuses several param groups
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


def inner_from(params: Any, inner: Any, inner_kwargs: dict, wrapper: type) -> Optimizer:
    """The optimizer GMixout wraps: ``params`` itself when it is an optimizer (before its first
    step, with no ``inner`` / kwargs), else one built over ``params`` (default AdamW)."""
    if isinstance(params, Optimizer):
        if isinstance(params, wrapper):
            raise TypeError(f"params is already a {wrapper.__name__}; wrap the inner optimizer once")
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
        inner_opt = build_inner("AdamW" if inner is None else inner, groups, inner_kwargs, wrapper)
    check_inner_class(type(inner_opt))  # a wrapped instance or a factory's product
    return inner_opt
