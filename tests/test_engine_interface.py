"""The optimizer's public engine interface and the loud failure of renamed engine internals."""
from pathlib import Path
import re

import pytest
import torch

from gmixout_optim import GMixoutOptimizer, Segment, find_gmixout
from gmixout_optim.engine_internals import TESTED, EngineInternalsError
from gmixout_optim.sharding import dtensor_segments

INTEGRATIONS = Path(__file__).parent.parent / "integrations"


def _opt(**kw):
    ps = [torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(4, 5)),
          torch.nn.Parameter(torch.randn(6))]
    return ps, GMixoutOptimizer([{"params": ps[:2]}, {"params": ps[2:]}], p=0.5, resample_every=2, lr=1e-2, **kw)


def _step(ps, opt, t):
    g = torch.Generator().manual_seed(t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def test_tensor_key_and_locate_give_the_default_segments():
    ps, opt = _opt()
    assert opt.tensor_key(1, 0) == 2
    assert opt.locate(ps[2], 1, 0) == [Segment(0, 6, 2, 0)]
    opt.set_locator(lambda t, gi, i: [Segment(0, t.numel(), 7, 100)] if gi == 0 else None)
    assert opt.locate(ps[0], 0, 0) == [Segment(0, 30, 7, 100)]
    assert opt.locate(ps[2], 1, 0) == [Segment(0, 6, 2, 0)]  # None: the default
    opt.set_locator(lambda t, gi, i: [Segment(0, t.numel() + 1, 0, 0)])
    with pytest.raises(ValueError, match="for a tensor of 30 elements"):
        opt.locate(ps[0], 0, 0)


def test_restart_episodes_drops_compact_state_and_draws_that_episode():
    ps, opt = _opt()
    for t in range(3):  # episode 1, step 1
        _step(ps, opt, t)
    opt.restart_episodes(5, group_index=0)
    assert opt.state[ps[0]] == {"episode": 5, "episode_step": 0}
    assert opt.state[ps[2]]["episode"] == 1, "other groups keep their episode"
    _step(ps, opt, 9)
    reference_ps, reference = _opt()
    reference.restart_episodes(5)
    with torch.no_grad():
        for p, q in zip(reference_ps, ps):
            p.copy_(q)
    _step(reference_ps, reference, 10)
    assert torch.equal(opt.state[ps[0]]["support"], reference.state[reference_ps[0]]["support"])
    with pytest.raises(ValueError, match="episode must be an int"):
        opt.restart_episodes(-1)


def test_find_gmixout_looks_through_engine_wrappers():
    _, opt = _opt()

    class Zero:  # DeepSpeed's ZeRO wrapper keeps the optimizer as .optimizer
        optimizer = opt

    class Engine:
        optimizer = Zero()
        basic_optimizer = opt

    class Accelerated:
        optimizer = Zero()

    assert find_gmixout(opt) is opt and find_gmixout(Engine()) is opt and find_gmixout(Accelerated()) is opt
    with pytest.raises(TypeError, match="no GMixoutOptimizer inside SGD"):
        find_gmixout(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_integrations_use_only_the_public_interface():
    """No file under integrations/ reaches an underscore attribute of the optimizer or imports the
    kernels. (Engines' own private names are allowed there: engine_internals checks them.)"""
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = GMixoutOptimizer([w], lr=0.1, resample_every=2)
    w.grad = torch.randn_like(w)
    opt.step()
    private = {name for name in set(dir(type(opt))) | set(vars(opt)) if name.startswith("_") and not
               name.startswith("__")}
    assert "_inner" in private  # the scan below can see what it looks for
    for path in INTEGRATIONS.glob("*.py"):
        text = path.read_text()
        used = set(re.findall(r"\w\.(_[a-zA-Z]\w*)", text))
        assert not used & private, f"{path.name} touches the optimizer's private {sorted(used & private)}"
        assert "gmixout_optim.kernels" not in text and "from .kernels" not in text, path.name


def test_a_renamed_torch_internal_fails_loudly(monkeypatch):
    import torch.distributed.tensor._utils as dtensor_utils
    monkeypatch.delattr(dtensor_utils, "compute_local_shape_and_global_offset")
    with pytest.raises(EngineInternalsError, match=r"compute_local_shape_and_global_offset.*torch "
                       + re.escape(TESTED["torch"])):
        dtensor_segments(object(), 0)


def test_zero3_finalize_fails_loudly_when_deepspeed_renames_its_partition_calls():
    """Without the check, finalize would merge into tensors ZeRO-3 never copies to the model."""
    from gmixout_optim.integrations import deepspeed as gds
    _, opt = _opt()

    class Zero3:  # a ZeRO-3 optimizer of a DeepSpeed release that renamed its private calls
        optimizer = opt

    class Engine:
        optimizer = Zero3()
        basic_optimizer = opt

        @staticmethod
        def zero_optimization_stage():
            return 3

    with pytest.raises(EngineInternalsError, match=r"_set_fp32_optimizer_param_groups.*deepspeed "
                       + re.escape(TESTED["deepspeed"])):
        gds.finalize(Engine())


def test_zero3_subgroup_ids_of_another_format_fail_loudly():
    from gmixout_optim.integrations import deepspeed as gds
    w = torch.zeros(4)
    with pytest.raises(EngineInternalsError, match="firstid_lastid"):
        gds._zero3_segments(w, "sub-group-3", [], 0, 0)
