"""The checkpoint format: format-1 checkpoints of an earlier version load; the current layout.

``fixtures/state_format1.pt`` was written by the optimizer before the core was split (format 1,
``segments`` saved per tensor): three tensors (fp32 GMixout, bf16 GMixout with its 16-bit
anchor, fp32 dense), p=0.6, k=3, AdamW lr=1e-2 eps=1e-6 seed=5, saved after step 5 (episode 1,
step 2 of 3) together with the weights then and after 5 more steps of the same gradients.

Tolerance of the fp32 GMixout tensor against the fixture's weights after 10 steps: the version
that wrote it re-derived the fp32 anchor A[S] = W[S] - v/keep at every step; this one derives it
once after the load and keeps it exactly (format 3). The old trajectory drifted by <= 2
roundings of |w| <= 4 (half-ulp 2.4e-7) per step, 5 steps: 2.4e-6. The bf16 tensor (stored
anchor) and the dense one are bitwise.
"""
import copy
from pathlib import Path

import pytest
import torch

from gmixout_optim import GMixoutOptimizer
from gmixout_optim import checkpoint
from optim_testing import set_grads

FIXTURE = Path(__file__).parent / "fixtures" / "state_format1.pt"
FP32_DRIFT = 2.4e-6  # see the module docstring


def _assert_fixture_weights(ps, expected):
    for k, (got, want) in enumerate(zip(ps, expected)):
        if k == 0:  # the fp32 GMixout tensor
            torch.testing.assert_close(got.detach(), want, atol=FP32_DRIFT, rtol=0)
        else:
            assert torch.equal(got.detach(), want)


def _params(weights):
    return [torch.nn.Parameter(w.clone()) for w in weights]


def _opt(ps):
    return GMixoutOptimizer([{"params": ps[:2]}, {"params": ps[2:], "gmixout": False}],
                            p=0.6, resample_every=3, lr=1e-2, eps=1e-6, seed=5)


def _train(opt, ps, steps):
    for t in steps:
        set_grads(ps, t, seed=100)
        opt.step()


def test_format1_checkpoint_of_the_previous_version_resumes_bitwise():
    blob = torch.load(FIXTURE, weights_only=False)
    assert blob["state_dict"]["gmixout"]["format"] == 1
    assert all("segments" in e for pid, e in blob["state_dict"]["state"].items() if pid < 2)
    ps = _params(blob["weights"])
    opt = _opt(ps)
    opt.load_state_dict(blob["state_dict"])
    assert opt.state[ps[0]]["episode_step"] == 2 and "anchor" in opt.state[ps[1]]
    _train(opt, ps, range(6, 11))  # crosses an episode boundary (step 6) and runs into the next
    _assert_fixture_weights(ps, blob["weights_after_10"])


def test_current_format_leaves_segments_out_and_keeps_its_config_in_param_group_0():
    blob = torch.load(FIXTURE, weights_only=False)
    ps = _params(blob["weights"])
    opt = _opt(ps)
    opt.load_state_dict(blob["state_dict"])
    sd = opt.state_dict()
    assert sd["gmixout"]["format"] == checkpoint.FORMAT == 3
    assert all("segments" not in e for e in sd["state"].values())
    assert checkpoint.CONFIG_KEY in sd["param_groups"][0]
    # what torch.distributed.checkpoint.state_dict keeps: state and param_groups only
    through_dcp = copy.deepcopy({"state": sd["state"], "param_groups": sd["param_groups"]})
    twin_ps = _params([p.detach() for p in ps])
    twin = _opt(twin_ps)
    twin.load_state_dict(through_dcp)
    assert checkpoint.CONFIG_KEY not in twin.param_groups[0]
    _train(opt, ps, range(6, 11))
    _train(twin, twin_ps, range(6, 11))
    for a, b in zip(ps, twin_ps):
        assert torch.equal(a, b)


def test_a_newer_format_is_refused_with_what_to_do():
    blob = torch.load(FIXTURE, weights_only=False)
    sd = blob["state_dict"]
    sd["gmixout"] = dict(sd["gmixout"], format=99)
    with pytest.raises(ValueError, match=r"format 99.*reads formats \(1, 2, 3\).*version that wrote it"):
        _opt(_params(blob["weights"])).load_state_dict(sd)


def test_a_state_dict_without_config_is_refused():
    blob = torch.load(FIXTURE, weights_only=False)
    sd = {"state": blob["state_dict"]["state"], "param_groups": blob["state_dict"]["param_groups"]}
    with pytest.raises(ValueError, match="no 'gmixout' block"):
        _opt(_params(blob["weights"])).load_state_dict(sd)


def test_the_previous_versions_dcp_view_loads():
    """What the previous version's ``fsdp.attach`` hooks wrote: format 1, no segments, the
    config only as JSON in param group 0 (DCP keeps state and param_groups)."""
    import json

    blob = torch.load(FIXTURE, weights_only=False)
    sd = copy.deepcopy(blob["state_dict"])
    for entry in sd["state"].values():
        entry.pop("segments", None)
    sd["param_groups"][0][checkpoint.CONFIG_KEY] = json.dumps(sd.pop("gmixout"), sort_keys=True)
    ps = _params(blob["weights"])
    opt = _opt(ps)
    opt.load_state_dict(sd)
    _train(opt, ps, range(6, 11))
    _assert_fixture_weights(ps, blob["weights_after_10"])
