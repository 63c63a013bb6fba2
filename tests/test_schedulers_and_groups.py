"""Learning-rate schedulers on the wrapper, gmixout_param_groups on timm/torchvision-like
models, per-group overrides, dense groups, and the engine-facing shape of param_groups."""
import math

import pytest
import torch
from torch import nn

from gmixout_optim import GMixoutOptimizer, gmixout_param_groups


def live_support(opt, w):
    s = opt.state[w]["support"]
    return s[s >= 0].long()


def set_grads(params, t):
    g = torch.Generator().manual_seed(500 + t)
    for w in params:
        w.grad = torch.randn(w.shape, generator=g).to(w.dtype)


def make(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


# ----------------------------------------------------------------------------- schedulers
SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=8,
                                                             cycle_momentum=False),
    "warmup_then_cosine": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4)], milestones=[2]),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_schedulers_drive_the_inner_optimizer(name):
    """Plain SGD on both: the dense group moves by -lr_t g, the GMixout support by
    -lr_t g[S] / keep^2 (v -= lr g[S]/keep; W = A + v/keep), with the scheduler's lr_t."""
    p, keep = 0.5, 0.5
    sparse, dense = make([(20, 10), (10,)])
    opt = GMixoutOptimizer([{"params": [sparse]}, {"params": [dense], "gmixout": False}], inner="SGD",
                           p=p, resample_every=100, lr=0.1, momentum=0.0)
    # OneCycleLR cycles "momentum" too: it must find it in the (forwarded) param groups
    sched = SCHEDULERS[name](opt)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.0)
    ref_sched = SCHEDULERS[name](ref_opt)
    for t in range(6):
        lr = opt.param_groups[0]["lr"]
        assert lr == ref_opt.param_groups[0]["lr"] and opt.param_groups[1]["lr"] == lr
        set_grads([sparse, dense], t)
        s_before, d_before = sparse.detach().clone().view(-1), dense.detach().clone()
        g_s, g_d = sparse.grad.clone().view(-1), dense.grad.clone()
        opt.step()
        sched.step()
        ref_opt.step()
        ref_sched.step()
        S = live_support(opt, sparse)
        torch.testing.assert_close(dense.detach(), d_before - lr * g_d, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sparse.detach().view(-1)[S], s_before[S] - lr * g_s[S] / keep ** 2,
                                   atol=2e-6, rtol=1e-6)
    assert opt.param_groups[0]["lr"] != 0.1 or name == "onecycle"
    # the scheduler checkpoints as with any optimizer
    sd = sched.state_dict()
    assert sd["last_epoch"] == 6


def test_one_cycle_cycles_the_inner_betas():
    opt = GMixoutOptimizer(make([(8, 8)]), inner="AdamW", p=0.5, lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=5)  # needs defaults["betas"]
    beta0 = opt.param_groups[0]["betas"][0]
    set_grads(opt.param_groups[0]["params"], 0)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["betas"][0] != beta0
    assert opt.inner.param_groups[0]["betas"][0] == opt.param_groups[0]["betas"][0]


def test_reduce_lr_on_plateau_and_scheduler_resume():
    params = make([(8, 8)])
    opt = GMixoutOptimizer(params, inner="AdamW", p=0.5, lr=1e-2)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for t in range(3):
        set_grads(params, t)
        opt.step()
        plateau.step(1.0)  # constant metric: halves the lr after the first epoch
    assert math.isclose(opt.param_groups[0]["lr"], 1e-2 * 0.25)
    # resume: a fresh optimizer + scheduler take the lr from the checkpoints
    fresh = GMixoutOptimizer(make([(8, 8)]), inner="AdamW", p=0.5, lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    fresh_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(fresh, patience=0, factor=0.5)
    fresh_plateau.load_state_dict(plateau.state_dict())
    assert math.isclose(fresh.param_groups[0]["lr"], 1e-2 * 0.25)


# ----------------------------------------------------------------------------- param groups
class TinyViT(nn.Module):
    """timm's layout: patch_embed.proj (Conv), cls_token, pos_embed, blocks of
    norm/attn.qkv/attn.proj/norm/mlp.fc1/mlp.fc2, final norm, head."""

    def __init__(self, dim=16, depth=2, classes=5):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(b)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)


class TinyResNet(nn.Module):
    """torchvision's layout: conv1/bn1, layer1 with convs and BNs, fc head; plus an embedding."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8))
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)


def _split(model, groups):
    names = {id(t): n for n, t in model.named_parameters()}
    listed = [names[id(t)] for g in groups for t in g["params"]]
    assert sorted(listed) == sorted(names.values()), "every parameter exactly once"
    gm = {names[id(t)] for g in groups if g.get("gmixout", True) for t in g["params"]}
    wd = {names[id(t)]: g["weight_decay"] for g in groups for t in g["params"]}
    return gm, wd


def test_param_groups_on_a_timm_like_vit():
    model = TinyViT()
    gm, wd = _split(model, gmixout_param_groups(model, weight_decay=0.05))
    expect = {"patch_embed.proj.weight"} | {f"blocks.{i}.{m}.weight" for i in range(2)
                                             for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert gm == expect, "GMixout: Linear/Conv weights outside the head; dense: the rest"
    for name, decay in wd.items():
        t = dict(model.named_parameters())[name]
        if t.ndim <= 1:
            assert decay == 0.0, f"{name}: no weight decay on 1-D tensors"
        elif name in expect:
            assert decay == 0.05, name
    assert "head.weight" not in gm and "cls_token" not in gm and "pos_embed" not in gm


def test_param_groups_on_real_timm_and_torchvision_models():
    import timm  # no weights are loaded: architectures only
    import torchvision as tv

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    gm, wd = _split(vit, gmixout_param_groups(vit, weight_decay=0.05))
    assert gm == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                  "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"}
    assert wd["cls_token"] == 0.0 and wd["pos_embed"] == 0.0  # timm's no_weight_decay()
    assert wd["head.bias"] == 0.0 and wd["norm.weight"] == 0.0
    resnet = tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3)
    gm, wd = _split(resnet, gmixout_param_groups(resnet, weight_decay=0.05))
    convs = {n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)}
    assert gm == {f"{n}.weight" for n in convs}, "fc is the head: dense"
    assert all(wd[n] == 0.0 for n, t in resnet.named_parameters() if t.ndim == 1)


def test_param_groups_head_names_embeddings_and_overrides():
    model = TinyResNet()
    gm, wd = _split(model, gmixout_param_groups(model, weight_decay=0.1))
    assert gm == {"conv1.weight", "layer1.0.weight"}
    assert "embed.weight" not in gm and "fc.weight" not in gm
    gm, _ = _split(model, gmixout_param_groups(model, head_names=["layer1"]))
    assert gm == {"conv1.weight", "fc.weight"}
    groups = gmixout_param_groups(model, p=0.8, ema_decay=0.5, resample_every=7)
    sparse = [g for g in groups if g["gmixout"]]
    assert len(sparse) == 1 and (sparse[0]["p"], sparse[0]["ema_decay"], sparse[0]["resample_every"]) == (0.8, 0.5, 7)
    opt = GMixoutOptimizer(groups, inner="AdamW", p=0.9, resample_every=50, lr=1e-3)
    assert opt.param_groups[0]["resample_every"] == 7


def test_per_group_overrides_of_p_ema_decay_resample_every():
    big_a, big_b, frozen = ps = make([(100, 100), (100, 100), (30,)])
    frozen_start = frozen.detach().clone()
    opt = GMixoutOptimizer([{"params": [big_a], "p": 0.8, "resample_every": 2},
                            {"params": [big_b]},
                            {"params": [frozen], "p": 0.0, "ema_decay": 1.0, "resample_every": 3}],
                           inner="SGD", p=0.5, ema_decay=0.3, resample_every=5, lr=0.1)
    for t in range(6):
        set_grads(ps, t)
        opt.step()
        if t == 0:
            for w, keep in ((big_a, 0.2), (big_b, 0.5)):
                n = live_support(opt, w).numel()
                assert abs(n - 1e4 * keep) <= 6 * math.sqrt(1e4 * keep * (1 - keep)), (n, keep)
    assert (opt.state[big_a]["episode"], opt.state[big_a]["episode_step"]) == (3, 0)
    assert (opt.state[big_b]["episode"], opt.state[big_b]["episode_step"]) == (1, 1)
    assert (opt.state[frozen]["episode"], opt.state[frozen]["episode_step"]) == (2, 0)
    # ema_decay=1 with p=0: after whole episodes the anchor is where it started (fp32 rounding)
    torch.testing.assert_close(frozen.detach(), frozen_start, atol=2e-6, rtol=0)


@pytest.mark.parametrize("inner, kw", [("AdamW", dict(lr=1e-2, weight_decay=0.05)),
                                       ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                       ("Adam", dict(lr=1e-2, amsgrad=True))])
def test_dense_groups_train_exactly_like_the_plain_inner_optimizer(inner, kw):
    dense_g = make([(12, 6), (6,)])
    sparse_g = make([(10, 10)], seed=1)
    plain = make([(12, 6), (6,)])
    opt = GMixoutOptimizer([{"params": sparse_g}, {"params": dense_g, "gmixout": False}], inner=inner,
                           p=0.6, resample_every=2, **kw)
    ref = getattr(torch.optim, inner)(plain, **kw)
    for t in range(7):
        set_grads(dense_g + sparse_g, t)
        set_grads(plain, t)
        opt.step()
        ref.step()
    for a, b in zip(dense_g, plain):
        assert torch.equal(a, b), "a dense group must be the plain inner optimizer, bitwise"
        for key, val in ref.state[b].items():
            assert torch.equal(opt.state[a][key], val), key


def test_param_groups_reassignment_as_deepspeed_does_it():
    """ZeRO-1/2 assigns `optimizer.param_groups = [group]`, steps, and restores, once per group.
    A tensor's support key is fixed when its state is first created, so once the state exists
    (here from an init step through the full list) this equals a normal step. (Before that,
    the default key would be the position in the one-group list: under ZeRO the DeepSpeed
    integration's locator supplies the keys.)"""
    def run(reassign):
        ps = make([(20, 10), (20, 10), (10,)])
        opt = GMixoutOptimizer([{"params": ps[:1]}, {"params": ps[1:2], "p": 0.7},
                                {"params": ps[2:], "gmixout": False}],
                               inner="AdamW", p=0.5, resample_every=2, lr=1e-2)
        for w in ps:
            w.grad = torch.zeros_like(w)
        opt.step()  # init-only step with the full list
        for t in range(5):
            set_grads(ps, t)
            if reassign:
                full = opt.param_groups
                for group in list(full):
                    opt.param_groups = [group]
                    opt.step()
                opt.param_groups = full
                assert opt.param_groups is full
            else:
                opt.step()
        return ps, opt

    pa, oa = run(True)
    pb, ob = run(False)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    assert oa.state[pa[0]]["episode"] == 2 and oa.state[pa[0]]["episode_step"] == 1


def test_empty_groups_and_gradless_steps_change_and_count_nothing():
    ps = make([(10, 10), (10,)])
    opt = GMixoutOptimizer([{"params": []}, {"params": ps[:1]}, {"params": [], "gmixout": False},
                            {"params": ps[1:], "gmixout": False}], inner="AdamW", p=0.5, lr=1e-2)
    opt.step()  # no gradients at all
    assert len(opt.state) == 0
    set_grads(ps, 0)
    opt.step()
    before = [w.detach().clone() for w in ps]
    counters = (opt.state[ps[0]]["episode"], opt.state[ps[0]]["episode_step"])
    steps = opt.state[ps[1]]["step"].clone()
    opt.zero_grad()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    assert (opt.state[ps[0]]["episode"], opt.state[ps[0]]["episode_step"]) == counters
    assert torch.equal(opt.state[ps[1]]["step"], steps)
    # ZeRO-3 between sub-group steps: every group's list is empty
    saved = [g["params"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["params"] = []
    opt.step()
    for g, s in zip(opt.param_groups, saved):
        g["params"] = s
    assert (opt.state[ps[0]]["episode"], opt.state[ps[0]]["episode_step"]) == counters


def test_all_zero_grad_first_step_is_init_only_for_dense_groups_too():
    ps = make([(10, 10), (10,)])
    plain = make([(10, 10), (10,)])
    opt = GMixoutOptimizer([{"params": ps[:1]}, {"params": ps[1:], "gmixout": False}],
                           inner="AdamW", p=0.5, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(plain[1:], lr=1e-2, weight_decay=0.1)
    for w in ps:
        w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(ps[1], plain[1]), "the init step must not decay or move a dense weight"
    assert opt.state[ps[1]]["step"] == 0
    for t in range(3):
        set_grads(ps, t)
        set_grads(plain, t)
        opt.step()
        ref.step()
    assert torch.equal(ps[1], plain[1])
