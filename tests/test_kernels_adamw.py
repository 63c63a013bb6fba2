"""fused_adamw_step: Triton against the PyTorch reference, and the reference against torch.optim."""
import pytest
import torch

from gmixout_optim.kernels import adamw
from gmixout_optim.kernels.gather import gather_grad
from gmixout_optim.kernels.support import Segment, draw_support_torch, support_capacity
from gmixout_optim.kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KEEP = 0.5
STEPS = 3
HP = dict(lr=1e-3, beta2=0.999, eps=1e-8)


def _setup(numel, dtype, gen):
    big = torch.randn(numel + 9, generator=gen).to(DEVICE, dtype)
    cap = support_capacity(numel, KEEP)
    support, n = draw_support_torch([Segment(0, numel, 0, 0)], 1, 0, KEEP, cap, DEVICE)
    anchor = big[support[:n].long() + 5].clone() if dtype != torch.float32 else None
    state = [torch.zeros(cap, device=DEVICE) for _ in range(3)]  # residual, exp_avg, exp_avg_sq
    return big, support, n, anchor, state


@pytest.mark.parametrize("numel", [0, 1, 40001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled,wd", [(True, 0.05), (False, 0.05), (True, 0.0)])
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # 1-beta1 < 0.5 and >= 0.5: both lerp branches
def test_triton_step_equals_torch(numel, dtype, decoupled, wd, beta1):
    gen = torch.Generator().manual_seed(numel)
    big, support, n, anchor, state = _setup(numel, dtype, gen)
    ref_big, ref_state = big.clone(), [t.clone() for t in state]
    for step in range(1, STEPS + 1):
        grad = torch.randn(numel, generator=gen).to(DEVICE, dtype)
        kw = dict(HP, step=step, beta1=beta1, weight_decay=wd, decoupled=decoupled, keep=KEEP)
        adamw.fused_adamw_step_torch(ref_big[5:5 + numel], grad, support, n, *ref_state, anchor, **kw)
        adamw.fused_adamw_step_triton(big[5:5 + numel], grad, support, n, *state, anchor, **kw)
        for name, out, ref in zip(("residual", "exp_avg", "exp_avg_sq"), state, ref_state):
            assert_close(out, ref, "adam_state", f"{name} after step {step}")
        assert_close(big, ref_big, "adam_weights", f"weights after step {step}")
    if n:
        assert ref_state[0][:n].abs().min() > 0, "every residual entry must have moved"


@pytest.mark.parametrize("decoupled", [True, False])
def test_reference_is_torch_adamw_on_the_residual(decoupled):
    # The PyTorch path is torch's single-tensor Adam(W) applied to v with grad_v = grad[S]/keep,
    # bit for bit, and the weights are w[S] = a + v/keep.
    gen = torch.Generator().manual_seed(0)
    numel = 3000
    w = torch.randn(numel, generator=gen)
    a_full = w.clone()
    cap = support_capacity(numel, KEEP)
    support, n = draw_support_torch([Segment(0, numel, 0, 0)], 1, 0, KEEP, cap, "cpu")
    s = support[:n].long()
    residual, m, sq = (torch.zeros(cap) for _ in range(3))
    v = torch.zeros(n, requires_grad=True)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([v], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(1, 4):
        grad = torch.randn(numel, generator=gen)
        adamw.fused_adamw_step_torch(w, grad, support, n, residual, m, sq, None, step=step, lr=1e-2,
                                     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                     decoupled=decoupled, keep=KEEP)
        v.grad = grad[s] / KEEP
        opt.step()
        st = opt.state[v]
        assert torch.equal(residual[:n], v.detach())
        assert torch.equal(m[:n], st["exp_avg"]) and torch.equal(sq[:n], st["exp_avg_sq"])
    # w[S] = A[S] + v/keep, computed from the derived anchor: within an ulp of the true one
    assert_close(w[s], a_full[s] + v.detach() / KEEP, "adam_weights", "weights vs anchor + v/keep")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_is_rejected(impl):
    fn = getattr(adamw, f"fused_adamw_step_{impl}")
    s = torch.arange(4, dtype=torch.int32)
    z = [torch.zeros(4) for _ in range(3)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, keep=0.5)
    with pytest.raises(ValueError, match="step must be"):
        fn(torch.zeros(8), torch.zeros(8), s, 4, *z, None, step=0, **kw)
    with pytest.raises(ValueError, match="grad_flat"):
        fn(torch.zeros(8), torch.zeros(9), s, 4, *z, None, step=1, **kw)
    with pytest.raises(ValueError, match="exp_avg must be fp32"):
        fn(torch.zeros(8), torch.zeros(8), s, 4, z[0], z[1].half(), z[2], None, step=1, **kw)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_found_inf_makes_the_step_a_no_op(impl, dtype):
    # The device-side skip: gather (with the check) -> fused step reading the compact gradient
    # and honouring the flag. A clean step equals the plain fused step; a step whose support
    # gradient holds an inf changes no weight, no residual and no moment.
    fn = getattr(adamw, f"fused_adamw_step_{impl}")
    numel = 40001
    gen = torch.Generator().manual_seed(3)
    big, support, n, anchor, state = _setup(numel, dtype, gen)
    ref_big, ref_state = big.clone(), [t.clone() for t in state]
    kw = dict(HP, beta1=0.9, weight_decay=0.05, decoupled=True, keep=KEEP)
    g_buf = torch.empty(support.numel(), device=DEVICE)
    for step in range(1, STEPS + 1):
        grad = torch.randn(numel, generator=gen).to(DEVICE, dtype)
        flag = torch.zeros(1, device=DEVICE)
        gather_grad(grad, support, n, KEEP, g_buf, flag)
        assert flag.item() == 0.0
        fn(big[5:5 + numel], None, support, n, *state, anchor, step=step, **kw, compact_grad=g_buf, found_inf=flag)
        adamw.fused_adamw_step_torch(ref_big[5:5 + numel], grad, support, n, *ref_state, anchor, step=step, **kw)
        for name, out, ref in zip(("residual", "exp_avg", "exp_avg_sq"), state, ref_state):
            assert_close(out, ref, "adam_state", f"{name} after clean step {step}")
        assert_close(big, ref_big, "adam_weights", f"weights after clean step {step}")
    before_big, before_state = big.clone(), [t.clone() for t in state]
    grad = torch.randn(numel, generator=gen).to(DEVICE, dtype)
    grad[support[n // 2].long()] = float("inf")
    flag = torch.zeros(1, device=DEVICE)
    gather_grad(grad, support, n, KEEP, g_buf, flag)
    assert flag.item() == 1.0
    fn(big[5:5 + numel], None, support, n, *state, anchor, step=STEPS + 1, **kw, compact_grad=g_buf, found_inf=flag)
    assert_close(big, before_big, "exact", "weights after a skipped step")
    for name, out, ref in zip(("residual", "exp_avg", "exp_avg_sq"), state, before_state):
        assert_close(out, ref, "exact", f"{name} after a skipped step")
    # the flag alone (gathering grad_flat itself) is honoured too
    fn(big[5:5 + numel], grad, support, n, *state, anchor, step=STEPS + 1, **kw, found_inf=flag)
    assert_close(big, before_big, "exact", "weights after a skipped step (no compact gradient)")


def test_torch_path_honours_a_device_flag_without_reading_it(monkeypatch):
    # On a non-CPU device the PyTorch path must not call .item() (a host sync); the blend
    # with torch.where is exercised here on CPU by pretending the flag is elsewhere.
    numel = 3000
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(numel, generator=gen)
    support, n = draw_support_torch([Segment(0, numel, 0, 0)], 1, 0, KEEP, numel, "cpu")
    state = [torch.zeros(numel) for _ in range(3)]
    grad = torch.randn(numel, generator=gen)
    kw = dict(HP, beta1=0.9, weight_decay=0.0, decoupled=True, keep=KEEP, step=1)

    class Flag(torch.Tensor):
        @property
        def device(self):
            return torch.device("meta")

        def item(self):
            raise AssertionError("host sync")

    for value, changes in ((1.0, False), (0.0, True)):
        w0, s0 = w.clone(), [t.clone() for t in state]
        flag = torch.full((1,), value).as_subclass(Flag)
        adamw.fused_adamw_step_torch(w, grad, support, n, *state, None, **kw, found_inf=flag)
        assert torch.equal(w, w0) != changes and torch.equal(state[0], s0[0]) != changes
