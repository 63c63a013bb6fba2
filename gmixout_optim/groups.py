"""Param groups for GMixout: sparse episodes for the big matrices, dense training for the rest."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["gmixout_param_groups"]

_MATRIX_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_HEAD_NAMES = ("head", "fc", "classifier", "last_linear")


def _head_prefixes(model: nn.Module, head_names: Iterable[str] | None) -> list[str]:
    if head_names is not None:
        return [h.rstrip(".") for h in head_names]
    get_classifier = getattr(model, "get_classifier", None)  # timm models name their head
    if callable(get_classifier):
        head = get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                return [name]
    names = [name for name, _ in model.named_children() if name in _HEAD_NAMES]
    return names


def gmixout_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    *,
    p: float | None = None,
    ema_decay: float | None = None,
    resample_every: int | None = None,
    head_names: Iterable[str] | None = None,
    no_weight_decay_names: Iterable[str] = (),
) -> list[dict]:
    """Split ``model``'s trainable parameters into GMixout and dense param groups.

    GMixout (``"gmixout": True``): the weights of Linear / Conv layers and of attention
    input projections outside the head. Dense (``"gmixout": False``): everything else:
    the head (found by ``head_names``, timm's ``get_classifier()``, or a top-level child
    named head/fc/classifier), embeddings, tokens, norms and biases. Weight decay goes to
    tensors of 2+ dims that are not in ``no_weight_decay_names`` (nor the model's own
    ``no_weight_decay()``, as timm models declare position embeddings and tokens); 1-D
    tensors (biases, norms) get none. ``p``/``ema_decay``/``resample_every`` given here
    become per-group overrides of the GMixout group. Empty groups are left out.
    """
    heads = _head_prefixes(model, head_names)
    skip_decay = set(no_weight_decay_names)
    no_wd = getattr(model, "no_weight_decay", None)
    if callable(no_wd):
        skip_decay |= set(no_wd())
    sparse, dense_decay, dense_no_decay = [], [], []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{local_name}" if module_name else local_name
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            in_head = any(name == h or name.startswith(h + ".") for h in heads)
            is_matrix = (isinstance(module, _MATRIX_MODULES) and local_name == "weight") or (
                isinstance(module, nn.MultiheadAttention) and local_name in _ATTENTION_WEIGHTS)
            decays = param.ndim >= 2 and name not in skip_decay and local_name not in skip_decay
            if is_matrix and not in_head and param.is_floating_point():
                sparse.append(param)
            elif decays:
                dense_decay.append(param)
            else:
                dense_no_decay.append(param)
    overrides = {k: v for k, v in (("p", p), ("ema_decay", ema_decay), ("resample_every", resample_every))
                 if v is not None}
    groups = [
        {"params": sparse, "gmixout": True, "weight_decay": weight_decay, **overrides},
        {"params": dense_decay, "gmixout": False, "weight_decay": weight_decay},
        {"params": dense_no_decay, "gmixout": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
