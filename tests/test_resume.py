"""Stop inside an episode, checkpoint, rebuild from scratch, load, continue: the run must be
bitwise equal to the uninterrupted one (CPU), and every state tensor keeps its dtype
(support indices stay integers, the residual stays fp32, a 16-bit anchor stays 16-bit)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmixout_optim import GMixoutOptimizer
from optim_testing import assert_same, through_bytes

K, STOP, TOTAL = 4, 6, 13  # stop at episode 1, step 2; continue across two more boundaries
INNERS = {
    "sgd_momentum": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": ("AdamW", dict(lr=1e-2, weight_decay=1e-2)),
}


def make_model(dtype, init_seed):
    torch.manual_seed(init_seed)
    return nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def make_opt(model, inner, policy, merge="ema"):
    name, hp = INNERS[inner]
    m = list(model.children())
    groups = [{"params": [m[0].weight, m[3].weight]},
              {"params": [m[0].bias, m[1].weight, m[1].bias, m[3].bias], "gmixout": False}]
    return GMixoutOptimizer(groups, inner=name, p=0.7, ema_decay=0.3, resample_every=K, merge=merge,
                            state_policy=policy, seed=5, **hp)


def batch(t, dtype):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 10, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)


def train(model, opt, steps, dtype):
    for t in steps:
        x, y = batch(t, dtype)
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()


def check_dtypes(opt, model, dtype):
    gm = [list(model.children())[i].weight for i in (0, 3)]
    for w in gm:
        st = opt.state[w]
        assert type(st["episode"]) is int and type(st["episode_step"]) is int
        assert st["support"].dtype == torch.int32, "support indices must stay integers"
        assert st["residual"].dtype == torch.float32
        if dtype == torch.bfloat16:
            assert st["anchor"].dtype == torch.bfloat16
        for key, val in opt.state[st["residual"]].items():
            if torch.is_tensor(val) and val.dim() == 1:
                assert val.dtype == torch.float32, key


@pytest.mark.parametrize("via_bytes", [True, False])
@pytest.mark.parametrize("policy", ["remap", "carry", "reset"])
@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_inside_an_episode_is_bitwise(dtype, inner, policy, via_bytes):
    full = make_model(dtype, 0)
    full_opt = make_opt(full, inner, policy)
    train(full, full_opt, range(TOTAL), dtype)

    part = make_model(dtype, 0)
    part_opt = make_opt(part, inner, policy)
    train(part, part_opt, range(STOP), dtype)
    assert part_opt.state[list(part.children())[0].weight]["episode_step"] == STOP % K != 0
    ckpt = {"model": part.state_dict(), "opt": part_opt.state_dict()}
    ckpt = through_bytes(ckpt) if via_bytes else copy.deepcopy(ckpt)
    del part, part_opt

    resumed = make_model(dtype, 1)  # another init: everything must come from the checkpoint
    resumed_opt = make_opt(resumed, inner, policy)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    check_dtypes(resumed_opt, resumed, dtype)
    train(resumed, resumed_opt, range(STOP, TOTAL), dtype)

    assert_same(full.state_dict(), resumed.state_dict(), "model")
    assert_same(full_opt.state_dict(), resumed_opt.state_dict(), "optimizer")
    check_dtypes(resumed_opt, resumed, dtype)
    # and the run goes on identically through finalize
    full_opt.finalize()
    resumed_opt.finalize()
    assert_same(full.state_dict(), resumed.state_dict(), "finalized model")


@pytest.mark.parametrize("stop", [0, K, K + 1])
def test_resume_at_edges(stop):
    """Before any step (empty state), exactly at a boundary, and one step into an episode;
    with the residual merge rule and a tensor that has no gradient yet."""
    dtype = torch.float32

    def run(model, opt, steps):
        for t in steps:
            x, y = batch(t, dtype)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if t < K + 2:  # the last layer's weight only starts training later
                list(model.children())[3].weight.grad = None
            opt.step()

    full = make_model(dtype, 0)
    full_opt = make_opt(full, "adamw", "remap", merge="residual")
    run(full, full_opt, range(TOTAL))
    part = make_model(dtype, 0)
    part_opt = make_opt(part, "adamw", "remap", merge="residual")
    run(part, part_opt, range(stop))
    ckpt = through_bytes({"model": part.state_dict(), "opt": part_opt.state_dict()})
    resumed = make_model(dtype, 1)
    resumed_opt = make_opt(resumed, "adamw", "remap", merge="residual")
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    run(resumed, resumed_opt, range(stop, TOTAL))
    assert_same(full.state_dict(), resumed.state_dict(), "model")
    assert_same(full_opt.state_dict(), resumed_opt.state_dict(), "optimizer")


def test_resume_after_consolidate():
    """consolidate() leaves a portable checkpoint; resuming from it continues the same run."""
    dtype = torch.float32
    full = make_model(dtype, 0)
    full_opt = make_opt(full, "sgd_momentum", "carry")
    train(full, full_opt, range(STOP), dtype)
    full_opt.consolidate()
    ckpt = through_bytes({"model": full.state_dict(), "opt": full_opt.state_dict()})
    train(full, full_opt, range(STOP, TOTAL), dtype)
    resumed = make_model(dtype, 1)
    resumed_opt = make_opt(resumed, "sgd_momentum", "carry")
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    train(resumed, resumed_opt, range(STOP, TOTAL), dtype)
    assert_same(full.state_dict(), resumed.state_dict(), "model")
    assert_same(full_opt.state_dict(), resumed_opt.state_dict(), "optimizer")


def test_checkpoint_from_the_triton_path_resumes_on_the_torch_path():
    """DESIGN.md: the fused Triton AdamW step keeps the inner state in torch AdamW's layout, so a
    GPU checkpoint resumes on CPU. Here the Triton kernels run in the interpreter
    (TRITON_INTERPRET=1, tests/conftest.py). Kernel and torch AdamW round differently, so the
    comparison with an all-torch run is to fp32 rounding (13 steps of updates <= 1e-2 on weights
    < 1: differences ~1e-7 that the training does not amplify at this size; tolerance 1e-5)."""
    from gmixout_optim import kernels

    dtype = torch.float32
    full = make_model(dtype, 0)
    full_opt = make_opt(full, "adamw", "remap")
    train(full, full_opt, range(TOTAL), dtype)

    before = kernels.get_backend()
    kernels.set_backend("triton")
    try:
        part = make_model(dtype, 0)
        part_opt = make_opt(part, "adamw", "remap")
        train(part, part_opt, range(STOP), dtype)
        ckpt = through_bytes({"model": part.state_dict(), "opt": part_opt.state_dict()})
    finally:
        kernels.set_backend(before)
    resumed = make_model(dtype, 1)
    resumed_opt = make_opt(resumed, "adamw", "remap")
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    check_dtypes(resumed_opt, resumed, dtype)
    train(resumed, resumed_opt, range(STOP, TOTAL), dtype)
    for key, val in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], val, atol=1e-5, rtol=1e-5, msg=key)
    for w_full, w_res in zip(full.parameters(), resumed.parameters()):
        if w_full in full_opt.state and "support" in full_opt.state[w_full]:
            assert torch.equal(full_opt.state[w_full]["support"], resumed_opt.state[w_res]["support"])
