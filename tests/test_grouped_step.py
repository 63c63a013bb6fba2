"""The grouped GPU step (gmixout_optim/grouped.py) against the per-tensor path it replaces.

Both paths run the Triton kernels (the interpreter on CPU, tests/conftest.py; the real ones on a
GPU), so the weights and state must agree within the kernels' tolerance table
(``kernels/testing.py``: the grouped AdamW computes its bias corrections on the device in fp64,
the per-tensor one on the host), and supports, sizes, counters and step counts exactly. Tiny
tensors: the interpreter costs ~10 ms a program.
"""
import copy
import warnings

import pytest
import torch

from gmixout_optim import GMixoutOptimizer, grouped, kernels
from gmixout_optim.kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUMELS = (37, 5, 64)  # one tensor below a Philox group of four, one over a few groups
K = 3  # episode length: 8 steps are two episodes and a half


@pytest.fixture(autouse=True)
def triton_backend():
    before = kernels.get_backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(before)
    grouped.set_enabled(True)


def _model(dtype, dense):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(m, generator=gen).to(DEVICE, dtype)) for m in NUMELS]
    extra = [torch.nn.Parameter(torch.randn(3, generator=gen).to(DEVICE))] if dense else []
    return params, extra


INNERS = {"AdamW": dict(lr=1e-2, weight_decay=0.1),  # the fused step
          "SGD": dict(lr=0.05, momentum=0.9, weight_decay=1e-3)}  # the inner optimizer steps v


def _optimizer(params, extra=(), inner="AdamW", **kw):
    groups = [{"params": params}] + ([{"params": list(extra), "gmixout": False}] if extra else [])
    return GMixoutOptimizer(groups, inner=inner, p=0.5, resample_every=K, seed=3, **INNERS[inner], **kw)


def _grads(params, extra, t, nonfinite):
    gen = torch.Generator().manual_seed(100 + t)
    for p in params + extra:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype)
    if t in nonfinite:  # every element, so whatever the support, the step must be skipped
        params[2].grad.fill_(float("nan") if t % 2 else float("inf"))
    if -t in nonfinite and extra:  # a dense gradient (the inner optimizer's) alone
        extra[0].grad[1] = float("nan")


def run(use_grouped, steps, dtype=torch.float32, dense=False, nonfinite=(), actions=None, start=None, sync=None,
        **kw):
    """``steps`` optimizer steps; ``actions[t](opt, params)`` runs before step ``t``; ``start``:
    a state_dict to load first (and the weights it goes with). Returns the weights, the
    state_dict and the steps at which a skip warning was raised."""
    grouped.set_enabled(use_grouped)
    params, extra = _model(dtype, dense)
    opt = _optimizer(params, extra, **kw)
    if sync is not None:
        opt.set_sync_group(sync)
    first = 0
    if start is not None:
        sd, weights, first = start
        with torch.no_grad():
            for p, w in zip(params + extra, weights):
                p.copy_(w)
        opt.load_state_dict(copy.deepcopy(sd))
    warned = []
    for t in range(first, first + steps):
        if actions and t in actions:
            actions[t](opt, params)
        _grads(params, extra, t, nonfinite)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        warned += [t for w in caught if "non-finite" in str(w.message)]
    return [p.detach().clone() for p in params + extra], opt.state_dict(), warned, opt


def assert_same_run(a, b):
    """Weights and state_dicts of two runs agree (exact for integers and counters)."""
    (wa, sa, *_), (wb, sb, *_) = a, b
    for i, (x, y) in enumerate(zip(wa, wb)):
        assert_close(x, y, "adam_weights", f"weights {i}")
    assert sa["state"].keys() == sb["state"].keys()
    for pid, ea in sa["state"].items():
        eb = sb["state"][pid]
        assert ea.keys() == eb.keys(), pid
        for key, va in ea.items():
            vb = eb[key]
            if key == "inner":
                assert va.keys() == vb.keys(), pid
                for k in va:
                    kind = "exact" if k == "step" else "adam_state"
                    assert_close(va[k].reshape(-1).float(), vb[k].reshape(-1).float(), kind, f"{pid} inner {k}")
            elif torch.is_tensor(va):
                kind = "exact" if key == "support" else "adam_state" if va.dtype == torch.float32 else "adam_weights"
                assert_close(va, vb, kind, f"{pid} {key}")
            else:
                assert va == vb, (pid, key, va, vb)


@pytest.mark.parametrize("dtype, dense, inner", [(torch.float32, False, "AdamW"), (torch.bfloat16, True, "AdamW"),
                                                (torch.float32, False, "SGD"), (torch.bfloat16, False, "SGD")])
def test_grouped_step_equals_per_tensor(dtype, dense, inner):
    """Two and a half episodes with non-finite steps at an episode's last step (2) and mid-episode
    (5), a parameter given new storage (the cached pointer tables must follow) and a
    consolidate mid-episode; 16-bit weights (stored anchor) with a dense parameter too; an inner
    optimizer that is not fused (SGD: grouped gather, anchor and write around its step)."""
    def new_storage(opt, params):
        params[0].data = params[0].data.clone()

    actions = {6: new_storage, 7: lambda opt, params: opt.consolidate()}
    kw = dict(dtype=dtype, dense=dense, nonfinite=(2, 5), actions=actions, inner=inner)
    fast, slow = run(True, 9, **kw), run(False, 9, **kw)
    assert_same_run(fast, slow)
    assert fast[3].skipped_steps == slow[3].skipped_steps == 2
    assert slow[2] == [2, 5]
    # The grouped path decides on the device and reads the verdict one step later, except where
    # the host must decide at once: a dense parameter's step, or a step that can end an episode.
    assert fast[2] == ([2, 5] if dense or inner == "SGD" else [2, 6])


def test_a_nonfinite_dense_gradient_skips_the_grouped_step():
    kw = dict(dense=True, nonfinite=(-1,))
    fast, slow = run(True, 4, **kw), run(False, 4, **kw)
    assert_same_run(fast, slow)
    assert fast[2] == slow[2] == [1]


def test_ranks_agree_without_a_host_read(tmp_path):
    """With a sync group the ranks' votes are all-reduced where they lie (here the CPU: gloo),
    in the same call the per-tensor path makes, and the verdict stays on the device (it lags)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        kw = dict(nonfinite=(2, 5), sync=dist.group.WORLD)
        fast, slow = run(True, 7, **kw), run(False, 7, **kw)
    finally:
        dist.destroy_process_group()
    assert_same_run(fast, slow)
    assert slow[2] == [2, 5]
    # gloo votes on the CPU: on a GPU the grouped step reads its flag for the vote (no lag)
    assert fast[2] == ([2, 6] if DEVICE == "cpu" else [2, 5])


def test_grouped_step_without_the_check():
    """``skip_nonfinite=False``: the fused step reads the gradients itself."""
    assert_same_run(run(True, 4, skip_nonfinite=False), run(False, 4, skip_nonfinite=False))


@pytest.mark.parametrize("first, then", [(True, False), (False, True)])
def test_resume_across_paths(first, then):
    """A state_dict of one path resumes on the other (same format: the step counts of the grouped
    path are views of its device vector, saved and loaded as torch AdamW's ``step``)."""
    straight = run(then, 6)
    head = run(first, 4)
    resumed = run(then, 2, start=(head[1], head[0], 4))
    assert_same_run(resumed, straight)
    # the same layout as the per-tensor path's: keys, dtypes and shapes
    other = run(not first, 4)
    for pid, entry in head[1]["state"].items():
        for key, value in entry.items():
            ref = other[1]["state"][pid][key]
            if key == "inner":
                assert {k: (v.dtype, v.shape) for k, v in value.items()} == \
                       {k: (v.dtype, v.shape) for k, v in ref.items()}
            elif torch.is_tensor(value):
                assert (value.dtype, value.shape) == (ref.dtype, ref.shape)


def test_grouped_state_dict_loads_on_the_torch_path():
    """A grouped run's checkpoint resumes with the PyTorch kernels (CPU)."""
    head = run(True, 4)
    kernels.set_backend("torch")
    grouped.set_enabled(True)  # ignored: the torch path never takes it
    sd = copy.deepcopy(head[1])
    for entry in sd["state"].values():
        for key in ("support", "residual", "anchor"):
            if key in entry:
                entry[key] = entry[key].cpu()
        entry["inner"] = {k: v.cpu() for k, v in entry.get("inner", {}).items()}
    params = [torch.nn.Parameter(w.cpu()) for w in head[0]]
    opt = _optimizer(params, [])
    opt.load_state_dict(sd)
    _grads(params, [], 4, ())
    opt.step()
    assert [opt.state[p]["episode_step"] for p in params] == [2] * len(params)
    assert all(opt.state[opt.state[p]["residual"]]["step"].item() == 5 for p in params)


def test_a_grouped_step_is_one_launch_per_op_and_no_sync():
    """Mid-episode, one lane: gather 1, adamw 3 (the kernel, the step count's increment and its
    undo where the flag is set), the flag zeroed (and, on a GPU, copied to the host) and no
    host sync; on CUDA, torch's sync debug mode raises on any sync the counters miss."""
    grouped.set_enabled(True)
    params, _ = _model(torch.float32, False)
    opt = _optimizer(params)
    for t in range(2):  # the first step lays out the state; both are mid-episode (K = 3)
        _grads(params, [], t, ())
        if t == 1:
            with kernels.record() as events:
                if DEVICE == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.step()
                finally:
                    if DEVICE == "cuda":
                        torch.cuda.set_sync_debug_mode(0)
        else:
            opt.step()
    launches = {op: n for (kind, op), n in events.items() if kind == "launch"}
    assert launches == {"found_inf": 2 if DEVICE == "cuda" else 1, "gather": 1, "adamw": 3}
    assert not [key for key in events if key[0] == "sync"], events
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("policy", ["remap", "carry", "reset"])
def test_a_redraw_is_one_launch_per_op_and_one_sync(policy):
    """The step that ends an episode reads the non-finite verdict (one sync on a GPU), then the
    lane merges, redraws and remaps in one launch each (the draw: a count and a write launch
    around a scan) and reads the new sizes once (the capacity check); the supports are those of
    the per-tensor draw, bit for bit (compared by the equivalence tests above)."""
    grouped.set_enabled(True)
    params, _ = _model(torch.float32, False)
    opt = _optimizer(params, state_policy=policy)
    for t in range(K):
        _grads(params, [], t, ())
        if t == K - 1:
            with kernels.record() as events:
                opt.step()
        else:
            opt.step()
    syncs = {op: n for (kind, op), n in events.items() if kind == "sync"}
    assert syncs == ({"found_inf": 1, "redraw": 1} if DEVICE == "cuda" else {"redraw": 1})
    assert events[("launch", "merge")] == 1 and events[("launch", "gather")] == 1
    assert events[("launch", "remap_state")] == (2 if policy == "remap" else 0)  # the kernel, the copy back
    assert [opt.state[p]["episode"] for p in params] == [1] * len(NUMELS)


@pytest.mark.parametrize("policy", ["carry", "reset"])
def test_state_policies_equal_per_tensor(policy):
    """The grouped redraw's ``carry`` and ``reset`` (``remap`` runs in the tests above)."""
    kw = dict(state_policy=policy, nonfinite=(4,))
    assert_same_run(run(True, 7, **kw), run(False, 7, **kw))


def test_an_unfused_grouped_step_is_one_launch_per_op():
    """SGD steps the residuals itself: per lane one gather and one write (from the stored anchor)
    around it, and the flag read on the host before it (a sync on a GPU: SGD cannot honour it)."""
    grouped.set_enabled(True)
    params, _ = _model(torch.float32, False)
    opt = _optimizer(params, inner="SGD")
    for t in range(2):
        _grads(params, [], t, ())
        if t == 1:
            with kernels.record() as events:
                opt.step()
        else:
            opt.step()
    counts = {key: n for key, n in events.items() if key[1] != "copy"}
    expected = {("launch", "found_inf"): 1, ("launch", "gather"): 1, ("launch", "write"): 1}
    if DEVICE == "cuda":
        expected[("sync", "found_inf")] = 1
    assert counts == expected


def test_a_copy_takes_the_pending_verdict_and_steps_like_the_original():
    """``copy.deepcopy`` with a verdict still pending: the copy counts it and, with an empty
    grouped cache (the original's tables point at the original's tensors), steps like it."""
    grouped.set_enabled(True)
    params, _ = _model(torch.float32, False)
    opt = _optimizer(params)
    for t in range(2):
        _grads(params, [], t, nonfinite=(1,))  # step 1 is mid-episode: its verdict is pending
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    with pytest.warns(RuntimeWarning, match="non-finite"):  # the copy reads the pending verdict
        twin_params, twin = copy.deepcopy((params, opt))
    assert grouped.CACHE_ATTR not in vars(twin)
    assert twin.skipped_steps == opt.skipped_steps == 1
    for ps, o in ((params, opt), (twin_params, twin)):
        _grads(ps, [], 2, ())
        o.step()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    assert [twin.state[p]["episode_step"] for p in twin_params] == [opt.state[p]["episode_step"] for p in params]
