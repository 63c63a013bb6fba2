"""GMixout in the Hugging Face ``Trainer``: the optimizer for ``Trainer(optimizers=...)`` and a callback.

Two lines (both explicit; importing this module registers nothing, and nothing global
changes: the Trainer has no optimizer registry, so there is nothing to unregister)::

    from gmixout_optim.integrations.transformers import GMixoutCallback, gmixout_optimizers

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      optimizers=gmixout_optimizers(model, args, p=0.9, ema_decay=0.3, resample_every=50),
                      callbacks=[GMixoutCallback()])

What each part does:

* :func:`gmixout_optimizers` returns ``(optimizer, None)``: a :class:`TrainerGMixout`
  (AdamW inside by default) over ``gmixout_param_groups(model, weight_decay=args.weight_decay)``
  with ``args.learning_rate`` and Adam's betas/eps from ``args``; ``None`` lets the Trainer
  build its scheduler from ``args`` as usual. ``args.optim`` is not used.
* Evaluation scores the anchor (the model one would ship): the Trainer calls
  ``optimizer.eval()`` before every evaluation or prediction loop (the hook it has for
  schedule-free optimizers) and :class:`TrainerGMixout` then shows the anchor
  (``anchor_weights()``); :class:`GMixoutCallback` puts the training weights back, bitwise,
  as soon as the evaluation ends (``on_evaluate``), before the checkpoint the Trainer may
  save next, and the Trainer's next ``training_step`` calls ``optimizer.train()`` anyway.
* Checkpoints resume exactly: the Trainer saves ``optimizer.state_dict()`` (episode counters,
  supports, residuals and the inner state; supports come from a counter-based RNG keyed by
  seed and episode, so there is no RNG state to save) to ``optimizer.pt`` and loads it on
  ``train(resume_from_checkpoint=...)``; the model file holds the training weights.
  transformers 5.24 does not load the model weights of such a checkpoint for models it
  renames on load (ViT among them; huggingface/transformers#43701): build the resumed run on
  ``Model.from_pretrained(checkpoint)``. The callback checks, at the start of a resumed run,
  that the model holds the checkpoint's weights, and raises otherwise.
* At the end of ``train()`` the callback calls ``finalize()``: the model holds the merged
  anchor, a plain dense model, which is what ``trainer.save_model()`` writes. A later
  ``train()`` call on the same Trainer starts new episodes from that anchor.

Refused early (clear errors): ``load_best_model_at_end`` (the best checkpoint holds training
weights, not an anchor, and the optimizer's state would not match it), and the Trainer's
DeepSpeed / FSDP modes (use ``gmixout_optim.integrations.deepspeed`` or ``.fsdp``). Tested
with transformers 5.24.0 on CPU.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from gmixout_optim import GMixoutOptimizer, find_gmixout, gmixout_param_groups, hparams

__all__ = ["TESTED_TRANSFORMERS", "TrainerGMixout", "GMixoutCallback", "gmixout_optimizers", "unwrap_optimizer"]

TESTED_TRANSFORMERS = "5.24.0"


class TrainerGMixout(GMixoutOptimizer):
    """``GMixoutOptimizer`` with the ``train()`` / ``eval()`` pair the Trainer calls.

    ``eval()`` makes the parameters hold the anchor (``anchor_weights()``, entered and left
    across calls); ``train()`` puts the training weights back bitwise. Both are idempotent.
    ``step()`` and ``state_dict()`` refuse to run while the anchor is shown: a step would
    train the anchor, and a checkpoint must hold the training weights and their state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchor_view = None  # the open anchor_weights() context while eval() is in effect

    def eval(self) -> None:
        """Show the anchor in the parameters (a no-op when already shown)."""
        if self.anchor_view is None:
            view = self.anchor_weights()
            view.__enter__()
            self.anchor_view = view

    def train(self) -> None:
        """Put the training weights back (a no-op when the anchor is not shown)."""
        view, self.anchor_view = self.anchor_view, None
        if view is not None:
            view.__exit__(None, None, None)

    def step(self, closure: Any = None) -> Any:
        _refuse_in_eval(self, "step()")
        return super().step(closure)

    def state_dict(self) -> dict[str, Any]:
        _refuse_in_eval(self, "state_dict()")
        return super().state_dict()


def _refuse_in_eval(opt: TrainerGMixout, what: str) -> None:
    if opt.anchor_view is not None:
        raise RuntimeError(f"{what} while the parameters hold the anchor (after optimizer.eval()); call "
                           "optimizer.train() first (GMixoutCallback does so when an evaluation ends)")


def unwrap_optimizer(optimizer: Any) -> GMixoutOptimizer:
    """The ``GMixoutOptimizer`` inside what the Trainer holds (Accelerate wraps it):
    :func:`gmixout_optim.find_gmixout`, with the Trainer's hint when there is none."""
    try:
        return find_gmixout(optimizer)
    except TypeError:
        pass
    raise TypeError(f"the Trainer's optimizer is {type(optimizer).__name__}, with no GMixoutOptimizer inside: "
                    "pass optimizers=gmixout_optimizers(model, args, ...) to the Trainer")


def _check_args(args: Any) -> None:
    """Refuse the TrainingArguments this route cannot honour (ValueError naming the setting)."""
    if getattr(args, "load_best_model_at_end", False):
        raise ValueError("load_best_model_at_end=True is not supported with GMixout: the best checkpoint holds "
                         "training weights, not the anchor, and the optimizer's episodes would not match it; "
                         "save the anchor with trainer.save_model() after train() instead")
    if getattr(args, "deepspeed", None):
        raise ValueError("the Trainer's DeepSpeed mode builds its own optimizer; use the DeepSpeed JSON route "
                         "(gmixout_optim.integrations.deepspeed, docs/deepspeed.md)")
    if getattr(args, "fsdp", None):
        raise ValueError("the Trainer's FSDP mode is not supported by this route; use "
                         "gmixout_optim.integrations.fsdp (docs/fsdp.md) or Accelerate (docs/accelerate.md)")


def _check_resumed_weights(args: Any, state: Any, model: nn.Module | None) -> None:
    """Refuse to go on when a resumed run's model does not hold the checkpoint's weights.

    transformers 5.x saves checkpoints with the original-format keys of models it renames
    on load (ViT among them) but ``train(resume_from_checkpoint=...)`` loads that file with
    ``load_state_dict(strict=False)``, which then loads nothing (huggingface/transformers#43701):
    the run would go on from the initial weights, and GMixout's fp32 anchors (derived as
    ``W[S] - v / keep``) with them. Checked for the Trainer's own checkpoint folder
    (``output_dir/checkpoint-<step>/model.safetensors``); other places are not checked.
    """
    if model is None or not state.global_step:
        return
    path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "model.safetensors")
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    own = model.state_dict()
    try:  # the model's keys as save_pretrained writes them (no renaming when the model has none)
        from transformers.core_model_loading import revert_weight_conversion
        saved_keys = revert_weight_conversion(model, dict(own))
    except ImportError:
        saved_keys = own
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            mine = saved_keys.get(key, own.get(key))
            if not isinstance(mine, torch.Tensor):
                continue
            saved = f.get_tensor(key)
            if not torch.equal(saved, mine.detach().to("cpu", saved.dtype)):
                raise RuntimeError(
                    f"resumed from {os.path.dirname(path)} but the model does not hold its weights ({key} differs): "
                    "this transformers version does not load checkpoints of renamed models on resume "
                    "(huggingface/transformers#43701). Load the model with "
                    f"{type(model).__name__}.from_pretrained(<checkpoint folder>) and build the optimizer on it "
                    "before trainer.train(resume_from_checkpoint=...)")


def gmixout_optimizers(model: nn.Module, args: Any, *, inner: Any = "AdamW", head_names: Any = None,
                       weight_decay: float | None = None, **kwargs: Any) -> tuple[TrainerGMixout, None]:
    """``(optimizer, None)`` for ``Trainer(optimizers=...)``.

    ``model``: the model given to the Trainer (on its device already). ``args``: its
    ``TrainingArguments``: ``learning_rate``, ``weight_decay`` (2-D tensors outside the
    model's ``no_weight_decay()``; 1-D tensors get none) and, for Adam/AdamW, ``adam_beta1``,
    ``adam_beta2``, ``adam_epsilon``. ``inner``: the inner optimizer (a ``torch.optim`` name
    or class). ``head_names``: the head that stays dense (see ``gmixout_param_groups``);
    ``weight_decay``: overrides ``args.weight_decay``. ``kwargs``: GMixout's hyperparameters
    (``p``, ``ema_decay``, ``resample_every``, ``merge``, ``state_policy``, ``seed``,
    ``skip_nonfinite``, checked by :mod:`gmixout_optim.hparams`) and the inner optimizer's,
    which override ``args``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module given to the Trainer, got {type(model).__name__}")
    _check_args(args)
    ours, inner_kwargs = hparams.split_kwargs(kwargs, where=" (gmixout_optimizers)")
    defaults: dict[str, Any] = {"lr": args.learning_rate}
    inner_cls = getattr(torch.optim, inner, None) if isinstance(inner, str) else inner
    if isinstance(inner_cls, type) and issubclass(inner_cls, (torch.optim.Adam, torch.optim.AdamW)):
        defaults.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    decay = args.weight_decay if weight_decay is None else weight_decay
    groups = gmixout_param_groups(model, weight_decay=decay, head_names=head_names)
    optimizer = TrainerGMixout(groups, inner=inner, **ours, **{**defaults, **inner_kwargs})
    return optimizer, None


class GMixoutCallback(TrainerCallback):
    """Leaves the anchor view when an evaluation ends and finalizes at the end of ``train()``.

    ``finalize=False`` keeps the training weights and the running episode at the end
    (e.g. to continue with another ``train()`` call exactly); ``merge_running`` is passed to
    ``finalize()`` (False discards the unfinished episode, as the authors' code does).
    """

    def __init__(self, finalize: bool = True, merge_running: bool = True) -> None:
        if not isinstance(finalize, bool) or not isinstance(merge_running, bool):
            raise TypeError(f"finalize and merge_running must be bools, got {finalize!r}, {merge_running!r}")
        self.finalize = finalize
        self.merge_running = merge_running

    @staticmethod
    def _optimizer(optimizer: Any) -> TrainerGMixout:
        opt = unwrap_optimizer(optimizer)
        if not isinstance(opt, TrainerGMixout):
            raise TypeError(f"GMixoutCallback needs a TrainerGMixout (its eval()/train() show the anchor during "
                            f"evaluation), got {type(opt).__name__}: build it with gmixout_optimizers(model, args)")
        return opt

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_args(args)
        self._optimizer(optimizer).train()
        _check_resumed_weights(args, state, model)

    def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:  # evaluate() before train() has no optimizer yet
            self._optimizer(optimizer).train()

    def on_predict(self, args, state, control, metrics=None, optimizer=None, **kwargs):
        if optimizer is not None:
            self._optimizer(optimizer).train()

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        opt = self._optimizer(optimizer)
        opt.train()
        if self.finalize:
            opt.finalize(merge_running=self.merge_running)
