"""The Hugging Face Trainer route: gmixout_optimizers + GMixoutCallback, on a tiny random ViT on CPU.

Runs (8 optimizer steps, k = 3, evaluation every 5 steps, checkpoints every 4):
  full      uninterrupted, evaluating; a probe records the anchor and the training weights
  noeval    the same without evaluation (evaluation must not change training)
  stopped   stopped after the step-4 checkpoint; resumed: a fresh model, optimizer and
            Trainer, train(resume_from_checkpoint=checkpoint-4)
References and tolerances: runs of the same process on CPU are compared bitwise; the eval
loss against a hand-computed loss of the anchor (same ops, batch means averaged: 1e-6);
the saved model against the merge formula A + (1 - ema_decay)(W - A) (the core computes it
as A[S] + (1 - ema_decay) v / keep: rounding of a few ulps of weights ~0.1: 1e-6).
"""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402

from gmixout_optim.integrations.transformers import (  # noqa: E402
    GMixoutCallback, TrainerGMixout, gmixout_optimizers, unwrap_optimizer)

STEPS, K, EMA = 8, 3, 0.5
GMIXOUT = dict(p=0.7, ema_decay=EMA, resample_every=K)


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=gen)
        self.y = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _model() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def _args(out: str, evaluate: bool = True, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-2, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=1,
        eval_strategy="steps" if evaluate else "no", eval_steps=5, save_strategy="steps", save_steps=4,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **kw)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Probe(TrainerCallback):
    """Placed before GMixoutCallback: records the anchor and the training weights around evaluations."""

    def __init__(self, eval_set: Images) -> None:
        self.eval_set = eval_set
        self.anchor, self.training, self.anchor_loss = {}, {}, {}
        self.seen_in_eval, self.after_eval, self.at_end = {}, {}, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        opt = unwrap_optimizer(optimizer)
        self.training[state.global_step] = _params(model)
        with opt.anchor_weights(), torch.no_grad():
            self.anchor[state.global_step] = _params(model)
            was = model.training
            model.eval()
            losses = [model(pixel_values=self.eval_set.x[i:i + 4], labels=self.eval_set.y[i:i + 4]).loss
                      for i in range(0, len(self.eval_set), 4)]
            model.train(was)
            self.anchor_loss[state.global_step] = torch.stack(losses).mean().item()

    def on_prediction_step(self, args, state, control, model=None, **kw):
        self.seen_in_eval.setdefault(state.global_step, _params(model))

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step in self.seen_in_eval and state.global_step not in self.after_eval:
            self.after_eval[state.global_step] = _params(model)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kw):
        opt = unwrap_optimizer(optimizer)
        with opt.anchor_weights():
            anchor = _params(model)
        self.at_end = (anchor, _params(model))  # (anchor, training weights) before finalize


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def _train(out: str, evaluate: bool = True, callbacks=(), resume: str | None = None, workaround: bool = True):
    # transformers 5.24's resume loads the checkpoint's (renamed, original-format) keys into
    # the model with strict=False, which loads nothing for ViT (huggingface/transformers#43701):
    # load the model from the checkpoint with from_pretrained, as docs/huggingface.md says.
    model = ViTForImageClassification.from_pretrained(resume) if resume and workaround else _model()
    args = _args(out, evaluate)
    eval_set = Images(8, seed=2)
    probe = Probe(eval_set)
    trainer = Trainer(model=model, args=args, train_dataset=Images(24, seed=1),
                      eval_dataset=eval_set if evaluate else None,
                      optimizers=gmixout_optimizers(model, args, **GMIXOUT),
                      callbacks=[probe, *callbacks, GMixoutCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, probe


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    full = _train(str(root / "full"))
    full[0].save_model(str(root / "full" / "final"))
    noeval = _train(str(root / "noeval"), evaluate=False)
    _train(str(root / "stopped"), callbacks=[StopAt(4)])
    resumed = _train(str(root / "stopped"), resume=str(root / "stopped" / "checkpoint-4"))
    return {"root": root, "full": full, "noeval": noeval, "resumed": resumed}


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{what}: {name}"


def _differ(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_evaluation_scores_the_anchor_and_gives_the_training_weights_back(runs):
    trainer, probe = runs["full"]
    assert sorted(probe.seen_in_eval) == [5, 8]  # every 5 steps and at the end (both mid-episode)
    for step in (5, 8):
        assert _differ(probe.anchor[step], probe.training[step]) > 1e-3  # the two views differ
        _assert_equal(probe.seen_in_eval[step], probe.anchor[step], f"weights seen by evaluation at step {step}")
        if step < STEPS:
            _assert_equal(probe.after_eval[step], probe.training[step], f"weights after evaluation at step {step}")
        logged = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e["step"] == step]
        assert logged == [pytest.approx(probe.anchor_loss[step], abs=1e-6)]
    # evaluation changes nothing in training: same weights as the run without it
    _assert_equal(runs["full"][1].at_end[1], runs["noeval"][1].at_end[1], "training weights, eval vs no eval")


def test_resumed_run_equals_the_uninterrupted_one(runs):
    full, resumed = runs["full"][1], runs["resumed"][1]
    _assert_equal(resumed.at_end[1], full.at_end[1], "training weights at the end")
    _assert_equal(resumed.at_end[0], full.at_end[0], "anchor at the end")
    _assert_equal(_params(runs["resumed"][0].model), _params(runs["full"][0].model), "finalized model")
    root = runs["root"]
    a = load_file(os.path.join(root, "full", "checkpoint-8", "model.safetensors"))
    b = load_file(os.path.join(root, "stopped", "checkpoint-8", "model.safetensors"))
    _assert_equal(b, a, "checkpoint-8 model files")


def test_resume_that_leaves_the_initial_weights_is_refused(runs):
    checkpoint = str(runs["root"] / "stopped" / "checkpoint-4")
    with pytest.raises(RuntimeError, match="43701"):
        _train(str(runs["root"] / "stopped"), resume=checkpoint, workaround=False)


def test_optimizer_pt_holds_the_episode_counters_and_loads_back(runs):
    path = os.path.join(runs["root"], "stopped", "checkpoint-4", "optimizer.pt")
    saved = torch.load(path, map_location="cpu", weights_only=True)  # as the Trainer loads it
    gm = [e for e in saved["state"].values() if "episode" in e]
    assert gm and all((e["episode"], e["episode_step"]) == (1, 1) for e in gm)  # 4 steps = 3 + 1
    model = _model()
    fresh, _ = gmixout_optimizers(model, _args(str(runs["root"] / "tmp")), **GMIXOUT)
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    for pid, entry in saved["state"].items():
        for key, value in entry.items():
            got = again["state"][pid][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(got, value), (pid, key)
            elif isinstance(value, dict):
                assert all(torch.equal(torch.as_tensor(got[k]), torch.as_tensor(v)) for k, v in value.items())
            else:
                assert got == value, (pid, key)


def test_saved_model_is_the_merged_anchor(runs):
    anchor, training = runs["full"][1].at_end
    # the file holds transformers' original-format keys: read it back as a user would
    saved = _params(ViTForImageClassification.from_pretrained(os.path.join(runs["root"], "full", "final")))
    assert 8 % K != 0  # an episode is running at the end: finalize merges it
    expected = {n: anchor[n] + (1 - EMA) * (training[n] - anchor[n]) for n in anchor}
    for name in anchor:
        torch.testing.assert_close(saved[name], expected[name], atol=1e-6, rtol=0)
    assert _differ(saved, training) > 1e-4 and _differ(saved, anchor) > 1e-4
    _assert_equal(_params(runs["full"][0].model), saved, "model in memory vs saved")


def test_refusals(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        gmixout_optimizers(model, _args(str(tmp_path), load_best_model_at_end=True,
                                        metric_for_best_model="loss"))
    with pytest.raises(ValueError, match=r"p \(gmixout_optimizers\) must be a float in \[0, 1\)"):
        gmixout_optimizers(model, _args(str(tmp_path)), p=1.5)
    with pytest.raises(ValueError, match=r"does not accept \['pp'\]"):
        gmixout_optimizers(model, _args(str(tmp_path)), pp=0.9)
    opt, _ = gmixout_optimizers(model, _args(str(tmp_path)), **GMIXOUT)
    assert isinstance(opt, TrainerGMixout)
    model(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    opt.eval()
    with pytest.raises(RuntimeError, match="hold the anchor"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="hold the anchor"):
        opt.step()
    opt.train()
    opt.state_dict()
    trainer = Trainer(model=model, args=_args(str(tmp_path), evaluate=False), train_dataset=Images(8, seed=1),
                      callbacks=[GMixoutCallback()])
    with pytest.raises(TypeError, match="no GMixoutOptimizer inside"):
        trainer.train()
