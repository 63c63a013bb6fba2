"""GMixout under DeepSpeed ZeRO 0-3 (2 CPU ranks, gloo), against the plain optimizer.

Two process launches do all the DeepSpeed work (tests/distributed/ds_worker.py): one with
2 ranks runs every scenario of ds_common.scenario_configs (each configs/deepspeed/*.json is
one of them), one with 1 rank re-runs ZeRO-1/2 and loads the 2-rank consolidated
checkpoints. The tests below only compare what the workers wrote. A third launch runs
examples/deepspeed_finetune.py on a tiny timm ViT.

Tolerances (max |difference| of fp32 master weights). The runs move weights by ~0.15; a
wrong support, episode count or skipped-step count moves them by >= 1e-2 (the negative
controls below check this on every scenario).

| comparison                        | fp32 and bf16 | why                                        |
| --------------------------------- | ------------- | ------------------------------------------ |
| DeepSpeed vs plain reference      | 1e-6          | the reference takes the same gradients     |
|                                   |               | (g0/2 + g1/2 in the model dtype, halving   |
|                                   |               | is exact) and the same fp32 master math;   |
|                                   |               | only the clipping norm is summed in another|
|                                   |               | order: ~1 ulp of the clip factor, measured |
|                                   |               | <= 6e-8 after 8 steps                      |
| 1 rank vs 2 ranks (ZeRO-1/2)      | 1e-6          | same sums (accumulation vs all-reduce),    |
|                                   |               | clipping norm order again                  |
| resume / cross-world load         | 0             | copies of the same tensors                 |
| model weights after finalize      | 0 / 2**-8     | fp32 copy / one bf16 rounding (abs(w) < 1) |
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "distributed"))

import ds_common as C  # noqa: E402
import launch  # noqa: E402
from gmixout_optim.integrations import deepspeed as gds  # noqa: E402

TOL = {False: 1e-6, True: 1e-6}  # keyed by "is bf16"; see the table above
WORLD_TOL = 1e-6
SCENARIOS = list(C.scenario_configs(2))
ONE_RANK = ["z1_fp32", "z2_fp32"]
CROSS = ["z1_fp32", "z2_fp32", "z3_fp32"]
EXPECTED_WRAPPER = {0: "DeepSpeedGMixout", 1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer",
                    3: "DeepSpeedZeroOptimizer_Stage3"}


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # CPU tensors never reach Triton; keep imports light
    return env


def _failure(proc) -> str:
    """The error lines of a failed launch, then its tails."""
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "what()" in ln or "Traceback" in ln]
    return "\n".join(errors[-40:]) + "\n--- stdout ---\n" + proc.stdout[-2000:] + "\n--- stderr ---\n" + proc.stderr[-4000:]


def _launch(nproc: int, spec: dict, out: str, worker: str = "ds_worker.py") -> float:
    """Run tests/distributed/<worker> on ``nproc`` ranks with SPEC.json = ``spec`` in ``out``;
    the seconds it took."""
    os.makedirs(out, exist_ok=True)
    spec_path = os.path.join(out, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "distributed", worker), spec_path, out]
    t0 = time.time()
    proc = launch.run(cmd, env=_env(), cwd=out, timeout=600)  # scaled for the machine's load
    if proc.returncode != 0:
        raise AssertionError(f"DeepSpeed worker failed ({nproc} ranks):\n{_failure(proc)}")
    return time.time() - t0


@pytest.fixture(scope="module")
def comm_op():
    """Build DeepSpeed's CPU shared-memory comm op once (cached in TORCH_EXTENSIONS_DIR).

    The first build on a machine costs ~40 s on 2 cores and happens here, before the
    launches, so that the workers only load it; later sessions find it cached (~2 s).
    """
    proc = launch.run([sys.executable, "-m", "gmixout_optim.integrations.deepspeed"], env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(comm_op, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    two = os.path.join(out, "w2")
    one = os.path.join(out, "w1")
    seconds = _launch(2, {"train": SCENARIOS}, two)
    seconds += _launch(1, {"train": ONE_RANK,
                           "crossload": {n: os.path.join(two, f"ckpt_{n}_w2") for n in CROSS}}, one)
    print(f"DeepSpeed worker launches: {seconds:.1f} s")
    return {"w2": two, "w1": one}


def _record(runs, kind: str, name: str, world: int) -> tuple[dict, dict]:
    base = os.path.join(runs[f"w{world}"], f"{kind}_{name}_w{world}")
    with open(base + ".json") as f:
        meta = json.load(f)
    return torch.load(base + ".pt"), meta


def _config(name: str, world: int = 2) -> dict:
    return C.scenario_configs(world)[name]


def _assert_close(got: dict, want: dict, tol: float, what: str) -> None:
    diff = C.max_abs_diff(got, want)
    assert diff <= tol, f"{what}: max |diff| {diff:.3g} > {tol:.1g}"


# -- config check and registration (no processes) ---------------------------------------

@pytest.fixture
def registered():
    was = gds.is_registered()
    gds.register()
    yield
    if not was:
        gds.unregister()


@pytest.fixture
def unregistered():
    was = gds.is_registered()
    gds.unregister()
    yield
    if was:
        gds.register()


def test_register_is_idempotent_and_reversible(unregistered):
    assert not hasattr(torch.optim, "GMixout")
    assert gds.register() is gds.DeepSpeedGMixout
    assert gds.register() is gds.DeepSpeedGMixout
    assert torch.optim.GMixout is gds.DeepSpeedGMixout
    gds.unregister()
    gds.unregister()
    assert not hasattr(torch.optim, "GMixout")
    with pytest.raises(ValueError, match="AdamW already exists"):
        gds.register("AdamW")
    assert torch.optim.AdamW.__name__ == "AdamW"


@pytest.mark.parametrize("name", sorted(os.listdir(C.CONFIG_DIR)))
def test_shipped_configs_pass_the_check(registered, name):
    params = gds.check_config(os.path.join(C.CONFIG_DIR, name))
    assert params["inner"] == "AdamW" and 0 <= params["p"] < 1


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("zero_allow_untested_optimizer"), "zero_allow_untested_optimizer"),
    (lambda c: c["zero_optimization"].update(offload_optimizer={"device": "cpu"}) or
     c.pop("zero_force_ds_cpu_optimizer"), "zero_force_ds_cpu_optimizer"),
    (lambda c: c["zero_optimization"].update(offload_optimizer={"device": "nvme"}), "'nvme'"),
    (lambda c: c["optimizer"].update(type="gmixout"), "case-sensitive"),
    (lambda c: c["optimizer"]["params"].update(p=1.5), r"p=1\.5"),
    (lambda c: c["optimizer"]["params"].update(ema_decay=-0.1), r"ema_decay=-0\.1"),
    (lambda c: c["optimizer"]["params"].update(resample_every=0), "resample_every=0"),
    (lambda c: c["optimizer"]["params"].update(resample_every=2.5), "resample_every=2.5"),
    (lambda c: c["optimizer"]["params"].update(lr=-1), "lr=-1"),
    (lambda c: c["optimizer"]["params"].update(inner="Adamw"), "inner='Adamw'"),
    (lambda c: c["optimizer"]["params"].update(inner="GMixout"), "inner='GMixout'"),
    (lambda c: c["optimizer"]["params"].update(momentum=0.9), "momentum"),
    (lambda c: c["optimizer"]["params"].update(merge="mean"), "merge='mean'"),
    (lambda c: c["optimizer"]["params"].update(max_grad_norm=1.0), "gradient_clipping"),
    (lambda c: c["zero_optimization"].update(round_robin_gradients=True), "round_robin_gradients"),
    (lambda c: c["zero_optimization"].update(stage="auto"), "stage must be"),
    (lambda c: c["zero_optimization"].update(elastic_checkpoint=True), "elastic_checkpoint"),
    (lambda c: c["zero_optimization"].update(stage=0) or c.update(bf16={"enabled": True}), "FP16_Optimizer"),
    (lambda c: c["zero_optimization"].update(offload_optimizer={"device": "cpu", "ratio": 0.5}), "ratio"),
])
def test_check_config_explains_what_is_wrong(registered, edit, message):
    with open(os.path.join(C.CONFIG_DIR, "zero1.json")) as f:
        cfg = json.load(f)
    edit(cfg)
    with pytest.raises(ValueError, match=message):
        gds.check_config(cfg)


def test_check_config_needs_registration_and_knows_the_client_route(unregistered):
    with open(os.path.join(C.CONFIG_DIR, "zero3_offload.json")) as f:
        cfg = json.load(f)
    with pytest.raises(ValueError, match="register"):
        gds.check_config(cfg)
    with pytest.raises(ValueError, match="client optimizer"):
        gds.check_config(cfg, client=True)
    client_cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
    assert gds.check_config(client_cfg, client=True) == {}
    with pytest.raises(ValueError, match="resample_every=-3"):
        gds.client_optimizer(p=0.95, resample_every=-3)


# -- DeepSpeed runs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCENARIOS)
def test_each_stage_matches_the_plain_optimizer(runs, name):
    cfg = _config(name)
    rec, meta = _record(runs, "train", name, 2)
    want = "BF16_Optimizer" if name == "z1_bf16_fp32acc" else EXPECTED_WRAPPER[C.stage_of(cfg)]
    assert meta["optimizer"] == want, meta
    # gmixout_param_groups' split survives: supports in the GMixout group only.
    assert meta["groups"] == [[True, True], [False, False]], meta
    ref = C.Reference(cfg).run(0, C.STEPS)
    start = C.Reference(cfg).weights()
    tol = TOL[C.is_bf16(cfg)]
    assert C.moved(ref.weights(), start) > 100 * tol  # the comparison can see a wrong step
    _assert_close(rec["trained"], ref.weights(), tol, f"{name}: DeepSpeed vs plain optimizer")
    # Negative controls: keying ZeRO-1/2 supports per parameter (or ZeRO-3 per flat group),
    # or counting the NaN step, gives visibly different weights.
    other = C.Reference(cfg)
    if C.stage_of(cfg) in (1, 2):
        other.opt.set_locator(None)
    else:
        other.opt.set_locator(gds.zero12_layout_locator(other.opt))
    assert C.max_abs_diff(other.run(0, C.STEPS).weights(), ref.weights()) > 10 * tol
    shifted = C.Reference(cfg).run(0, C.NAN_AT).run(C.NAN_AT + 1, C.STEPS + 1)
    assert C.max_abs_diff(shifted.weights(), ref.weights()) > 10 * tol


@pytest.mark.parametrize("name", SCENARIOS)
def test_checkpoint_resumes_mid_episode_exactly(runs, name):
    rec, _ = _record(runs, "train", name, 2)
    _assert_close(rec["resumed"], rec["trained"], 0.0, f"{name}: resumed from step {C.SAVE_AT}")


@pytest.mark.parametrize("name", SCENARIOS)
def test_consolidate_and_finalize_match_the_plain_optimizer(runs, name):
    cfg = _config(name)
    rec, _ = _record(runs, "train", name, 2)
    tol = TOL[C.is_bf16(cfg)]
    ref = C.Reference(cfg).run(0, C.STEPS)
    ref.opt.consolidate()
    _assert_close(rec["consolidated"], ref.weights(), tol, f"{name}: consolidate()")
    ref = C.Reference(cfg).run(0, C.STEPS)
    ref.opt.finalize()
    _assert_close(rec["final"], ref.weights(), tol, f"{name}: finalize()")
    if C.stage_of(cfg) < 3:  # the model's own (16-bit) weights were refreshed from the masters
        model_tol = 2 ** -8 if C.is_bf16(cfg) else 0.0  # one bf16 rounding (|w| < 1)
        _assert_close(rec["final_model"], rec["final"], model_tol, f"{name}: model weights after finalize")


@pytest.mark.parametrize("name", SCENARIOS)
def test_anchor_weights_show_the_anchor_and_give_the_weights_back(runs, name):
    cfg = _config(name)
    rec, _ = _record(runs, "train", name, 2)
    ref = C.Reference(cfg).run(0, C.STEPS)
    with ref.opt.anchor_weights():
        anchor = ref.weights()
    assert C.max_abs_diff(anchor, ref.weights()) > 100 * TOL[C.is_bf16(cfg)]  # mid-episode: they differ
    _assert_close(rec["anchor"], anchor, TOL[C.is_bf16(cfg)], f"{name}: anchor_weights()")
    _assert_close(rec["after_anchor"], rec["trained"], 0.0, f"{name}: weights after anchor_weights()")


# zero_to_fp32 cannot read DeepSpeed's BF16_Optimizer checkpoints (z1_bf16_fp32acc), with any optimizer.
@pytest.mark.parametrize("name", [n for n in SCENARIOS if C.stage_of(_config(n)) >= 1 and n != "z1_bf16_fp32acc"])
def test_zero_to_fp32_after_finalize_is_the_plain_model(runs, name):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = _config(name)
    ckpt = os.path.join(runs["w2"], f"ckpt_{name}_w2")
    got = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="final")
    ref = C.Reference(cfg).run(0, C.STEPS)
    ref.opt.finalize()
    _assert_close({k: v.float() for k, v in got.items()}, ref.weights(), TOL[C.is_bf16(cfg)],
                  f"{name}: zero_to_fp32 of the finalized checkpoint")
    model = C.make_model()
    model.load_state_dict(got)  # a plain nn.Module takes it: no GMixout keys, no extra tensors


@pytest.mark.parametrize("name", ONE_RANK)
def test_zero12_one_rank_equals_two_ranks(runs, name):
    one, _ = _record(runs, "train", name, 1)
    two, _ = _record(runs, "train", name, 2)
    _assert_close(one["trained"], two["trained"], WORLD_TOL, f"{name}: 1 rank vs 2 ranks")
    _assert_close(one["resumed"], two["resumed"], WORLD_TOL, f"{name}: 1 rank vs 2 ranks, resumed")


@pytest.mark.parametrize("name", CROSS)
def test_consolidated_checkpoint_loads_on_another_world_size(runs, name):
    two, _ = _record(runs, "train", name, 2)
    rec, _ = _record(runs, "crossload", name, 1)
    _assert_close(rec["loaded"], two["consolidated"], 0.0, f"{name}: 2-rank checkpoint loaded on 1 rank")
    # Continue as the plain optimizer would after consolidate(): next episode, fresh inner state.
    cfg = _config(name, world=1)
    ref = C.Reference(cfg).run(0, C.STEPS)
    ref.opt.consolidate()
    episodes = {ref.opt.state[w]["episode"] for g in ref.opt.param_groups if g["gmixout"] for w in g["params"]}
    assert len(episodes) == 1
    episode = episodes.pop()
    cont = C.Reference(cfg)
    with torch.no_grad():
        for p, q in zip(cont.master.parameters(), ref.master.parameters()):
            p.copy_(q)
    cont.opt.restart_episodes(episode)  # a fresh optimizer whose tensors start at that episode
    cont.run(C.STEPS, C.STEPS + C.EXTRA)
    _assert_close(rec["continued"], cont.weights(), TOL[False], f"{name}: training on after the load")


def test_cross_world_load_refuses_a_checkpoint_saved_inside_an_episode(runs):
    ckpt = os.path.join(runs["w2"], "ckpt_z2_fp32_w2")
    with pytest.raises(ValueError, match="consolidate"):
        gds._saved_episodes(ckpt, "mid")
    ref = C.Reference(_config("z2_fp32")).run(0, C.STEPS)
    ref.opt.consolidate()
    episode = ref.opt.state[ref.opt.param_groups[0]["params"][0]]["episode"]
    assert episode >= 2 and gds._saved_episodes(ckpt, "consolidated") == {0: episode}


def test_example_script_trains_and_saves_a_plain_model(comm_op, tmp_path):
    """examples/deepspeed_finetune.py, 2 ranks, a tiny timm ViT: its final checkpoint is a plain model."""
    import timm
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(os.path.dirname(HERE), "examples", "deepspeed_finetune.py"),
           "--deepspeed-config", os.path.join(C.CONFIG_DIR, "zero3_offload.json"),
           "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs), "--image-size", "32",
           "--steps", "3", "--optimizer-params", '{"lr": 1e-3, "resample_every": 2}',
           "--save-dir", str(tmp_path / "ckpt")]
    proc = launch.run(cmd, env=_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, _failure(proc)
    assert "step 2: loss" in proc.stdout
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="final")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # strict: exactly the model's keys and shapes
    assert C.max_abs_diff({k: model.state_dict()[k] for k in state}, {k: before[k] for k in state}) > 1e-4
