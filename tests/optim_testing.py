"""Helpers shared by the optimizer tests (test_optimizer.py, test_hardening.py, test_resume.py).

Gradients are set by hand from seeded generators (not by a loss), so that two runs, or a run
and a hand computation, see exactly the same values; comparisons of state are bitwise.
"""
import io

import torch


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def set_grads(params, t, seed=1000, scale=1.0):
    g = torch.Generator().manual_seed(seed + t)
    for w in params:
        w.grad = (scale * torch.randn(w.shape, generator=g)).to(w.dtype)


def flat(w):
    return w.detach().reshape(-1)


def snapshot(params):
    return [flat(w).clone() for w in params]


def assert_same(a, b, path="state"):
    """Bitwise equality of nested (state_dict-like) structures, dtype, shape and type exact."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype} {tuple(a.shape)} vs {getattr(b, 'dtype', b)} {tuple(getattr(b, 'shape', ()))}")
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def through_bytes(obj):
    """obj saved with torch.save and loaded back with weights_only=True (torch.load's default)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
