"""Gradient capture (``GMixoutOptimizer(..., capture_grads=True)``).

A post-accumulate-grad hook on each GMixout tensor gathers the gradient on the support into
the optimizer's compact buffer and frees the dense gradient. The contract checked here:

| check | tolerance | why |
| --- | --- | --- |
| capture on vs off, weights after steps crossing a merge and a redraw (fp32, bf16; 1 and 2 micro-batches) | bitwise | the buffer holds exactly the support values of the gradient autograd would have accumulated (same dtype, same order of additions); step() divides by keep as the gather does |
| ``zero_grad`` between two backward passes | bitwise vs the second pass alone | the compact buffers must be cleared, not added to |
| a ``param.grad`` set by hand on a captured tensor | warns; bitwise vs capture off with the summed gradient | it is folded in (never silently dropped) |
| ``opt.clip_grad_norm_`` | norm: rel 1e-6; weights: 1e-7 abs vs a float64 reference | clips the gradients the optimizer uses: ``grad[S]/keep`` of the GMixout tensors and the dense gradients; SGD makes the update show the clipped gradient |
| non-finite gradient | no change, counted | as without capture |
| DeepSpeed / DDP | refused with a clear error | DeepSpeed owns the gradient buffers; DDP's hook would see the local, not the averaged gradient |
| FSDP2 on 2 gloo ranks (tests/distributed/capture_worker.py) | bitwise | its hooks run on the sharded parameter after the reduce-scatter; dense shard gradients get their own storage (else one keeps the block's whole reduce-scatter buffer alive) |
"""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gmixout_optim import GMixoutOptimizer, gmixout_param_groups

sys.path.insert(0, str(Path(__file__).parent))
import launch  # noqa: E402

P, LR = 0.5, 1e-2
WORKER = Path(__file__).parent / "distributed" / "capture_worker.py"


def make_model(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    return model.to(dtype)


def make_opt(model, capture, inner="AdamW", **kw):
    hp = dict(inner=inner, p=P, ema_decay=0.3, resample_every=2, seed=3, lr=LR)
    hp.update(kw)
    return GMixoutOptimizer(gmixout_param_groups(model, weight_decay=0.01 if inner == "AdamW" else 0.0),
                            capture_grads=capture, **hp)


def batch(step, micro, dtype):
    g = torch.Generator().manual_seed(100 * step + micro)
    return torch.randn(5, 6, generator=g).to(dtype), torch.randn(5, 3, generator=g)


def loss_of(model, step, micro, n_micro, dtype):
    x, y = batch(step, micro, dtype)
    return ((model(x).float() - y) ** 2).mean() / n_micro


def gmixout_tensors(opt):
    return [w for g in opt.param_groups if g["gmixout"] for w in g["params"]]


def train(dtype, capture, n_micro=1, steps=5, seed=0, check_freed=False):
    model = make_model(dtype, seed)
    opt = make_opt(model, capture)
    for step in range(steps):
        for m in range(n_micro):
            loss_of(model, step, m, n_micro, dtype).backward()
            if check_freed:
                sparse = gmixout_tensors(opt)
                assert all(w.grad is None for w in sparse), "capture_grads left a dense weight gradient"
                assert all(p.grad is not None for p in model.parameters() if all(p is not w for w in sparse))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def assert_same(a: nn.Module, b: nn.Module, what: str) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        if not torch.equal(x, y):
            bad = int((x != y).sum())
            raise AssertionError(f"{what}: {name} differs in {bad} of {x.numel()} elements, "
                                 f"max |diff| {float((x.float() - y.float()).abs().max()):.3e}")


@pytest.mark.parametrize("n_micro", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_matches_dense_gradients_bitwise(dtype, n_micro):
    # 5 steps with resample_every=2: two merges and redraws, and a step on each new support.
    plain, opt_plain = train(dtype, capture=False, n_micro=n_micro)
    captured, opt_cap = train(dtype, capture=True, n_micro=n_micro, check_freed=True)
    start = make_model(dtype)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), start.parameters())), "nothing trained"
    assert_same(captured, plain, f"capture vs dense gradients ({dtype}, {n_micro} micro-batches)")
    assert opt_cap.skipped_steps == opt_plain.skipped_steps == 0


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_captured_gradients(set_to_none):
    model_a = make_model()
    opt_a = make_opt(model_a, capture=True)
    loss_of(model_a, 7, 0, 1, torch.float32).backward()  # captured, then discarded
    opt_a.zero_grad(set_to_none=set_to_none)
    loss_of(model_a, 0, 0, 1, torch.float32).backward()
    opt_a.step()

    model_b, _ = train(torch.float32, capture=False, steps=1)
    assert_same(model_a, model_b, f"zero_grad(set_to_none={set_to_none}) then backward vs backward alone")


def test_grad_left_on_captured_tensor_warns_and_is_used():
    extra = torch.Generator().manual_seed(5)
    model_a = make_model()
    opt_a = make_opt(model_a, capture=True)
    loss_of(model_a, 0, 0, 1, torch.float32).backward()
    w_a = gmixout_tensors(opt_a)[0]
    assert w_a.grad is None
    bump = torch.randn(w_a.shape, generator=extra)
    w_a.grad = bump.clone()  # e.g. written by code that bypasses autograd
    with pytest.warns(UserWarning, match="grad"):
        opt_a.step()

    model_b = make_model()
    opt_b = make_opt(model_b, capture=False)
    loss_of(model_b, 0, 0, 1, torch.float32).backward()
    w_b = gmixout_tensors(opt_b)[0]
    w_b.grad = w_b.grad + bump  # what autograd accumulation would give
    opt_b.step()
    assert_same(model_a, model_b, "a left-over param.grad folded into the captured gradient")


@pytest.mark.parametrize("capture", [False, True])
def test_clip_grad_norm_clips_the_gradients_the_optimizer_uses(capture):
    keep, lr, max_norm = 1.0 - P, 0.1, 0.05
    # Reference gradients from an identical model, plain autograd, float64 arithmetic below.
    ref = make_model()
    loss_of(ref, 0, 0, 1, torch.float32).backward()
    grads = {name: prm.grad.double() for name, prm in ref.named_parameters()}

    model = make_model()
    opt = make_opt(model, capture, inner="SGD", lr=lr, resample_every=10)
    start = {name: prm.detach().clone() for name, prm in model.named_parameters()}
    loss_of(model, 0, 0, 1, torch.float32).backward()
    norm = opt.clip_grad_norm_(max_norm)
    opt.step()

    sparse = {id(w) for w in gmixout_tensors(opt)}
    moved = {name: model.get_parameter(name) != start[name] for name in start}
    used = []  # the gradients the optimizer steps: grad[S]/keep (GMixout), grad (dense)
    for name, prm in model.named_parameters():
        if id(prm) in sparse:
            support = moved[name]
            assert 0 < int(support.sum()) < prm.numel(), f"{name}: support of {int(support.sum())} elements"
            used.append(grads[name][support] / keep)
        else:
            used.append(grads[name].flatten())
    total = math.sqrt(sum(float((g ** 2).sum()) for g in used))
    assert total > 2 * max_norm, "the test must clip"
    assert float(norm) == pytest.approx(total, rel=1e-6)
    coef = max_norm / (total + 1e-6)
    for name, prm in model.named_parameters():
        w0, g, got = start[name].double(), grads[name], prm.detach().double()
        if id(prm) in sparse:  # SGD on v: v = -lr * coef * g[S]/keep; W[S] = A[S] + v/keep
            expect = w0.clone()
            s = moved[name]
            expect[s] = w0[s] - lr * coef * g[s] / keep / keep
        else:
            expect = w0 - lr * coef * g
        err = float((got - expect).abs().max())
        assert err <= 1e-7, f"{name}: max |weight - reference| {err:.2e}"


def test_clip_grad_norm_capture_on_and_off_bitwise():
    models = []
    for capture in (False, True):
        model = make_model()
        opt = make_opt(model, capture)
        for step in range(3):
            loss_of(model, step, 0, 1, torch.float32).backward()
            opt.clip_grad_norm_(0.05)
            opt.step()
            opt.zero_grad()
        models.append(model)
    assert_same(models[1], models[0], "clip_grad_norm_ with capture vs without")


def test_nonfinite_captured_gradient_skips_the_step():
    runs = []
    for capture in (False, True):
        model = make_model()
        opt = make_opt(model, capture)
        loss_of(model, 0, 0, 1, torch.float32).backward()
        opt.step()
        opt.zero_grad()
        before = [prm.detach().clone() for prm in model.parameters()]
        (loss_of(model, 1, 0, 1, torch.float32) * float("inf")).backward()
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step()
        opt.zero_grad()
        assert opt.skipped_steps == 1
        for a, b in zip(model.parameters(), before):
            assert torch.equal(a, b), "a skipped step changed a weight"
        for step in (2, 3):
            loss_of(model, step, 0, 1, torch.float32).backward()
            opt.step()
            opt.zero_grad()
        runs.append(model)
    assert_same(runs[1], runs[0], "training after a skipped step, capture vs not")


def test_capture_grads_must_be_a_bool():
    with pytest.raises(ValueError, match="capture_grads"):
        make_opt(make_model(), capture="yes")


def test_capture_refuses_tensors_autograd_does_not_fill():
    model = make_model()
    frozen = [w for w in model.parameters() if w.dim() == 2]
    frozen[0].requires_grad_(False)
    with pytest.raises(ValueError, match="capture_grads"):
        GMixoutOptimizer([{"params": frozen}], lr=LR, capture_grads=True)


def test_deepspeed_refuses_capture_grads():
    gds = pytest.importorskip("gmixout_optim.integrations.deepspeed")
    model = make_model()
    with pytest.raises(ValueError, match="DeepSpeed"):
        gds.DeepSpeedGMixout(gmixout_param_groups(model), lr=LR, capture_grads=True)


def test_fsdp2_capture_bitwise_and_ddp_refused(tmp_path):
    """2 gloo ranks: FSDP2 capture on/off bitwise (fp32 and bf16 parameters, 2 micro-batches);
    DDP and plain multi-rank use of capture_grads refused with a clear error."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path)]
    proc = launch.run(cmd, env=env, timeout=240)
    assert proc.returncode == 0, f"capture_worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-12000:]}"
    results = json.loads((tmp_path / "capture_results.json").read_text())
    for name in ("fsdp2_fp32", "fsdp2_bf16", "fsdp2_fp32_mp_bf16"):
        assert name in results, f"scenario {name} did not run"
        assert results[name]["max_diff"] == 0.0, f"{name}: capture vs not differ by {results[name]['max_diff']:.3e}"
        assert results[name]["trained"] > 0, f"{name}: weights did not move"
        assert results[name]["dense_grads_left"] == 0, f"{name}: sharded weight gradients left after backward"
        assert results[name]["dense_grads_sharing_a_buffer"] == 0, f"{name}: a dense gradient holds a block's buffer"
    assert "DDP" in results["ddp_refused"], results["ddp_refused"]
    assert "capture_grads" in results["multi_rank_plain_refused"], results["multi_rank_plain_refused"]


def test_clip_grad_norm_with_a_left_over_grad_then_step():
    """clip_grad_norm_ finds a param.grad on a captured tensor that captured nothing: it warns,
    clips it with the rest, and step() uses the clipped values (as without capture)."""
    models = []
    for capture in (False, True):
        model = make_model()
        opt = make_opt(model, capture)
        ref = make_model()
        loss_of(ref, 0, 0, 1, torch.float32).backward()
        for prm, r in zip(model.parameters(), ref.parameters()):
            prm.grad = r.grad.clone()  # written by hand: no hook runs
        if capture:
            with pytest.warns(UserWarning, match="grad"):
                opt.clip_grad_norm_(0.05)
        else:
            opt.clip_grad_norm_(0.05)
        opt.step()
        models.append(model)
    assert_same(models[1], models[0], "hand-written gradients, clipped, capture vs not")


def test_a_rebuilt_optimizer_takes_the_captured_gradients():
    model = make_model()
    first = make_opt(model, capture=True)
    with pytest.warns(UserWarning, match="another live GMixoutOptimizer"):
        second = make_opt(model, capture=True)
    loss_of(model, 0, 0, 1, torch.float32).backward()
    second.step()

    ref, _ = train(torch.float32, capture=False, steps=1)
    assert_same(model, ref, "the newest capturing optimizer")
    assert all(not st for st in first.state.values()), "the replaced optimizer still captured"


def test_capture_channels_last_conv_bitwise():
    """A channels_last Conv weight addresses its support through memory positions: the hook must
    read the gradient as the gather does."""
    runs = []
    for capture in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Conv2d(8, 4, 3)).to(memory_format=torch.channels_last)
        opt = GMixoutOptimizer(gmixout_param_groups(model), capture_grads=capture, p=P, resample_every=2, seed=3,
                               lr=LR)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(2, 3, 9, 9, generator=g).to(memory_format=torch.channels_last)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append(model)
    assert not runs[0][0].weight.is_contiguous(), "the test must use a non-row-major weight"
    assert_same(runs[1], runs[0], "channels_last conv, capture vs not")
