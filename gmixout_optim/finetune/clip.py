"""CLIP and timm ViT classifiers, built offline: weights only ever come from a local file.

CLIP zero-shot head (Radford et al. 2021, as in WiSE-FT): for class ``c`` and prompts
``t_1..t_T`` (the templates filled with the class name), with ``g`` the text tower and ``f``
the image tower,

    e_c = mean_j g(t_j) / ||g(t_j)||,     w_c = e_c / ||e_c||,
    logits(x) = s * W f(x) / ||f(x)||,    s = exp(logit_scale),  rows of W = w_c.

``CLIPClassifier`` holds the image tower (``.visual``) and a Linear ``.head`` with weight
``s * W`` and bias 0 on the normalised image features, so fine-tuning starts exactly at CLIP's
zero-shot classifier; the text tower is dropped once the head is built.

open_clip and timm are imported lazily (they are optional, ``pip install .[examples]``).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIPClassifier", "build_clip_classifier", "build_timm_vit"]


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


def _weights_file(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights file not found: {path}. Give a local state-dict file "
            f"(.pt / .pth / .bin / .safetensors); nothing is downloaded."
        )
    return path


def _plain_name(name: str, what: str) -> str:
    # "hf-hub:..." or "local-dir:..." would make the libraries fetch configs/weights themselves
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"{what} model name {name!r}: give a registered architecture name "
                         f"(weights come from the local pretrained path)")
    return name


class CLIPClassifier(nn.Module):
    """``logits = head(normalize(visual(x)))``; ``preprocess_cfg`` has CLIP's size/mean/std."""

    def __init__(self, visual: nn.Module, head: nn.Linear, class_names: Sequence[str], preprocess_cfg: dict):
        super().__init__()
        self.visual, self.head = visual, head
        self.class_names = list(class_names)
        self.preprocess_cfg = dict(preprocess_cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(images), dim=-1))

    def transform(self, is_train: bool):
        """open_clip's own image transform for this model (train: random resized crop)."""
        import open_clip

        cfg = self.preprocess_cfg
        return open_clip.image_transform(cfg["size"], is_train=is_train, mean=cfg["mean"], std=cfg["std"],
                                         interpolation=cfg.get("interpolation"),
                                         resize_mode=cfg.get("resize_mode"))


def _check_templates(templates) -> list:
    templates = list(templates)
    if not templates:
        raise ValueError("templates: give at least one prompt template")
    kinds = {isinstance(t, str) for t in templates}
    if len(kinds) != 1 or (kinds == {False} and not all(callable(t) for t in templates)):
        raise ValueError("templates: all format strings with '{}' or all callables name -> prompt")
    bad = [t for t in templates if isinstance(t, str) and "{}" not in t]
    if bad:
        raise ValueError(f"templates {bad[:3]} have no '{{}}' for the class name")
    return templates


def build_clip_classifier(
    name: str,
    pretrained_path: Optional[Union[str, Path]],
    class_names: Sequence[str],
    device: Union[str, torch.device] = "cpu",
    templates: Optional[Sequence[Union[str, Callable[[str], str]]]] = None,
    zero_shot: bool = True,
) -> CLIPClassifier:
    """open_clip image tower + a zero-shot-initialised linear head (math in the module docstring).

    ``name``: an open_clip architecture (``open_clip.list_models()``, or one registered with
    ``open_clip.add_model_config``). ``pretrained_path``: a local CLIP checkpoint of that
    architecture (both towers; loaded with ``open_clip.load_checkpoint``, strict), or None for
    random init (tests). ``templates``: format strings with ``{}`` or callables; default CLIP's
    80 ImageNet templates. ``zero_shot=False`` skips the text tower and leaves the head at zero
    (for loading a fine-tuned classifier's state dict afterwards).
    """
    import open_clip

    _plain_name(name, "open_clip")
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip model {name!r}; known: open_clip.list_models(), "
                         f"or register a config with open_clip.add_model_config(path)")
    class_names = list(class_names)
    if not class_names or not all(isinstance(c, str) and c for c in class_names):
        raise ValueError(f"class_names must be a non-empty list of non-empty strings, got {class_names[:5]!r}")
    templates = _check_templates(open_clip.OPENAI_IMAGENET_TEMPLATES if templates is None else templates)
    path = None if pretrained_path is None else _weights_file(pretrained_path, f"CLIP {name}")

    # pretrained=None and pretrained_text=False: open_clip builds the architecture only. Its
    # "initialized randomly" warning (root logger) would be wrong when a checkpoint follows.
    quiet = _DropMessage("No pretrained weights loaded")
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(name, pretrained=None, pretrained_text=False, device="cpu")
    finally:
        logging.getLogger().removeFilter(quiet)
    if path is not None:
        try:
            open_clip.load_checkpoint(model, str(path), strict=True)
        except (RuntimeError, KeyError) as e:
            raise RuntimeError(f"{path} is not a state dict of open_clip model {name!r}: {e}") from e
    model = model.to(device).eval()

    dim = model.visual.output_dim
    head = nn.Linear(dim, len(class_names), device=device)
    with torch.no_grad():
        if zero_shot:
            weights = open_clip.build_zero_shot_classifier(
                model, open_clip.get_tokenizer(name), class_names, templates, device=device
            )  # (dim, classes), columns = w_c
            scale = model.logit_scale.detach().exp().reshape(-1)[0]
            head.weight.copy_(scale * weights.T)
        else:
            head.weight.zero_()
        head.bias.zero_()
    visual = model.visual
    return CLIPClassifier(visual, head, class_names, visual.preprocess_cfg).train()


def build_timm_vit(
    name: str,
    pretrained_path: Optional[Union[str, Path]],
    num_classes: int,
    **model_kwargs,
) -> nn.Module:
    """timm model ``name`` with a new ``num_classes`` head; backbone from a local checkpoint.

    Built with random init (``pretrained=False``); if ``pretrained_path`` is given its state
    dict is read with timm's ``load_state_dict`` (plain / ``state_dict`` / EMA / safetensors),
    passed through the model family's ``checkpoint_filter_fn`` when it has one (position
    embedding resampling, CLIP-format conversion), its classifier dropped, and loaded: every
    backbone tensor must be present and match (ValueError naming the keys otherwise). The new
    head keeps timm's initialisation. ``model_kwargs`` go to ``timm.create_model``
    (e.g. ``img_size``, ``drop_path_rate``).
    """
    import timm

    _plain_name(name, "timm")
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models('vit_*')")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    path = None if pretrained_path is None else _weights_file(pretrained_path, f"timm {name}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    if path is None:
        return model

    state = timm.models.load_state_dict(str(path))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    heads = model.pretrained_cfg.get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    state = {k: v for k, v in state.items() if not is_head(k)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise ValueError(f"{path} does not fit timm {name!r}: {e}") from e
    missing = [k for k in result.missing_keys if not is_head(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not fit timm {name!r}: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})")
    return model
