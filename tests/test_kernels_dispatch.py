"""The backend rule: CUDA -> Triton, else PyTorch, unless set_backend forces one."""
import pytest
import torch

import gmixout_optim.kernels as K
from gmixout_optim.kernels import _dispatch, gather
from gmixout_optim.kernels.support import Segment, draw_support_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def restore_backend():
    old = K.get_backend()
    yield
    K.set_backend(old)


def test_rule(restore_backend):
    cpu = torch.zeros(1)
    K.set_backend("auto")
    assert not _dispatch.use_triton(cpu)
    if torch.cuda.is_available():
        assert _dispatch.use_triton(cpu.cuda()) == K.HAS_TRITON
    K.set_backend("torch")
    assert K.get_backend() == "torch" and not _dispatch.use_triton(torch.zeros(1, device=DEVICE))
    K.set_backend("triton")
    assert _dispatch.use_triton(torch.zeros(1, device=DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forced_backend_runs_that_implementation(restore_backend, monkeypatch, backend):
    calls = []
    for name in ("torch", "triton"):
        fn = getattr(gather, f"gather_grad_{name}")
        monkeypatch.setattr(gather, f"gather_grad_{name}",
                            lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    support, n = draw_support_torch([Segment(0, 20000, 0, 0)], 0, 0, 0.5, 20000, DEVICE)
    grad = torch.randn(20000, device=DEVICE)
    K.set_backend(backend)
    out = K.gather_grad(grad, support, n, 0.5, torch.empty(20000, device=DEVICE))
    assert calls == [backend]
    assert torch.equal(out[:n], grad[support[:n].long()] / 0.5)


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(restore_backend, monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    K.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton(torch.zeros(1))


def test_bad_backend_names_are_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        K.set_backend("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.backend_from_env({"GMIXOUT_BACKEND": "gpu"})
    assert _dispatch.backend_from_env({"GMIXOUT_BACKEND": " Torch "}) == "torch"
    assert _dispatch.backend_from_env({}) == "auto"


def test_rule_takes_a_device_too(restore_backend):
    K.set_backend("auto")
    assert not _dispatch.use_triton("cpu") and not _dispatch.use_triton(torch.device("cpu"))
    assert _dispatch.use_triton("cuda") == K.HAS_TRITON
