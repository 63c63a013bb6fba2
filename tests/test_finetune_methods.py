"""Every method runs a few steps on a tiny subset and ends as a plain model; cross-checks between them."""
import copy

import pytest
import torch

from gmixout_optim.finetune import methods as ME
from gmixout_optim.finetune.models import build_model
from gmixout_optim.finetune.train import lr_factor, train_run

CFG = {"model": "efficientnet_lite0", "image_size": 32,
       "data": {"seed": 0, "n_val": 20, "n_test": 20, "n_train": 32},
       "train": {"steps": 2, "batch_size": 8, "warmup_frac": 0.0, "bn_batches": 2}}


@pytest.fixture(scope="module")
def pretrained():
    torch.set_num_threads(1)
    model, _ = build_model("efficientnet_lite0", head_seed=0)
    return model.state_dict()


def _run(tmp_path, method, overrides=None, seed=0):
    rec = train_run(CFG, method, overrides or {}, seed, str(tmp_path / method), progress=False)
    return rec, torch.load(tmp_path / method / "model.pt", weights_only=True)


# the methods that take gradient steps on backbone and head (the others: test_finetune_baselines.py);
# lp_ft's probe needs every class in the training subset, which CFG's 32 MNIST images do not hold
@pytest.mark.parametrize("method", [m for m in ME.TRAINED if ME._CLASSES[m].trains and m != "lp_ft"])
def test_method_trains_and_saves_a_plain_model(tmp_path, pretrained, method):
    rec, sd = _run(tmp_path, method)
    assert list(sd) == list(pretrained)  # same architecture and key order as the plain model
    assert all(sd[k].shape == pretrained[k].shape for k in sd)
    assert not torch.equal(sd["conv_head.weight"], pretrained["conv_head.weight"])  # backbone trained
    assert not torch.equal(sd["classifier.weight"], pretrained["classifier.weight"])  # head trained
    assert 0.0 <= rec["val"] <= 1.0 and rec["state_bytes"] > 0 and rec["peak_mem_bytes"] >= 0
    assert (tmp_path / method / "run.json").exists()


def test_ema_with_zero_decay_is_full_finetuning(tmp_path):
    # decay 0 copies the weights after every step: the same model bit for bit (same seed, same ops).
    _, full = _run(tmp_path / "a", "full_ft")
    _, ema = _run(tmp_path / "b", "ema", {"ema_decay": 0.0})
    assert all(torch.equal(full[k], ema[k]) for k in full)


def test_wise_alpha_one_is_full_finetuning_and_alpha_zero_keeps_the_backbone(tmp_path, pretrained):
    _, full = _run(tmp_path / "a", "full_ft")
    rec, wise1 = _run(tmp_path / "b", "wise_ft", {"alphas": [1.0]})
    assert rec["extra"]["wise_alpha"] == 1.0
    assert all(torch.equal(full[k], wise1[k]) for k in full)
    rec, wise0 = _run(tmp_path / "c", "wise_ft", {"alphas": [0.0]})
    assert torch.equal(wise0["conv_head.weight"], pretrained["conv_head.weight"])
    assert torch.equal(wise0["classifier.weight"], full["classifier.weight"])  # the new head has no pretrained value


def test_lora_merge_keeps_the_function():
    torch.manual_seed(0)
    model, info = build_model("efficientnet_lite0")
    m = ME.make_method("lora", {"lr": 1e-2})
    net = m.setup(model, info.head_names)
    opt = m.make_optimizer(net)
    x = torch.randn(8, 3, 32, 32)
    for _ in range(2):
        net(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    net.eval()
    with torch.no_grad():
        before = net(x)
        merged = m.finish(net, None)
        after = merged(x)
    assert type(merged).__name__ == "EfficientNet"
    # fp32, 4.7M weights, merge adds B@A into W once: agreement to ~1e-6 relative; 1e-4 abs is loose but
    # far below the 1e-2 effect of the LoRA update itself (checked next).
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    fresh, _ = build_model("efficientnet_lite0")
    assert not torch.allclose(fresh.eval()(x), after, atol=1e-2)


def test_mixout_keeps_its_pretrained_anchor_and_evaluates_on_w():
    torch.manual_seed(0)
    model, info = build_model("efficientnet_lite0")
    w0 = model.conv_head.weight.detach().clone()
    m = ME.make_method("mixout", {"p": 0.9})
    net = m.setup(model, info.head_names)
    assert "classifier.weight" not in m.mixout.names and "conv_head.weight" in m.mixout.names
    opt = m.make_optimizer(net)
    x = torch.randn(8, 3, 32, 32)
    net.train()
    net(x).logsumexp(-1).mean().backward()
    opt.step()
    assert torch.equal(m.mixout.pretrained["conv_head.weight"], w0)
    plain = m.finish(net, None)
    assert not torch.equal(plain.conv_head.weight, w0)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


def test_gmixout_changes_only_a_sparse_support_before_the_first_redraw(tmp_path, pretrained):
    p = 0.9
    _, sd = _run(tmp_path, "gmixout", {"p": p, "resample_every": 100, "lr": 1e-3})
    w, w0 = sd["conv_head.weight"], pretrained["conv_head.weight"]
    changed = (w != w0).float().mean().item()
    # One support of density 1-p (binomial: 409,600 elements, 6 sd = 0.0028), finalize merges it once.
    assert 0.05 < changed <= (1 - p) + 0.003
    assert (sd["classifier.weight"] != pretrained["classifier.weight"]).float().mean() > 0.99  # head: dense


def test_unknown_method_and_parameter_are_named():
    with pytest.raises(ValueError, match="unknown method 'sgd'; allowed: full_ft"):
        ME.make_method("sgd")
    with pytest.raises(ValueError, match="method 'lora' has no parameter 'p'"):
        ME.make_method("lora", {"p": 0.5})


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(t, 100, 0.1) for t in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.001


def test_lora_targets_are_the_pointwise_layers():
    model, info = build_model("efficientnet_lite0")
    names = ME.lora_targets(model, info.head_names)
    assert "conv_head" in names and "blocks.1.0.conv_pw" in names and "blocks.1.0.conv_pwl" in names
    assert not any(n.endswith(("conv_dw", "conv_stem")) or n.startswith("classifier") for n in names)
    # MultiheadAttention reads out_proj.weight directly: no LoRA there; nothing left is an error.
    mha = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no Linear or 1x1 Conv2d layer outside"):
        ME.lora_targets(mha, ["1"])
    assert ME.lora_targets(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), ["1"]) == ["0"]


def test_memory_probe_sees_the_optimizer_state_gmixout_saves(tmp_path):
    from gmixout_optim.finetune.experiment import DEFAULT_CONFIG, memory_probe, merge_config

    cfg = merge_config(DEFAULT_CONFIG, {**CFG, "threads": 1})
    full = memory_probe(cfg, "full_ft", {}, 0, 2, str(tmp_path / "a"))
    gmix = memory_probe(cfg, "gmixout", {}, 0, 2, str(tmp_path / "b"))
    # AdamW keeps 2 fp32 moments of all 3.4M backbone weights (27 MB); GMixout keeps them, the
    # residual and the support for ~10% of them (~6 MB). Activations and gradients are the same.
    # 10 MB of the ~21 MB difference is left as margin for allocator noise.
    assert full - gmix > 10 * 2**20, (full, gmix)
