"""Optimizer-level GMixout == module-level GMixout, trained on the same model, data and supports.

Three runs of the same small model (Conv + BatchNorm + Linear + LayerNorm) on the same
batches, >= 3 episodes plus a partial one:
  1. ``GMixoutOptimizer``: the parameters hold W, the optimizer keeps the compact state.
  2. ``SupportFedReference`` (below, written for this test from the spec only): the authors'
     layer, W = A + scatter(S, v)/keep built in the forward pass by ``functional_call``, the
     residual ``v`` the only trainable tensor of a GMixout weight (autograd gives
     grad_v = grad_W[S]/keep), fed with the supports that run 1 drew.
  3. ``gmixout_optim.reference.GMixoutReference``, which draws the supports itself (checks
     that the optimizer keys tensors the way the library's reference says).
After every step the training weights, dense parameters and BatchNorm statistics must agree;
after ``finalize`` the anchors must agree.

Tolerance (fp32): the runs differ only by rounding. Run 1 re-derives A[S] = w[S] - v/keep and
rewrites w[S] = A[S] + v/keep each step (<= 2 roundings of |w| < 1: 1.2e-7); runs 2/3 round
A + v/keep once. These differences change the next gradients by relative ~1e-6, and SGD/AdamW
turn that into update differences <= lr * 1e-6 per step. Over 14 steps that is ~14 * (1.2e-7
+ 1e-2 * 1e-6) ~ 2e-6; we allow atol = 5e-6 with rtol = 1e-5 (the largest difference
measured over all 12 cases is 4.3e-7, torch 2.14.1 CPU). The test checks that this tolerance discriminates: the two merge rules, which
differ by the factor 1/keep in the merge, give weights that differ by > 100x the tolerance.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gmixout_optim import GMixoutOptimizer
from gmixout_optim.reference import GMixoutReference

P, LAM, K, EPISODES, EXTRA = 0.6, 0.3, 4, 3, 2
STEPS = K * EPISODES + EXTRA
ATOL, RTOL = 5e-6, 1e-5
INNERS = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)  # a bias before BN has a ~0 gradient that AdamW would amplify
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 24)
        self.ln = nn.LayerNorm(24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(F.relu(self.ln(self.fc1(x))))


GM_NAMES = ["conv.weight", "fc1.weight", "fc2.weight"]


def data():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g))
            for _ in range(STEPS)]


def fresh_model():
    torch.manual_seed(3)
    return Small()


def map_state(state, old_S, new_S, policy):
    """Inner state of a residual across a redraw, as docs/DESIGN.md describes the three policies."""
    if policy == "reset":
        return {}
    out = {}
    for key, val in state.items():
        if not (torch.is_tensor(val) and val.dim() == 1 and val.numel() == old_S.numel()):
            out[key] = val.clone() if torch.is_tensor(val) else val  # e.g. AdamW's step counter
            continue
        new = torch.zeros(new_S.numel(), dtype=val.dtype)
        if policy == "carry":  # the compact vector as it is
            m = min(old_S.numel(), new_S.numel())
            new[:m] = val[:m]
        else:  # remap: coordinates present in both supports keep their state
            where = {int(i): j for j, i in enumerate(old_S)}
            for j, i in enumerate(new_S.tolist()):
                if i in where:
                    new[j] = val[where[i]]
        out[key] = new
    return out


class SupportFedReference:
    """GMixout as a layer: W = A + scatter(S, v)/keep in the forward; v is trained."""

    def __init__(self, model, names, inner_cls, hp, keep, coeff, policy):
        self.model, self.names, self.keep, self.coeff, self.policy = model, names, keep, coeff, policy
        self.inner_cls, self.hp = inner_cls, hp
        params = dict(model.named_parameters())
        self.anchor = {n: params[n].detach().clone() for n in names}
        for n in names:
            params[n].requires_grad_(False)
        self.dense_opt = inner_cls([q for n, q in params.items() if n not in names], **hp)
        self.S, self.v, self.res_opt = {}, {}, None

    def begin(self, supports):
        new_v = {n: torch.zeros(supports[n].numel(), requires_grad=True) for n in self.names}
        res_opt = self.inner_cls(list(new_v.values()), **self.hp)
        if self.res_opt is not None:
            for n in self.names:
                old = self.res_opt.state.get(self.v[n], {})
                res_opt.state[new_v[n]] = map_state(old, self.S[n], supports[n], self.policy)
        self.S, self.v, self.res_opt = dict(supports), new_v, res_opt

    def weights(self):
        return {n: self.anchor[n].reshape(-1).index_add(0, self.S[n], self.v[n] / self.keep)
                .view_as(self.anchor[n]) for n in self.names}

    def train_step(self, x, y):
        self.res_opt.zero_grad()
        self.dense_opt.zero_grad()
        F.cross_entropy(functional_call(self.model, self.weights(), (x,)), y).backward()
        self.res_opt.step()
        self.dense_opt.step()

    @torch.no_grad()
    def end(self):
        for n in self.names:
            self.anchor[n].view(-1)[self.S[n]] += self.coeff * self.v[n]


def groups_of(model):
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in GM_NAMES]},
            {"params": [q for n, q in params.items() if n not in GM_NAMES], "gmixout": False}]


def run_optimizer(inner, merge, policy):
    inner_cls, hp = INNERS[inner]
    model = fresh_model()
    opt = GMixoutOptimizer(groups_of(model), inner=inner_cls, p=P, ema_decay=LAM, resample_every=K,
                           merge=merge, state_policy=policy, seed=11, **hp)
    named = dict(model.named_parameters())
    supports, trace = {}, []
    for x, y in data():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n in GM_NAMES:
            st = opt.state[named[n]]
            s = st["support"]
            supports.setdefault(st["episode"], {})[n] = s[s >= 0].long().clone()
        trace.append(copy.deepcopy(model.state_dict()))
    opt.finalize()
    return supports, trace, copy.deepcopy(model.state_dict())


def assert_states_close(a, b, what):
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} {key}: {m}")
        else:
            assert torch.equal(a[key], b[key]), f"{what} {key}"


def module_state(model, weights):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd.update({n: w.detach().clone() for n, w in weights.items()})
    return sd


@pytest.mark.parametrize("policy", ["remap", "carry", "reset"])
@pytest.mark.parametrize("merge", ["ema", "residual"])
@pytest.mark.parametrize("inner", sorted(INNERS))
def test_optimizer_level_equals_module_level(inner, merge, policy):
    keep = 1 - P
    coeff = (1 - LAM) / keep if merge == "ema" else (1 - LAM)
    supports, trace, final = run_optimizer(inner, merge, policy)
    assert len(supports) == EPISODES + 1

    inner_cls, hp = INNERS[inner]
    # 2: the layer-level reference written here, fed with the optimizer's supports
    mine = SupportFedReference(fresh_model(), GM_NAMES, inner_cls, hp, keep, coeff, policy)
    # 3: the library's module-level reference (draws its supports from the same RNG)
    lib = GMixoutReference(fresh_model(), GM_NAMES, lambda g: inner_cls(g, **hp), p=P, ema_decay=LAM,
                           resample_every=K, merge=merge, state_policy=policy, seed=11)
    mine.begin(supports[0])
    for t, (x, y) in enumerate(data()):
        for n in GM_NAMES:  # same supports as the optimizer drew for this episode
            assert torch.equal(lib.supports[n], supports[t // K][n]), f"step {t + 1}: support of {n}"
        mine.train_step(x, y)
        lib.zero_grad()
        F.cross_entropy(lib(x), y).backward()
        lib.step()
        if (t + 1) % K == 0:
            mine.end()
            ref_state = module_state(mine.model, mine.anchor)
            mine.begin(supports[(t + 1) // K])
        else:
            ref_state = module_state(mine.model, mine.weights())
        assert_states_close(trace[t], ref_state, f"step {t + 1}, optimizer vs layer reference:")
        assert_states_close(trace[t], module_state(lib.model, lib.training_weights()),
                            f"step {t + 1}, optimizer vs GMixoutReference:")
    mine.end()
    lib.finalize()
    assert_states_close(final, module_state(mine.model, mine.anchor), "finalized anchor (layer reference):")
    assert_states_close(final, lib.model.state_dict(), "finalized anchor (GMixoutReference):")


@pytest.mark.parametrize("inner, merge, policy", [("adamw", "ema", "remap"), ("adamw", "residual", "carry"),
                                                  ("sgd_momentum", "ema", "reset")])
def test_triton_kernels_equal_module_level(inner, merge, policy, monkeypatch):
    """The same check through the Triton kernels (the fused AdamW step, the support draw,
    gather/write/merge), run by Triton's interpreter on CPU (TRITON_INTERPRET=1, tests/conftest.py)."""
    from gmixout_optim import grouped, kernels, step

    calls = []
    fused = step.TRITON.fused_adamw_step  # the resolver's Triton implementations (gmixout_optim.step)
    monkeypatch.setattr(step, "TRITON", step.TRITON._replace(
        fused_adamw_step=lambda *a, **kw: calls.append(1) or fused(*a, **kw)))
    # the grouped step (gmixout_optim.grouped) takes every fused tensor after the first step
    fused_grouped = grouped.fused_adamw_step_grouped
    monkeypatch.setattr(grouped, "fused_adamw_step_grouped",
                        lambda *a, **kw: calls.append(1) or fused_grouped(*a, **kw))
    before = kernels.get_backend()
    kernels.set_backend("triton")
    try:
        test_optimizer_level_equals_module_level(inner, merge, policy)
    finally:
        kernels.set_backend(before)
    assert (len(calls) > 0) == (inner == "adamw"), "the fused AdamW kernel must have run"


def test_tolerance_discriminates_merge_rules():
    """The tolerance above is tight enough to see a wrong merge coefficient."""
    for inner in INNERS:
        _, _, ema = run_optimizer(inner, "ema", "remap")
        _, _, res = run_optimizer(inner, "residual", "remap")
        diff = max((ema[n] - res[n]).abs().max().item() for n in GM_NAMES)
        assert diff > 100 * ATOL, (inner, diff)
