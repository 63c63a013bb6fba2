"""Property-based test: GMixoutOptimizer against an independent float64 model of the method.

For random shapes, dtypes, p, ema_decay, resample_every, merge rules, state policies and inner
optimizers (SGD with momentum and weight decay, AdamW), gradients are drawn by hand and fed to
both; the float64 model (``HandGMixout``) takes only the supports from the optimizer. Every step
checks the invariants of the issue and the training weights.

State policies as docs/DESIGN.md reads them: at a redraw the compact inner state becomes
  remap: entry of coordinate i in S' = old entry of i if i in S, else 0 (step counters kept)
  carry: entry j of the new compact vector = old entry j (j < min(n, n')), rest 0 (counters kept)
  reset: no state (as a fresh inner optimizer).

Tolerances (|w| <= ~5, every update <= ~0.5):
  fp32: the anchor A[S] is stored exactly; each write w[S] = A[S] + v/keep and each merge is
        one fp32 rounding of |w| (ulp(4) = 4.8e-7), v's fp32 arithmetic over <= 9 steps adds
        ~1e-7 per step; 1e-5 leaves margin.
  fp64: the residual is fp32: same bound as fp32.
  bf16/fp16: W is rounded to 16 bits (half-ulp of |w| <= 8 is <= 2^-6) and the stored anchor
        is rounded once per merge: (merges + 1) half-ulps, relative 2^-7.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from gmixout_optim import GMixoutOptimizer


def live_support(opt, w):
    s = opt.state[w]["support"]
    return s[s >= 0].long()


class HandGMixout:
    """W = A + scatter(S, v)/keep; inner step on v with grad g[S]/keep; at the end of step k
    A[S] += coeff * v, v = 0, S redrawn, inner state mapped by the policy."""

    def __init__(self, w0, keep, coeff, inner, hp, policy):
        self.A = w0.double().clone()
        self.keep, self.coeff, self.inner, self.hp, self.policy = keep, coeff, inner, hp, policy
        self.S = None
        self.v = None
        self.state = {}

    def begin(self, S):
        n = S.numel()
        if self.S is not None:
            self.state = self._map_state(self.S, S)
        self.S, self.v = S, torch.zeros(n, dtype=torch.float64)

    def _map_state(self, S_old, S_new):
        if self.policy == "reset":
            return {}
        out = {}
        for key, val in self.state.items():
            if not torch.is_tensor(val) or val.dim() == 0:
                out[key] = val
                continue
            new = torch.zeros(S_new.numel(), dtype=val.dtype)
            if self.policy == "carry":
                m = min(S_old.numel(), S_new.numel())
                new[:m] = val[:m]
            else:  # remap: follow coordinates present in both supports
                pos = torch.searchsorted(S_old, S_new)
                pos_c = pos.clamp(max=max(S_old.numel() - 1, 0))
                hit = (pos < S_old.numel()) & (S_old[pos_c] == S_new) if S_old.numel() else pos < 0
                new[hit] = val[pos_c[hit]]
            out[key] = new
        return out

    def step(self, grad_flat):
        g = grad_flat.double()[self.S] / self.keep
        hp, s, v = self.hp, self.state, self.v
        if self.inner == "SGD":
            d = g + hp["weight_decay"] * v
            buf = s.get("momentum_buffer")
            buf = d.clone() if buf is None else hp["momentum"] * buf + d
            s["momentum_buffer"] = buf
            v -= hp["lr"] * buf
        else:  # AdamW, torch's formulation
            b1, b2 = hp["betas"]
            t = s.get("step", 0) + 1
            s["step"] = t
            m = s.get("exp_avg", torch.zeros_like(v))
            q = s.get("exp_avg_sq", torch.zeros_like(v))
            v *= 1 - hp["lr"] * hp["weight_decay"]
            m = b1 * m + (1 - b1) * g
            q = b2 * q + (1 - b2) * g * g
            s["exp_avg"], s["exp_avg_sq"] = m, q
            denom = (q.sqrt() / math.sqrt(1 - b2 ** t)) + hp["eps"]
            v -= hp["lr"] / (1 - b1 ** t) * m / denom

    def weights(self):
        W = self.A.clone()
        W[self.S] += self.v / self.keep
        return W

    def merge(self):
        self.A[self.S] += self.coeff * self.v


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=3),
    p=st.one_of(st.just(0.0), st.floats(0.05, 0.9)),
    lam=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    k=st.integers(1, 4),
    steps=st.integers(1, 9),
    merge=st.sampled_from(["ema", "residual"]),
    policy=st.sampled_from(["remap", "carry", "reset"]),
    inner=st.sampled_from(["SGD", "AdamW"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    seed=st.integers(0, 2 ** 16),
)
def test_gmixout_matches_hand_model(shape_list, p, lam, k, steps, merge, policy, inner, dtype, seed):
    keep = 1.0 - p
    coeff = (1 - lam) / keep if merge == "ema" else (1 - lam)
    half = dtype.itemsize == 2  # 16-bit parameters: rounded W, stored anchor
    if inner == "SGD":
        # lr scaled by keep^2 keeps the weight change per step O(lr0) whatever p is
        hp = dict(lr=0.02 * keep * keep, momentum=0.9, weight_decay=0.01)
    else:
        hp = dict(lr=0.02 * keep, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shape_list]
    opt = GMixoutOptimizer(params, inner=inner, p=p, ema_decay=lam, resample_every=k, merge=merge,
                           state_policy=policy, seed=seed, **hp)
    hands = [HandGMixout(w.detach().reshape(-1), keep, coeff, inner, hp, policy) for w in params]
    # init-only step (all-zero gradients, empty state): makes S_0 observable even for k = 1
    for w in params:
        w.grad = torch.zeros_like(w)
    opt.step()
    for w, h in zip(params, hands):
        assert (opt.state[w]["episode"], opt.state[w]["episode_step"]) == (0, 0)
        h.begin(live_support(opt, w).clone())
    starts = [w.detach().reshape(-1).clone() for w in params]
    merges = 0
    for t in range(steps):
        for w in params:
            w.grad = torch.randn(w.shape, generator=gen).to(dtype)
        opt.step()
        boundary = (t + 1) % k == 0
        merges += boundary
        for i, (w, h) in enumerate(zip(params, hands)):
            wf = w.detach().reshape(-1)
            n_total = wf.numel()
            st_ = opt.state[w]
            assert (st_["episode"], st_["episode_step"]) == ((t + 1) // k, (t + 1) % k)
            h.step(w.grad.reshape(-1))
            off = torch.ones(n_total, dtype=torch.bool)
            off[h.S] = False
            assert torch.equal(wf[off], starts[i][off]), "off-support element changed"
            if boundary:
                h.merge()
                expect = h.A
                starts[i] = wf.clone()
            else:
                expect = h.weights()
            if not half:
                torch.testing.assert_close(wf.double(), expect, atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(wf.double(), expect, atol=(merges + 1) * 2 ** -6,
                                           rtol=2 ** -7)
            # the support of the running episode: sorted, unique, padded, within capacity
            sup = st_["support"]
            S = live_support(opt, w)
            n = S.numel()
            cap = min(n_total, math.ceil(n_total * keep + 6 * math.sqrt(n_total * keep * p)) + 16)
            assert sup.dtype == torch.int32 and sup.numel() == cap
            assert torch.all(sup[n:] == -1) and torch.all(S[1:] > S[:-1])
            assert n == 0 or (S.min() >= 0 and S.max() < n_total)
            if p == 0.0:
                assert n == n_total
            assert torch.all(st_["residual"][n:] == 0)
            if boundary:
                assert torch.all(st_["residual"] == 0)
                h.begin(S.clone())
            else:
                torch.testing.assert_close(st_["residual"][:n].double(), h.v, atol=1e-5, rtol=0)
                # the anchor is stored (every dtype): exactly the episode-start values
                assert torch.equal(st_["anchor"][:n], starts[i][S])
    # finalize merges the running episode: parameters hold the anchor
    opt.finalize()
    for w, h in zip(params, hands):
        if (steps % k) != 0:
            h.merge()
        tol = (merges + 2) * 2 ** -6 if half else 1e-5
        torch.testing.assert_close(w.detach().reshape(-1).double(), h.A, atol=tol,
                                   rtol=2 ** -7 if half else 0)
