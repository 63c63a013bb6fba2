"""The model both fine-tuning examples train: a timm model or an open_clip visual tower + a linear head.

``args`` carries the examples' shared flags: ``--model``, ``--open-clip``, ``--model-kwargs``,
``--num-classes`` and ``--checkpoint`` (local weights, loaded non-strictly; nothing is downloaded).
"""
from __future__ import annotations

import json

import torch
from torch import nn


def build_model(args, seed: int) -> nn.Module:
    """Build under ``torch.manual_seed(seed)`` (every rank starts from the same weights)."""
    torch.manual_seed(seed)
    if args.open_clip:
        import open_clip
        visual = open_clip.create_model(args.open_clip, pretrained=None).visual
        model = nn.Sequential()
        model.add_module("visual", visual)
        model.add_module("head", nn.Linear(visual.output_dim, args.num_classes))
    else:
        import timm
        model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes,
                                  **json.loads(args.model_kwargs))
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        print(f"loaded {args.checkpoint}: {len(missing)} missing, {len(unexpected)} unexpected keys")
    return model
