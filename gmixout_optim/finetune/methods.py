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
- ``random_mask``: Random Masking (sparse fine-tuning on one fixed random mask): the same
  optimizer and parameter groups as ``gmixout`` with ``resample_every`` beyond any step budget
  (one support for the whole run) and ``ema_decay = 0`` (``finalize()`` folds the residual in
  fully, so the deployed weights are exactly the trained ones). Masked weights move as
  ``A + v/(1-p)``: AdamW's weight decay on ``v`` pulls toward the pretrained weights and the
  ``1/(1-p)`` scale is a learning-rate reparametrisation that the lr grid absorbs.
- ``linear_probe``: no gradient steps; the head is fitted by multinomial logistic regression
  (sklearn, L2 strength ``1/lp_c``) on the frozen backbone's features of the whole ID train split,
  after BatchNorm statistics are re-estimated on ID train batches (the same batches the
  harness's ``recalibrate_bn`` draws, so that step leaves them unchanged).
- ``lp_ft``: LP-FT (Kumar et al. 2022): the linear probe above, then full fine-tuning as ``full_ft``.
- ``zero_shot``: no training at all: the pretrained model with its head mapped from the
  pretrained classes (``model_kwargs: {imagenet_head: DATASET}``, a ``clip:`` model, or
  ``efficientnet_lite0_robust``'s own digit head).

Soups and WiSE-FT at a fixed alpha are built after training from ``full_ft`` runs
(``posthoc.py``), not trained.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import hparams

TRAINED = ("full_ft", "ema", "wise_ft", "lora", "mixout", "gmixout", "random_mask", "lp_ft", "linear_probe",
           "zero_shot")
POSTHOC = ("soup_uniform", "soup_greedy", "wise_ft_fixed")  # built from full_ft runs by posthoc.py
METHODS = TRAINED + POSTHOC
# Integer hyperparameters a search grid may give relative to the step budget, as "steps/N".
BUDGET_RELATIVE = ("resample_every",)

# Defaults per method; a config's ``method_params`` overrides them. Shared: lr, weight_decay.
DEFAULTS = {
    "full_ft": {"lr": 1e-3, "weight_decay": 0.05},
    "ema": {"lr": 1e-3, "weight_decay": 0.05, "ema_decay": 0.99},
    "wise_ft": {"lr": 1e-3, "weight_decay": 0.05, "alphas": [0.25, 0.5, 0.75, 1.0]},
    "lora": {"lr": 3e-3, "weight_decay": 0.0, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
             "lora_targets": None},  # None: every Linear and 1x1 Conv2d outside the head (see lora_targets)
    "mixout": {"lr": 1e-3, "weight_decay": 0.05, "p": 0.9},
    "gmixout": {"lr": 1e-3, "weight_decay": 0.05, "p": 0.9, "ema_decay": 0.3, "resample_every": 50},
    "random_mask": {"lr": 1e-3, "weight_decay": 0.05, "p": 0.9},
    "linear_probe": {"lp_c": 1.0},
    "lp_ft": {"lr": 1e-3, "weight_decay": 0.05, "lp_c": 1.0},
    "zero_shot": {},
    "soup_uniform": {}, "soup_greedy": {}, "wise_ft_fixed": {"alpha": 0.5},
}


def resolve_budget(value, steps: int):
    """``"steps/N"`` -> ``max(1, round(steps / N))``; any other value unchanged.

    Lets a grid say GMixout's episode length relative to the step budget (k in {steps/60,
    steps/20, steps/6}), so a config run at another budget keeps the same number of episodes.
    """
    if not isinstance(value, str):
        return value
    head, _, den = value.partition("/")
    if head.strip() != "steps" or not den.strip().isdigit() or int(den) < 1:
        raise ValueError(f"{value!r}: a budget-relative value must read 'steps/N' with N a positive integer")
    return max(1, round(steps / int(den)))


def resolve_grid(search: dict, steps: int) -> dict:
    """A copy of a config's ``search`` with every ``steps/N`` of ``BUDGET_RELATIVE`` keys made an int."""
    out = {}
    for m, grid in search.items():
        out[m] = {}
        for k, values in grid.items():
            if any(isinstance(v, str) for v in values) and k not in BUDGET_RELATIVE:
                raise ValueError(f"search.{m}.{k}: only {', '.join(BUDGET_RELATIVE)} may be given as 'steps/N', "
                                 f"got {values!r}")
            out[m][k] = [resolve_budget(v, steps) for v in values] if isinstance(values, list) else values
    return out


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
    trains = True  # False: the harness runs no gradient step (zero_shot, linear_probe)

    def __init__(self, hp: dict, seed: int = 0):
        self.hp, self.seed, self.extra = hp, seed, {}

    def prepare(self, model: nn.Module, tools) -> None:
        """Before ``setup``: a stage on the plain model (LP-FT's probe). ``tools`` as in ``finish``."""

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

    def _episode(self):
        """(ema_decay, resample_every) of the optimizer."""
        return self.hp["ema_decay"], self.hp["resample_every"]

    def make_optimizer(self, model):
        from gmixout_optim import GMixoutOptimizer, gmixout_param_groups

        hp = self.hp
        ema_decay, k = self._episode()
        groups = gmixout_param_groups(model, weight_decay=hp["weight_decay"], p=hp["p"], head_names=self.head_names)
        self.optimizer = GMixoutOptimizer(groups, inner="AdamW", lr=hp["lr"], p=hp["p"], ema_decay=ema_decay,
                                          resample_every=k, seed=self.seed)
        return self.optimizer

    def finish(self, model, tools):
        self.optimizer.finalize()
        return model


# Longer than any step budget: Random Masking's single support is never redrawn.
ONE_EPISODE = 2**31 - 1


class RandomMaskMethod(GMixoutMethod):
    name = "random_mask"

    def _episode(self):
        return 0.0, ONE_EPISODE  # ema_decay 0: finalize() leaves exactly the trained weights


class _NoSteps(Method):
    """Methods without gradient steps: an optimizer with no state, so ``state_bytes`` is 0."""

    trains = False

    def make_optimizer(self, model):
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        return self.optimizer


class ZeroShotMethod(_NoSteps):
    name = "zero_shot"

    def prepare(self, model, tools):
        if not getattr(model, "head_init", "").startswith(("imagenet:", "clip_zero_shot", "pretrained:")):
            raise ValueError("method 'zero_shot' needs a head mapped from the pretrained classes: set "
                             "model_kwargs: {imagenet_head: DATASET} (efficientnet_lite0), use a clip: model "
                             "or efficientnet_lite0_robust; "
                             f"this model's head is {getattr(model, 'head_init', 'new (random)')!r}")


def head_features(model: nn.Module, head_name: str, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The inputs of the head module for images ``x`` (eval mode, no grad): the probe's features."""
    head = model.get_submodule(head_name)
    got = []
    hook = head.register_forward_hook(lambda m, inp, out: got.append(inp[0].detach().flatten(1).cpu()))
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(got)


def fit_linear_probe(model: nn.Module, head_name: str, x: torch.Tensor, y: torch.Tensor, c: float,
                     feats=None) -> dict:
    """Fit the head (an ``nn.Linear``) by L2-regularised multinomial logistic regression on frozen features.

    ``feats``: the head's inputs for ``x`` if already computed (``head_features``).
    """
    from sklearn.linear_model import LogisticRegression

    head = model.get_submodule(head_name)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"linear probe: head {head_name!r} is a {type(head).__name__}, not nn.Linear")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
        raise ValueError(f"lp_c must be > 0 (inverse L2 strength), got {c!r}")
    feats = (head_features(model, head_name, x) if feats is None else feats).double().numpy()
    labels = y.numpy()
    if len(set(labels.tolist())) != head.out_features:
        raise ValueError(f"linear probe: the training split has {len(set(labels.tolist()))} classes, "
                         f"the head {head.out_features}")
    clf = LogisticRegression(C=float(c), max_iter=3000, tol=1e-6).fit(feats, labels)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(clf.coef_, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(clf.intercept_, dtype=head.bias.dtype))
    return {"lp_train_acc": float(clf.score(feats, labels)), "lp_iterations": int(clf.n_iter_.max())}


def _probe(method: Method, model: nn.Module, tools) -> None:
    """Re-estimate BN on ID train, then fit the head on the frozen features of the whole ID train split."""
    b = tools.train_batches
    if not hasattr(b, "x"):
        raise ValueError(f"method {method.name!r} needs the ID train split in memory (an embedded data set), "
                         f"not {type(b).__name__}")
    if not method.head_names:
        raise ValueError(f"method {method.name!r}: make_method(..., head_names=...) must name the head to probe")
    from .data import TensorBatches

    # A fresh stream with the run's seed: the training batches stay untouched (same data order as
    # full_ft), and these are the batches that train.recalibrate_bn draws after training, so the
    # statistics the probe was fitted under are the ones deployed.
    fresh = TensorBatches(b.x, b.y, b.batch_size, method.seed, b.augment)
    type(tools)(tools.val_accuracy, fresh, tools.bn_batches).recalibrate_bn(model)
    cs = method.hp["lp_c"] if isinstance(method.hp["lp_c"], (list, tuple)) else [method.hp["lp_c"]]
    if not cs:
        raise ValueError(f"method {method.name!r}: lp_c must be a number or a non-empty list of numbers")
    feats = head_features(model, method.head_names[0], b.x)  # once for every C
    head = model.get_submodule(method.head_names[0])
    best = None
    for c in cs:  # several C: the one with the best ID-val accuracy (ties: the first), like WiSE's alpha
        info = fit_linear_probe(model, method.head_names[0], b.x, b.y, c, feats=feats)
        val = tools.val_accuracy(model)
        method.extra.setdefault("lp_val_by_c", {})[str(c)] = val
        if best is None or val > best[0]:
            best = (val, c, info, copy.deepcopy(head.state_dict()))
    val, c, info, state = best
    head.load_state_dict(state)
    method.extra.update(info, lp_val=val, lp_c=c)


class LinearProbeMethod(_NoSteps):
    name = "linear_probe"

    def prepare(self, model, tools):
        _probe(self, model, tools)


class LPFTMethod(Method):
    name = "lp_ft"

    def prepare(self, model, tools):
        _probe(self, model, tools)


_CLASSES = {c.name: c for c in (Method, EMAMethod, WiSEMethod, LoRAMethod, MixoutMethod, GMixoutMethod,
                                RandomMaskMethod, ZeroShotMethod, LinearProbeMethod, LPFTMethod)}


def make_method(name: str, overrides: dict | None = None, seed: int = 0, head_names=None) -> Method:
    """Instantiate a method by name with its hyperparameters (defaults + ``overrides``).

    ``head_names`` (the model's head modules) lets ``prepare`` run before ``setup``.
    """
    hp = method_params(name, overrides)  # validates the name first
    if name not in _CLASSES:
        raise ValueError(f"method {name!r} is built after training from full_ft runs (posthoc.py), not trained")
    m = _CLASSES[name](hp, seed)
    m.head_names = list(head_names or [])
    return m
