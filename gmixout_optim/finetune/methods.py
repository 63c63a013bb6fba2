"""The fine-tuning methods compared, behind one small interface (``Method``).

Every method starts from the same pretrained backbone and head, trains with the same data,
batches, step budget and learning-rate schedule, and ends with a *plain* model (same
architecture as the input, no wrappers) that is saved and evaluated.

- ``full_ft``: AdamW on all weights.
- ``ema``: full FT; evaluates an exponential moving average of the weights (and buffers),
  ``E <- d * E + (1 - d) * W`` after every step.
- ``wise_ft``: full FT, then ``W(alpha) = (1 - alpha) * W_pre + alpha * W_ft`` (Wortsman et
  al. 2022). The new head has no pretrained value, so it is taken from ``W_ft`` for every alpha;
  BatchNorm statistics are re-estimated on ID training batches after interpolation. ``alpha``
  is picked on the ID validation split from ``alphas`` and reported.
- ``lora``: peft LoRA (rank ``lora_r``) on the modules named in ``lora_targets`` (default:
  every Linear and 1x1 Conv2d outside the head); the head trains fully; merged at the end.
- ``mixout``: original Mixout (Lee et al. 2020) via ``gmixout_optim.reference.MixoutReference``:
  ``W = u + M * (w - u) / (1 - p)``, ``u`` the pretrained weights, ``M ~ Bernoulli(1-p)`` drawn
  every forward; the plain model holds ``w``.
- ``gmixout``: ``GMixoutOptimizer`` over ``gmixout_param_groups`` (sparse residual on a support
  of density ``1 - p`` redrawn every ``resample_every`` steps, merged into an EMA anchor with
  ``ema_decay``); ``finalize()`` at the end leaves the anchor in the parameters.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import hparams

METHODS = ("full_ft", "ema", "wise_ft", "lora", "mixout", "gmixout")

# Defaults per method; a config's ``method_params`` overrides them. Shared: lr, weight_decay.
DEFAULTS = {
    "full_ft": {"lr": 1e-3, "weight_decay": 0.05},
    "ema": {"lr": 1e-3, "weight_decay": 0.05, "ema_decay": 0.99},
    "wise_ft": {"lr": 1e-3, "weight_decay": 0.05, "alphas": [0.25, 0.5, 0.75, 1.0]},
    "lora": {"lr": 3e-3, "weight_decay": 0.0, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
             "lora_targets": None},  # None: every Linear and 1x1 Conv2d outside the head (see lora_targets)
    "mixout": {"lr": 1e-3, "weight_decay": 0.05, "p": 0.9},
    "gmixout": {"lr": 1e-3, "weight_decay": 0.05, "p": 0.9, "ema_decay": 0.3, "resample_every": 50},
}


def tensor_bytes(obj) -> int:
    """Bytes held by all tensors inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def method_params(name: str, overrides: dict | None = None) -> dict:
    """Defaults of ``name`` updated with ``overrides``; unknown keys are an error."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    hp = copy.deepcopy(DEFAULTS[name])
    for k, v in (overrides or {}).items():
        if k not in hp:
            raise ValueError(f"method {name!r} has no parameter {k!r}; allowed: {', '.join(sorted(hp))}")
        hp[k] = v
    if name == "gmixout":  # GMixout's own keys go through the one table, before any run starts
        hparams.check_kwargs(hp, " (method gmixout)", names=hparams.HPARAMS)
    return hp


def _adamw_groups(model: nn.Module, weight_decay: float) -> list:
    """No weight decay on biases and 1-D tensors (norm scales), as usual for AdamW."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Method:
    """Full fine-tuning with AdamW; the base that the other methods change in one place each."""

    name = "full_ft"

    def __init__(self, hp: dict, seed: int = 0):
        self.hp, self.seed, self.extra = hp, seed, {}

    def setup(self, model: nn.Module, head_names: list) -> nn.Module:
        """Return the module to train (may wrap ``model``)."""
        self.head_names = list(head_names)
        self.pretrained = copy.deepcopy(model.state_dict())
        return model

    def make_optimizer(self, model: nn.Module):
        self.optimizer = torch.optim.AdamW(_adamw_groups(model, self.hp["weight_decay"]), lr=self.hp["lr"])
        return self.optimizer

    def after_step(self, model: nn.Module) -> None:
        pass

    def finish(self, model: nn.Module, tools) -> nn.Module:
        """The plain fine-tuned model. ``tools`` offers ``val_accuracy(model)`` and ``recalibrate_bn(model)``."""
        return model

    def state_bytes(self) -> int:
        """Optimizer state plus any per-method copies of the weights kept for training."""
        return tensor_bytes(self.optimizer.state_dict()["state"])


class EMAMethod(Method):
    name = "ema"

    def setup(self, model, head_names):
        model = super().setup(model, head_names)
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    @torch.no_grad()
    def after_step(self, model):
        d = self.hp["ema_decay"]
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].lerp_(v, 1.0 - d)
            else:
                self.ema[k].copy_(v)

    def finish(self, model, tools):
        model.load_state_dict(self.ema)
        return model

    def state_bytes(self):
        return super().state_bytes() + tensor_bytes(self.ema)


class WiSEMethod(Method):
    name = "wise_ft"

    @torch.no_grad()
    def finish(self, model, tools):
        finetuned = copy.deepcopy(model.state_dict())
        scores = {}
        for alpha in self.hp["alphas"]:
            self._interpolate(model, finetuned, alpha)
            if alpha < 1.0:  # interpolated weights have no matching BN statistics
                tools.recalibrate_bn(model)
            scores[float(alpha)] = tools.val_accuracy(model)
        best = max(scores, key=lambda a: (scores[a], a))  # ties: the larger alpha
        self._interpolate(model, finetuned, best)
        if best < 1.0:
            tools.recalibrate_bn(model)
        self.extra = {"wise_alpha": best, "wise_val_by_alpha": scores}
        return model

    def _interpolate(self, model, finetuned, alpha):
        mixed = {}
        for k, v in finetuned.items():
            pre = self.pretrained[k]
            if v.dtype.is_floating_point and pre.shape == v.shape and not self._is_head(k):
                mixed[k] = torch.lerp(pre.to(v.dtype), v, alpha)
            else:
                mixed[k] = v
        model.load_state_dict(mixed)

    def _is_head(self, key):
        return any(key == h or key.startswith(h + ".") for h in self.head_names)


def lora_targets(model: nn.Module, head_names) -> list:
    """Module names for LoRA: Linear and 1x1 (non-grouped) Conv2d layers outside the head.

    On EfficientNet-Lite0 these are the pointwise convolutions (``conv_pw``, ``conv_pwl``) and
    ``conv_head``; on ViTs ``qkv``, ``proj``, ``fc1``, ``fc2``. The output projection inside
    ``nn.MultiheadAttention`` is skipped: that module reads its weight directly, so a LoRA
    wrapper there would never run.
    """
    heads = [h.rstrip(".") for h in head_names]
    mha_children = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                    for c, _ in m.named_children()}
    out = []
    for name, m in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in heads) or name in mha_children:
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1):
            out.append(name)
    if not out:
        raise ValueError(f"{type(model).__name__} has no Linear or 1x1 Conv2d layer outside {heads} for LoRA")
    return out


class LoRAMethod(Method):
    name = "lora"

    def setup(self, model, head_names):
        from peft import LoraConfig, get_peft_model

        super().setup(model, head_names)
        cfg = LoraConfig(r=self.hp["lora_r"], lora_alpha=self.hp["lora_alpha"],
                         lora_dropout=self.hp["lora_dropout"],
                         target_modules=list(self.hp["lora_targets"] or lora_targets(model, head_names)),
                         modules_to_save=list(head_names))
        torch.manual_seed(self.seed)  # LoRA's A matrices are drawn here
        return get_peft_model(model, cfg)

    def finish(self, model, tools):
        return model.merge_and_unload()


class MixoutMethod(Method):
    name = "mixout"

    def setup(self, model, head_names):
        from gmixout_optim.reference import MixoutReference, gmixout_parameter_names

        super().setup(model, head_names)
        # Same tensors as GMixout's sparse group (Linear/Conv weights outside the head).
        names = gmixout_parameter_names(model, head_names=list(head_names))
        self.mixout = MixoutReference(model, names=names, p=self.hp["p"], seed=self.seed)
        return self.mixout

    def finish(self, model, tools):
        return self.mixout.model  # holds w: Mixout evaluates on the trained weights

    def state_bytes(self):
        return super().state_bytes() + tensor_bytes(self.mixout.pretrained)


class GMixoutMethod(Method):
    name = "gmixout"

    def make_optimizer(self, model):
        from gmixout_optim import GMixoutOptimizer, gmixout_param_groups

        hp = self.hp
        groups = gmixout_param_groups(model, weight_decay=hp["weight_decay"], p=hp["p"], head_names=self.head_names)
        self.optimizer = GMixoutOptimizer(groups, inner="AdamW", lr=hp["lr"], p=hp["p"], ema_decay=hp["ema_decay"],
                                          resample_every=hp["resample_every"], seed=self.seed)
        return self.optimizer

    def finish(self, model, tools):
        self.optimizer.finalize()
        return model


_CLASSES = {c.name: c for c in (Method, EMAMethod, WiSEMethod, LoRAMethod, MixoutMethod, GMixoutMethod)}


def make_method(name: str, overrides: dict | None = None, seed: int = 0) -> Method:
    """Instantiate a method by name with its hyperparameters (defaults + ``overrides``)."""
    hp = method_params(name, overrides)  # validates the name first
    return _CLASSES[name](hp, seed)
