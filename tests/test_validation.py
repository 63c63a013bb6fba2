"""Bad input gives a ValueError/TypeError that names the offending value; non-finite gradients
never reach the anchor (the documented behaviour: with skip_nonfinite=True a step whose
gradients on the support, or on a dense parameter, hold inf/nan is skipped as a whole)."""
import re
import warnings

import pytest
import torch

from gmixout_optim import GMixoutOptimizer

BAD = (ValueError, TypeError)


def params(shape=(6, 4), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))]


def names(*values):
    """A regex that matches when the message names each value (as repr or str)."""
    return "".join(f"(?=[\\s\\S]*({re.escape(repr(v))}|{re.escape(str(v))}))" for v in values)


# ----------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_p(p):
    with pytest.raises(BAD, match=names("p", p)):
        GMixoutOptimizer(params(), p=p)


@pytest.mark.parametrize("lam", [-0.01, 1.01, float("nan"), None])
def test_bad_ema_decay(lam):
    with pytest.raises(BAD, match=names("ema_decay", lam)):
        GMixoutOptimizer(params(), ema_decay=lam)


@pytest.mark.parametrize("k", [0, -3, True, False, 2.0, 50.5, "5", None])
def test_bad_resample_every(k):
    with pytest.raises(BAD, match=names("resample_every", k)):
        GMixoutOptimizer(params(), resample_every=k)


def test_edges_are_accepted():
    for kw in (dict(p=0.0), dict(p=0.999), dict(ema_decay=0.0), dict(ema_decay=1.0),
               dict(ema_decay=1), dict(resample_every=1)):
        GMixoutOptimizer(params(), **kw)


@pytest.mark.parametrize("key, value", [("p", 1.0), ("ema_decay", 2.0), ("resample_every", 0),
                                        ("resample_every", True), ("p", -1e-9)])
def test_bad_per_group_overrides(key, value):
    with pytest.raises(BAD, match=names(key, value)):
        GMixoutOptimizer([{"params": params(), key: value}], lr=1e-3)


@pytest.mark.parametrize("kw, value", [(dict(merge="mean"), "mean"), (dict(state_policy="keep"), "keep")])
def test_bad_merge_and_policy(kw, value):
    with pytest.raises(BAD, match=names(value)):
        GMixoutOptimizer(params(), **kw)


# ----------------------------------------------------------------------------- the inner optimizer
def test_unknown_inner_name():
    with pytest.raises(BAD, match=names("Adamm")):
        GMixoutOptimizer(params(), inner="Adamm")
    with pytest.raises(BAD, match=names("Tensor")):  # in torch.optim's namespace, not an optimizer
        GMixoutOptimizer(params(), inner="Tensor")


def test_inner_not_an_optimizer():
    with pytest.raises(BAD, match=names(3)):
        GMixoutOptimizer(params(), inner=3)
    with pytest.raises(BAD, match=names("int")):
        GMixoutOptimizer(params(), inner=int)


@pytest.mark.parametrize("inner, kw, bad", [("SGD", dict(lr=0.1, betas=(0.9, 0.99)), "betas"),
                                            ("AdamW", dict(lr=1e-3, momentum=0.9), "momentum"),
                                            ("AdamW", dict(lr=1e-3, weight_decy=0.1), "weight_decy")])
def test_inner_kwargs_it_does_not_accept(inner, kw, bad):
    with pytest.raises(BAD, match=names(bad)):
        GMixoutOptimizer(params(), inner=inner, **kw)


def test_wrapped_instance_plus_inner_kwargs_is_refused():
    inner = torch.optim.SGD(params(), lr=0.1)
    with pytest.raises(BAD, match=names("lr")):
        GMixoutOptimizer(inner, lr=0.2)


# ----------------------------------------------------------------------------- tensors
def test_sparse_gradients():
    ps = params()
    opt = GMixoutOptimizer(ps, inner="SGD", p=0.5, lr=0.1)
    ps[0].grad = torch.randn(6, 4).to_sparse()
    before = ps[0].detach().clone()
    with pytest.raises(BAD, match="sparse"):
        opt.step()
    assert torch.equal(ps[0], before)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.int32, torch.bool])
def test_complex_or_integer_parameters(dtype):
    t = torch.zeros(4, 3, dtype=dtype)
    if dtype.is_complex:
        t = torch.nn.Parameter(t)
    with pytest.raises(BAD, match=names(str(dtype))):
        opt = GMixoutOptimizer([t], inner="SGD", lr=0.1)
        if t.requires_grad:
            t.grad = torch.ones_like(t)
        opt.step()


def test_parameter_with_gaps_in_memory():
    """A dense non-contiguous weight (transposed, channels_last) trains (tests/test_hardening.py);
    one whose elements do not fill their memory is refused at construction, naming it."""
    w = torch.nn.Parameter(torch.randn(5, 8)[:, ::2])
    with pytest.raises(BAD, match=r"param group 0, parameter 0[\s\S]*gaps or overlaps[\s\S]*contiguous\(\)"):
        GMixoutOptimizer([w], inner="SGD", lr=0.1)
    ok = torch.nn.Parameter(torch.randn(5, 4))
    opt = GMixoutOptimizer([ok], inner="SGD", lr=0.1)
    ok.data = torch.randn(5, 8)[:, ::2]  # swapped in after construction: refused at the step
    ok.grad = torch.ones_like(ok)
    with pytest.raises(BAD, match=r"param group 0, parameter 0[\s\S]*gaps or overlaps"):
        opt.step()


# ----------------------------------------------------------------------------- checkpoints
def _trained(shape=(6, 4), **kw):
    ps = params(shape)
    cfg = dict(inner="AdamW", p=0.5, resample_every=3, seed=0, lr=1e-2)
    cfg.update(kw)
    opt = GMixoutOptimizer(ps, **cfg)
    ps[0].grad = torch.ones_like(ps[0])
    opt.step()
    return opt


@pytest.mark.parametrize("kw, values", [
    (dict(p=0.8), (0.5, 0.8)),
    (dict(resample_every=4), (3, 4)),
    (dict(ema_decay=0.9), (0.3, 0.9)),
    (dict(seed=1), (0, 1)),
    (dict(merge="residual"), ("ema", "residual")),
    (dict(state_policy="carry"), ("remap", "carry")),
    (dict(inner="SGD"), ("AdamW", "SGD")),
])
def test_state_dict_from_another_configuration(kw, values):
    sd = _trained().state_dict()
    other = _trained(**kw)
    with pytest.raises(BAD, match=names(*values)):
        other.load_state_dict(sd)


def test_state_dict_of_another_model():
    sd = _trained(shape=(6, 4)).state_dict()
    with pytest.raises(BAD, match=names(2)):  # two param groups vs one
        GMixoutOptimizer([{"params": params()}, {"params": params(seed=1)}], lr=1e-2,
                         p=0.5, resample_every=3).load_state_dict(sd)
    # same number of tensors, other shapes: the saved support cannot index this tensor
    other = _trained(shape=(3, 2))
    with pytest.raises(BAD, match=names(24) + "|" + names(6)):
        other.load_state_dict(sd)


def test_plain_torch_state_dict_is_refused():
    ps = params()
    plain = torch.optim.AdamW(ps, lr=1e-2)
    ps[0].grad = torch.ones_like(ps[0])
    plain.step()
    with pytest.raises(BAD, match="gmixout|GMixout"):
        _trained().load_state_dict(plain.state_dict())


def test_float_support_indices_are_refused():
    sd = _trained().state_dict()
    sd["state"][0]["support"] = sd["state"][0]["support"].float()
    with pytest.raises(BAD, match="float32"):
        _trained().load_state_dict(sd)


# ----------------------------------------------------------------------------- non-finite gradients
def _run(nan_at=None, where="support", steps=7, skip=True):
    ps = params((10, 10)) + [torch.nn.Parameter(torch.zeros(10))]
    opt = GMixoutOptimizer([{"params": ps[:1]}, {"params": ps[1:], "gmixout": False}], inner="AdamW",
                           p=0.5, ema_decay=0.3, resample_every=3, lr=1e-2, skip_nonfinite=skip)
    g = torch.Generator().manual_seed(1)
    taken = 0
    for t in range(steps):
        grads = [torch.randn(q.shape, generator=g) for q in ps]
        if t == nan_at:
            st = opt.state[ps[0]]
            s = st["support"][st["support"] >= 0].long()
            if where == "support":
                grads[0].view(-1)[s[0]] = float("nan")
            elif where == "support_inf":
                grads[0].view(-1)[s[-1]] = -float("inf")
            elif where == "dense":
                grads[1][3] = float("inf")
            else:  # off the support: the gradient there is never read
                off = torch.ones(100, dtype=torch.bool)
                off[s] = False
                grads[0].view(-1)[off.nonzero()[0]] = float("nan")
            before = ([q.detach().clone() for q in ps], copy_state(opt))
        for q, gr in zip(ps, grads):
            q.grad = gr
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        if t == nan_at and where != "off_support" and skip:
            assert any("non-finite" in str(c.message) for c in caught)
            assert all(torch.equal(a, b) for a, b in zip(before[0], ps)), "a skipped step moved a weight"
            assert_state_equal(before[1], copy_state(opt))
        else:
            taken += 1
    return ps, opt, taken


def copy_state(opt):
    return {id(k): {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
            for k, v in opt.state.items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for kk in a[k]:
            if torch.is_tensor(a[k][kk]):
                assert torch.equal(a[k][kk], b[k][kk]), kk
            else:
                assert a[k][kk] == b[k][kk], kk


@pytest.mark.parametrize("where", ["support", "support_inf", "dense"])
@pytest.mark.parametrize("nan_at", [1, 2])  # inside an episode, and on the step that would merge
def test_nonfinite_gradient_step_is_skipped_and_never_reaches_the_anchor(where, nan_at):
    ps, opt, taken = _run(nan_at=nan_at, where=where)
    assert opt.skipped_steps == 1 and taken == 6
    st = opt.state[ps[0]]
    assert (st["episode"], st["episode_step"]) == divmod(taken, 3), "a skipped step must not count"
    opt.finalize()
    assert all(torch.isfinite(q).all() for q in ps)


def test_nonfinite_gradient_off_the_support_is_harmless():
    ps_ref, opt_ref, _ = _run()
    ps, opt, taken = _run(nan_at=1, where="off_support")
    assert opt.skipped_steps == 0 and taken == 7
    for a, b in zip(ps, ps_ref):
        assert torch.equal(a, b)


def test_nonfinite_check_can_be_switched_off():
    ps, opt, _ = _run(nan_at=1, where="support", skip=False)
    assert opt.skipped_steps == 0
    assert not torch.isfinite(ps[0]).all(), "without the check the nan goes through (documented)"
