"""Regression tests for the hardening issue (core items 1-4, 6-10, 12 and the Accelerate
FSDP-on-CPU warning). They use the public interface only.

Tolerances: every comparison here is bitwise. The two runs compared take the same
gradients and the same arithmetic on the same element values (only the element order in
memory, the copy, or an extra no-op step differ), so any difference is a defect.
"""
import copy
import pickle
import warnings

import pytest
import torch

from gmixout_optim import GMixoutOptimizer
from optim_testing import assert_same, flat, make_params, set_grads, snapshot, through_bytes


# ----------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_and_checkpoint_inside_anchor_weights_are_refused(dtype):
    """Inside the block the parameters hold the anchor, not the training weights: a step
    there would be lost on exit and a checkpoint would pair anchor weights with the running
    episode's residual. Both are refused (nothing changes), and training goes on afterwards
    exactly as if the block had never been entered."""
    def trained():
        params = make_params([(9, 7), (13,)], dtype)
        opt = GMixoutOptimizer(params, inner="AdamW", p=0.6, resample_every=4, lr=5e-2)
        for t in range(2):
            set_grads(params, t)
            opt.step()
        return params, opt

    params, opt = trained()
    ref_params, ref_opt = trained()
    with opt.anchor_weights():
        inside = snapshot(params)
        set_grads(params, 2)
        with pytest.raises(RuntimeError, match=r"anchor_weights\(\)"):
            opt.step()
        assert all(torch.equal(flat(w), x) for w, x in zip(params, inside)), "a refused step changed weights"
        with pytest.raises(RuntimeError, match=r"anchor_weights\(\)"):
            opt.state_dict()
        for method in ("consolidate", "finalize"):
            with pytest.raises(RuntimeError, match=r"anchor_weights\(\)"):
                getattr(opt, method)()
        assert all(torch.equal(flat(w), x) for w, x in zip(params, inside))
    for t in range(2, 7):
        for ps, o in ((params, opt), (ref_params, ref_opt)):
            set_grads(ps, t)
            o.step()
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    assert_same(through_bytes(opt.state_dict()), through_bytes(ref_opt.state_dict()))


# ----------------------------------------------------------------------------- item 2
ALL_INNERS = {
    "Adam": dict(lr=1e-2, weight_decay=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=1e-2),
    "SGD": dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=1e-3),
    "Rprop": dict(lr=1e-2),
    "ASGD": dict(lr=1e-2, t0=2.0),
    "NAdam": dict(lr=1e-2),
    "RAdam": dict(lr=1e-2),
    "Adamax": dict(lr=1e-2),
    "Adagrad": dict(lr=1e-1),
    "Adadelta": dict(lr=1.0),
    "RMSprop": dict(lr=1e-2, momentum=0.5),
}


@pytest.mark.parametrize("name", sorted(ALL_INNERS))
def test_init_only_step_changes_and_counts_nothing_for_every_torch_optimizer(name):
    """The all-zero-gradient first step (ZeRO-3's init, DCP's _init_optim_state) lays out
    state and leaves the run exactly as an optimizer that never saw it: weights, counters
    and the inner optimizer's state (Rprop's step sizes, ASGD's eta/mu, NAdam's mu_product,
    SGD's momentum buffer with dampening) after the real steps are bitwise the same."""
    def run(probe):
        params = make_params([(12, 10), (20,), (10,)])
        groups = [{"params": params[:2]}, {"params": params[2:], "gmixout": False}]
        opt = GMixoutOptimizer(groups, inner=name, p=0.6, resample_every=3, **ALL_INNERS[name])
        if probe:
            for w in params:
                w.grad = torch.zeros_like(w)
            before = snapshot(params)
            opt.step()
            assert all(torch.equal(flat(w), x) for w, x in zip(params, before))
            for w in params[:2]:
                assert w in opt.state and "support" in opt.state[w], "the init step lays out GMixout state"
                assert (opt.state[w]["episode"], opt.state[w]["episode_step"]) == (0, 0)
                assert torch.all(opt.state[w]["residual"] == 0)
        for t in range(5):
            set_grads(params, t)
            opt.step()
        return params, opt

    probed, probed_opt = run(True)
    plain, plain_opt = run(False)
    for a, b in zip(probed, plain):
        assert torch.equal(a, b), f"{name}: the init step changed the run"
    assert_same(through_bytes(probed_opt.state_dict()), through_bytes(plain_opt.state_dict()))
    # once state exists, an all-zero-gradient step is an ordinary step and counts
    for w in probed:
        w.grad = torch.zeros_like(w)
    n0 = probed_opt.state[probed[0]]["episode_step"]
    probed_opt.step()
    assert probed_opt.state[probed[0]]["episode_step"] == (n0 + 1) % 3


# ----------------------------------------------------------------------------- items 3, 4
@pytest.mark.parametrize("inner, kw", [("SGD", dict(lr=0.1)), ("AdamW", dict(lr=5e-2))])
def test_ema_decay_one_gives_back_the_pretrained_fp32_weights_bitwise(inner, kw):
    """lam = 1 keeps the pretrained anchor: after any number of episodes, finalize() and
    anchor_weights() hold the pretrained weights bit for bit (the anchor is never re-derived
    from rounded sums)."""
    params = make_params([(30, 20), (64,)])
    pre = snapshot(params)
    opt = GMixoutOptimizer(params, inner=inner, p=0.6, ema_decay=1.0, resample_every=3, **kw)
    for t in range(3 * 3 + 2):  # 3 episodes, then mid-episode
        set_grads(params, t, scale=3.0)
        opt.step()
    assert any(not torch.equal(flat(w), x) for w, x in zip(params, pre)), "training must move the weights"
    with opt.anchor_weights():
        for w, x in zip(params, pre):
            assert torch.equal(flat(w), x), "anchor_weights() must show the exact anchor"
    opt.finalize()
    for w, x in zip(params, pre):
        assert torch.equal(flat(w), x), "finalize() must leave the exact anchor"


def _to_bf16_in_place(params):
    """What module.to(torch.bfloat16) does to a parameter: its data is replaced."""
    for w in params:
        w.data = w.data.to(torch.bfloat16)
        if w.grad is not None:
            w.grad = None


@pytest.mark.parametrize("how", ["to_in_place", "fp32_checkpoint_into_bf16_model"])
def test_tensor_that_becomes_bf16_mid_run_keeps_an_exact_anchor(how):
    """lam = 1: the anchor stays the pretrained weights. Once the tensor is bf16 the model
    holds them rounded to bf16 off the support, and finalize() must give exactly those
    rounded values back after further episodes (a re-derived anchor loses low bits)."""
    kw = dict(inner="AdamW", p=0.6, ema_decay=1.0, resample_every=3, lr=5e-2)
    params = make_params([(30, 20), (64,)])
    pre_bf16 = [x.to(torch.bfloat16) for x in snapshot(params)]
    opt = GMixoutOptimizer(params, **kw)
    for t in range(2):  # stop inside episode 0
        set_grads(params, t)
        opt.step()
    if how == "to_in_place":
        _to_bf16_in_place(params)
    else:
        sd = through_bytes(opt.state_dict())
        params = [torch.nn.Parameter(w.detach().to(torch.bfloat16)) for w in params]
        opt = GMixoutOptimizer(params, **kw)
        opt.load_state_dict(sd)
    for t in range(2, 2 + 3 * 2 + 2):  # across three episode boundaries, one step into the next
        set_grads(params, t)
        opt.step()
    assert any(not torch.equal(flat(w), x) for w, x in zip(params, pre_bf16))
    opt.finalize()
    for w, x in zip(params, pre_bf16):
        assert w.dtype == torch.bfloat16
        assert torch.equal(flat(w), x), f"anchor lost bits: max |diff| {(flat(w).float() - x.float()).abs().max()}"


def test_checkpoint_of_the_previous_format_still_loads():
    """Format 2 stored no anchor for fp32 tensors. It is derived once, at the first use after
    the load, as W[S] - v/keep (the model's weights are loaded by then), then kept exactly:
    the resumed run stays within the derivation's rounding of the uninterrupted one.
    Tolerance: 2 fp32 roundings of |w| <= 4 (ulp 4.8e-7) at the derivation, carried
    unchanged by the later steps (the updates do not depend on the anchor): 1e-6."""
    kw = dict(inner="AdamW", p=0.5, ema_decay=0.3, resample_every=4, lr=5e-2)
    params = make_params([(12, 9), (31,)])
    opt = GMixoutOptimizer(params, **kw)
    for t in range(6):  # inside episode 1
        set_grads(params, t)
        opt.step()
    sd = through_bytes(opt.state_dict())
    sd["gmixout"]["format"] = 2  # what the previous version wrote: no fp32 anchor, no counters
    sd["param_groups"][0].pop("gmixout_config", None)
    for entry in sd["state"].values():
        entry.pop("anchor", None)
    for key in ("skipped_steps", "unstepped"):
        sd["gmixout"].pop(key, None)
    resumed = [torch.nn.Parameter(w.detach().clone()) for w in params]
    opt2 = GMixoutOptimizer(resumed, **kw)
    opt2.load_state_dict(sd)
    for t in range(6, 11):  # across the next episode boundary (after step 8)
        for ps, o in ((params, opt), (resumed, opt2)):
            set_grads(ps, t)
            o.step()
        if t == 6:
            assert "anchor" in opt2.state_dict()["state"][0], "the derived anchor is kept (and saved)"
    for a, b in zip(params, resumed):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- item 6
def _trained_pair():
    params = make_params([(9, 7), (5,)])
    groups = [{"params": params[:1]}, {"params": params[1:], "gmixout": False}]
    opt = GMixoutOptimizer(groups, inner="AdamW", p=0.5, resample_every=3, lr=1e-2)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    return params, opt


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_like_the_original(how):
    params, opt = _trained_pair()
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    for t in range(4, 9):
        for ps, o in ((params, opt), (params2, opt2)):
            set_grads(ps, t)
            o.step()
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
        assert a.data_ptr() != b.data_ptr(), "the copy must own its tensors"
    assert_same(through_bytes(opt2.state_dict()), through_bytes(opt.state_dict()))


# ----------------------------------------------------------------------------- item 7
def test_closure_requiring_inner_optimizer_is_refused_at_construction():
    params = make_params([(4, 3)])
    with pytest.raises(ValueError, match=r"LBFGS[\s\S]*closure"):
        GMixoutOptimizer(params, inner="LBFGS", lr=0.1)
    with pytest.raises(ValueError, match=r"LBFGS[\s\S]*closure"):
        GMixoutOptimizer(params, inner=torch.optim.LBFGS, lr=0.1)
    with pytest.raises(ValueError, match=r"LBFGS[\s\S]*closure"):
        GMixoutOptimizer(torch.optim.LBFGS(params, lr=0.1))


@pytest.mark.parametrize("inner", ["Optimizer", torch.optim.Optimizer])
def test_the_optimizer_base_class_is_not_an_inner_optimizer(inner):
    with pytest.raises((ValueError, TypeError), match=r"Optimizer[\s\S]*(AdamW|base class)"):
        GMixoutOptimizer(make_params([(4, 3)]), inner=inner, lr=0.1)


# ----------------------------------------------------------------------------- item 8
def _conv_params(memory_format):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, 3, 3, generator=g).to(memory_format=memory_format)
    t = torch.randn(7, 4, generator=g).t()  # a transposed leaf: dense, not contiguous
    if memory_format == torch.contiguous_format:
        t = t.contiguous()
    return [torch.nn.Parameter(w), torch.nn.Parameter(t)]


@pytest.mark.parametrize("inner, kw", [("AdamW", dict(lr=5e-2)), ("SGD", dict(lr=0.1, momentum=0.9))])
def test_channels_last_and_transposed_weights_train_like_contiguous_ones(inner, kw):
    """The support is a set of logical elements: the same model in another memory format
    draws the same supports and trains to bitwise the same values, in its own format."""
    cl = _conv_params(torch.channels_last)
    dense = _conv_params(torch.contiguous_format)
    assert not cl[0].is_contiguous() and not cl[1].is_contiguous()
    opts = [GMixoutOptimizer(ps, inner=inner, p=0.6, ema_decay=0.3, resample_every=3, **kw) for ps in (cl, dense)]
    for t in range(8):
        for ps, o in zip((cl, dense), opts):
            set_grads(ps, t)
            o.step()
    for a, b in zip(cl, dense):
        assert torch.equal(a, b)
    assert cl[0].is_contiguous(memory_format=torch.channels_last), "the memory format is kept"
    with opts[0].anchor_weights():
        anchors = snapshot(cl)
    with opts[1].anchor_weights():
        assert all(torch.equal(flat(w), x) for w, x in zip(dense, anchors))
    for o in opts:
        o.finalize()
    for a, b in zip(cl, dense):
        assert torch.equal(a, b)


@pytest.mark.parametrize("inner, kw", [("AdamW", dict(lr=5e-2)), ("SGD", dict(lr=0.1, momentum=0.9))])
def test_channels_last_on_the_triton_path(inner, kw):
    """The same through the Triton kernels (the fused AdamW step included): Triton's
    interpreter on CPU, the compiled kernels on a GPU."""
    from gmixout_optim import kernels

    before = kernels.get_backend()
    kernels.set_backend("triton")
    try:
        cl = _conv_params(torch.channels_last)
        dense = _conv_params(torch.contiguous_format)
        opts = [GMixoutOptimizer(ps, inner=inner, p=0.6, ema_decay=0.3, resample_every=3, **kw) for ps in (cl, dense)]
        for t in range(5):
            for ps, o in zip((cl, dense), opts):
                set_grads(ps, t)
                o.step()
    finally:
        kernels.set_backend(before)
    for a, b in zip(cl, dense):
        assert torch.equal(a, b)


def test_non_contiguous_gradient_on_a_contiguous_weight():
    a = make_params([(6, 4)])
    b = make_params([(6, 4)])
    opts = [GMixoutOptimizer(ps, inner="AdamW", p=0.5, resample_every=2, lr=1e-2) for ps in (a, b)]
    for t in range(5):
        g = torch.Generator().manual_seed(t)
        grad = torch.randn(4, 6, generator=g).t()  # non-contiguous view with the weight's shape
        a[0].grad = grad
        b[0].grad = grad.contiguous()
        for o in opts:
            o.step()
    assert torch.equal(a[0], b[0])


def test_weight_with_gaps_in_its_storage_is_refused_at_construction():
    base = torch.randn(6, 8)
    w = torch.nn.Parameter(base[:, ::2])  # a strided view: its elements are not dense in memory
    with pytest.raises(ValueError, match=r"param group 0, parameter 0[\s\S]*contiguous\(\)"):
        GMixoutOptimizer([w], inner="SGD", lr=0.1)


# ----------------------------------------------------------------------------- item 9
def test_compiled_step_matches_eager_from_the_first_call():
    a = make_params([(33, 17), (129,)])
    b = make_params([(33, 17), (129,)])
    opts = [GMixoutOptimizer(ps, inner="AdamW", p=0.3, resample_every=2, lr=1e-2) for ps in (a, b)]
    compiled = torch.compile(opts[0].step)
    for t in range(5):
        set_grads(a, t)
        set_grads(b, t)
        compiled()
        opts[1].step()
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"step {t}"


# ----------------------------------------------------------------------------- item 10
def test_a_parameter_listed_twice_is_refused():
    (w,) = make_params([(4, 3)])
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"param group 0[\s\S]*more than once"):
        warnings.simplefilter("ignore")  # torch's own warning, from building the inner optimizer first
        GMixoutOptimizer([w, w], inner="SGD", lr=0.1)
    with pytest.raises(ValueError, match=r"more than once|more than one parameter group"):
        GMixoutOptimizer([{"params": [w]}, {"params": [w]}], inner="SGD", lr=0.1)
    with warnings.catch_warnings():  # torch only warns about duplicates inside one group
        warnings.simplefilter("ignore")
        inner = torch.optim.SGD([w, w], lr=0.1)
    with pytest.raises(ValueError, match=r"param group 0[\s\S]*more than once"):
        GMixoutOptimizer(inner)


# ----------------------------------------------------------------------------- item 12
def test_skipped_steps_are_saved_in_checkpoints():
    params = make_params([(6, 4)])
    opt = GMixoutOptimizer(params, inner="AdamW", p=0.5, resample_every=3, lr=1e-2)
    set_grads(params, 0)
    opt.step()
    params[0].grad = torch.full_like(params[0], float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    fresh = GMixoutOptimizer(make_params([(6, 4)]), inner="AdamW", p=0.5, resample_every=3, lr=1e-2)
    fresh.load_state_dict(through_bytes(opt.state_dict()))
    assert fresh.skipped_steps == 1


# ----------------------------------------------------------------------------- item 13 (last sentence)
def test_accelerate_fsdp_config_on_cpu_warns_that_it_runs_without_sharding(monkeypatch):
    """accelerate launch --config_file configs/accelerate/fsdp2.yaml on CPU sets
    ACCELERATE_USE_FSDP but Accelerate runs plain (multi-)CPU data parallel: say so."""
    pytest.importorskip("accelerate")
    from accelerate.utils import DistributedType

    from gmixout_optim.integrations import accelerate as gacc

    class CpuAccelerator:  # what Accelerate reports on CPU under an FSDP config
        distributed_type = DistributedType.MULTI_CPU

        def prepare(self, *objects):
            return objects

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    params = make_params([(4, 3)])
    opt = GMixoutOptimizer(params, inner="SGD", lr=0.1)
    model = torch.nn.Linear(3, 4)
    with pytest.warns(UserWarning, match=r"FSDP[\s\S]*MULTI_CPU"):
        gacc.prepare(CpuAccelerator(), model, opt)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gacc.prepare(CpuAccelerator(), model, GMixoutOptimizer(make_params([(4, 3)]), inner="SGD", lr=0.1))
