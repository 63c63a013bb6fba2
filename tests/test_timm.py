"""timm's optimizer factory: create_optimizer_v2(model, opt="gmixout" / "gmixout_sgd", ...).

References: timm's own plain optimizer (its per-tensor weight decay and layer-decay
``lr_scale``), gmixout_param_groups (which tensors GMixout trains), and a GMixoutOptimizer
built by hand from those, trained in lockstep (bitwise: same groups, same order, same math).
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")
import timm.optim  # noqa: E402
import timm.scheduler  # noqa: E402

from gmixout_optim import GMixoutOptimizer, gmixout_param_groups  # noqa: E402
from gmixout_optim.integrations import timm as gtimm  # noqa: E402

LR, WD = 1e-2, 0.05


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=3)


@pytest.fixture
def registered():
    gtimm.register()
    yield
    gtimm.unregister()


def _per_tensor(opt: torch.optim.Optimizer) -> dict[int, tuple]:
    """id(tensor) -> (lr, weight_decay, lr_scale) as the optimizer's groups say."""
    return {id(t): (g["lr"], g["weight_decay"], g.get("lr_scale")) for g in opt.param_groups for t in g["params"]}


def _gmixout_ids(model) -> set[int]:
    return {id(t) for g in gmixout_param_groups(model) if g["gmixout"] for t in g["params"]}


def test_registration_is_explicit_idempotent_and_reversible():
    registry = timm.optim._optim_factory.default_registry
    assert not gtimm.is_registered() and "gmixout" not in timm.optim.list_optimizers()
    assert "create_optimizer" not in registry.__dict__  # importing the module changed nothing
    try:
        assert gtimm.register() == gtimm.register() == ["gmixout", "gmixout_sgd", "gmixoutsgd"]
        assert gtimm.is_registered()
        assert set(timm.optim.list_optimizers("gmixout*")) == {"gmixout", "gmixout_sgd", "gmixoutsgd"}
    finally:
        gtimm.unregister()
    gtimm.unregister()  # a second call is a no-op
    assert not gtimm.is_registered() and "create_optimizer" not in registry.__dict__
    assert timm.optim.list_optimizers("gmixout*") == []
    with pytest.raises(ValueError, match="not found"):
        timm.optim.create_optimizer_v2(_model(), opt="gmixout")
    assert type(timm.optim.create_optimizer_v2(_model(), opt="adamw")) is torch.optim.AdamW


def test_register_refuses_a_foreign_optimizer_of_the_same_name():
    registry = timm.optim._optim_factory.default_registry
    registry.register(timm.optim.OptimInfo(name="gmixout", opt_class=torch.optim.SGD))
    try:
        with pytest.raises(ValueError, match="already has an optimizer named 'gmixout'"):
            gtimm.register()
        assert "create_optimizer" not in registry.__dict__
    finally:
        del registry._optimizers["gmixout"]


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_groups_are_timms_split_by_gmixout_param_groups(registered, layer_decay):
    model = _model()
    opt = timm.optim.create_optimizer_v2(model, opt="gmixout", lr=LR, weight_decay=WD, layer_decay=layer_decay,
                                         p=0.8, ema_decay=0.5, resample_every=7)
    plain = timm.optim.create_optimizer_v2(model, opt="adamw", lr=LR, weight_decay=WD, layer_decay=layer_decay)
    assert isinstance(opt, GMixoutOptimizer) and type(opt.inner) is torch.optim.AdamW
    assert (opt.defaults["p"], opt.defaults["ema_decay"], opt.defaults["resample_every"]) == (0.8, 0.5, 7)
    sparse = {id(t) for g in opt.param_groups if g["gmixout"] for t in g["params"]}
    assert sparse == _gmixout_ids(model) and len(sparse) == 9  # 2 blocks x (qkv, proj, fc1, fc2) + patch conv
    assert _per_tensor(opt) == _per_tensor(plain)  # timm's weight decay and lr_scale, tensor by tensor
    if layer_decay is not None:
        assert len({g["lr_scale"] for g in opt.param_groups if g["gmixout"]}) == 3  # embed + 2 blocks


def test_gmixout_sgd_has_sgd_inside_with_timms_sgd_defaults(registered):
    model = _model()
    opt = timm.optim.create_optimizer_v2(model, opt="gmixout_sgd", lr=LR, weight_decay=WD, resample_every=5)
    plain = timm.optim.create_optimizer_v2(model, opt="sgd", lr=LR, weight_decay=WD)
    assert isinstance(opt, GMixoutOptimizer) and type(opt.inner) is torch.optim.SGD
    assert {id(t) for g in opt.param_groups if g["gmixout"] for t in g["params"]} == _gmixout_ids(model)
    assert _per_tensor(opt) == _per_tensor(plain)
    for g in opt.param_groups:
        assert (g["momentum"], g["nesterov"]) == (plain.param_groups[0]["momentum"], True)
        assert g["resample_every"] == 5


def test_trains_bitwise_like_a_hand_built_optimizer_with_layer_decay(registered):
    """timm factory + timm scheduler (applies lr_scale) vs the same groups built by hand."""
    model, ref_model = _model(), _model()
    kw = dict(p=0.7, ema_decay=0.3, resample_every=3)
    opt = timm.optim.create_optimizer_v2(model, opt="gmixout", lr=LR, weight_decay=WD, layer_decay=0.75, **kw)

    timm_groups = timm.optim.param_groups_layer_decay(ref_model, weight_decay=WD, layer_decay=0.75,
                                                      no_weight_decay_list=ref_model.no_weight_decay())
    sparse = _gmixout_ids(ref_model)
    by_hand = []
    for g in timm_groups:
        by_hand.append({**g, "params": [t for t in g["params"] if id(t) in sparse], "gmixout": True})
        by_hand.append({**g, "params": [t for t in g["params"] if id(t) not in sparse], "gmixout": False})
    ref = GMixoutOptimizer([g for g in by_hand if g["params"]], inner="AdamW", lr=LR, weight_decay=0.0, **kw)

    scheds = [timm.scheduler.CosineLRScheduler(o, t_initial=8, warmup_t=2, warmup_lr_init=1e-4, t_in_epochs=False)
              for o in (opt, ref)]
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(7)]
    for step, (x, y) in enumerate(data):  # 7 steps: two full episodes of 3 and one running
        for m, o, s in ((model, opt, scheds[0]), (ref_model, ref, scheds[1])):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
            s.step_update(step + 1)
    lrs = {g["lr"] for g in opt.param_groups if g["gmixout"]}
    assert len(lrs) == 3, "the scheduler's lr_scale must reach the GMixout groups"
    start = _model().state_dict()
    for (name, got), want in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(got, want), name
    moved = max((model.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-3
    opt.finalize()
    ref.finalize()
    for (name, got), want in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(got, want), f"{name} after finalize"


def test_bad_gmixout_values_get_the_constructors_error(registered):
    model = _model()
    with pytest.raises(ValueError, match=r"p .*must be a float in \[0, 1\).*got 1.5"):
        timm.optim.create_optimizer_v2(model, opt="gmixout", p=1.5)
    with pytest.raises(ValueError, match=r"resample_every .*must be an int"):
        timm.optim.create_optimizer_v2(model, opt="gmixout_sgd", resample_every=0.5)
    with pytest.raises(ValueError, match=r"does not accept \['pp'\]") as from_timm:
        timm.optim.create_optimizer_v2(model, opt="gmixout", pp=0.9)
    with pytest.raises(ValueError) as from_constructor:
        GMixoutOptimizer(model.parameters(), inner="AdamW", pp=0.9)
    assert str(from_timm.value) == str(from_constructor.value)
    with pytest.raises(ValueError, match="Lookahead"):
        timm.optim.create_optimizer_v2(model, opt="lookahead_gmixout")


def test_groups_that_say_gmixout_are_kept_as_given(registered):
    model = _model()

    def all_dense_but_fc2(m):  # a param_group_fn that decides itself
        fc2 = [blk.mlp.fc2.weight for blk in m.blocks]
        rest = [t for t in m.parameters() if all(t is not f for f in fc2)]
        return [{"params": fc2, "gmixout": True}, {"params": rest, "gmixout": False, "weight_decay": 0.0}]

    opt = timm.optim.create_optimizer_v2(model, opt="gmixout", lr=LR, param_group_fn=all_dense_but_fc2)
    assert [g["gmixout"] for g in opt.param_groups] == [True, False]
    assert {id(t) for t in opt.param_groups[0]["params"]} == {id(b.mlp.fc2.weight) for b in model.blocks}


def test_param_groups_instead_of_a_model(registered):
    model = _model()
    groups = gmixout_param_groups(model, weight_decay=WD)
    opt = timm.optim.create_optimizer_v2(groups, opt="gmixout", lr=LR)
    assert [g["gmixout"] for g in opt.param_groups] == [g["gmixout"] for g in groups]
    with pytest.raises(ValueError, match="need to know which tensors GMixout trains"):
        timm.optim.create_optimizer_v2(list(model.parameters()), opt="gmixout", lr=LR)
