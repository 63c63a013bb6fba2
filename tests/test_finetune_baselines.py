"""The baselines added for issue 12: Random Masking, linear probe / LP-FT, zero-shot, Model Soups, WiSE-FT at
a fixed alpha, budget-relative grids, and the v2 smoke comparison end to end."""
import copy
import json
import os

import pytest
import torch
from torch import nn

from gmixout_optim.finetune import methods as ME
from gmixout_optim.finetune import posthoc as PH
from gmixout_optim.finetune.data import TensorBatches
from gmixout_optim.finetune.train import _Tools, train_run

TINY = {"model": "tiny_cnn", "image_size": 32,
        "data": {"dataset": "animal_mnist", "seed": 0, "n_val": 20, "n_test": 20, "n_train": 200},
        "train": {"steps": 3, "batch_size": 8, "warmup_frac": 0.0, "bn_batches": 2}}


# -- grids relative to the step budget -----------------------------------------------------------------

def test_budget_relative_values_resolve_against_the_step_budget():
    assert [ME.resolve_budget(f"steps/{n}", 300) for n in (60, 20, 6)] == [5, 15, 50]
    assert ME.resolve_budget("steps/600", 300) == 1 and ME.resolve_budget(7, 300) == 7
    grid = ME.resolve_grid({"gmixout": {"resample_every": ["steps/60", "steps/6"], "lr": [1e-3]}}, 120)
    assert grid == {"gmixout": {"resample_every": [2, 20], "lr": [1e-3]}}
    for bad in ("steps/0", "step/5", "steps/x"):
        with pytest.raises(ValueError, match="steps/N"):
            ME.resolve_budget(bad, 100)
    with pytest.raises(ValueError, match="only resample_every"):
        ME.resolve_grid({"full_ft": {"lr": ["steps/2"]}}, 100)


# -- Random Masking -----------------------------------------------------------------------------------

def _steps(method_name, overrides, n):
    """Run ``n`` steps of a method on tiny_cnn by hand; returns (start weights, weights after each step, final)."""
    from gmixout_optim.finetune.models import build_model

    torch.manual_seed(0)
    model, info = build_model("tiny_cnn", 10, head_seed=0)
    m = ME.make_method(method_name, overrides, seed=3, head_names=info.head_names)
    net = m.setup(model, info.head_names)
    opt = m.make_optimizer(net)
    gen = torch.Generator().manual_seed(0)
    start = net.features[0].weight.detach().clone()
    seen = []
    for _ in range(n):
        x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        seen.append(net.features[0].weight.detach().clone())
    final = m.finish(net, None).features[0].weight.detach().clone()
    return start, seen, final


def test_random_mask_trains_one_fixed_support_and_deploys_the_trained_weights():
    start, seen, final = _steps("random_mask", {"p": 0.75, "lr": 1e-2}, 6)
    moved = [(w != start) for w in seen]
    # one support for the whole run: what moved after 6 steps is what moved after 1, about 1-p of the weights
    assert torch.equal(moved[0], moved[-1])
    assert 0.15 < moved[-1].float().mean().item() < 0.35
    assert torch.equal(final, seen[-1])  # ema_decay 0: finalize() folds the residual in fully
    # GMixout redrawing every step moves other coordinates: the check above can fail
    _, seen_g, _ = _steps("gmixout", {"p": 0.75, "lr": 1e-2, "resample_every": 1}, 6)
    assert not torch.equal(seen_g[0] != start, seen_g[-1] != start)


# -- linear probe, LP-FT, zero-shot -------------------------------------------------------------------

def test_linear_probe_fits_a_separable_head_on_frozen_features():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(6, 6))
    model = nn.Sequential(body, nn.Linear(6, 3))
    x = torch.randn(300, 6)
    y = x[:, :3].argmax(1)  # a linear rule of the inputs; body is invertible, so features separate it
    before = copy.deepcopy(body.state_dict())
    info = ME.fit_linear_probe(model, "1", x, y, c=100.0)
    assert info["lp_train_acc"] > 0.95
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    assert all(torch.equal(before[k], v) for k, v in body.state_dict().items())  # backbone frozen
    with pytest.raises(ValueError, match="lp_c must be > 0"):
        ME.fit_linear_probe(model, "1", x, y, c=0.0)


def test_lp_ft_probes_without_touching_the_training_batch_order(tmp_path):
    from gmixout_optim.finetune.models import build_model

    model, info = build_model("tiny_cnn", 10, head_seed=0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, 32, 32, generator=gen), torch.arange(40) % 10
    batches, twin = TensorBatches(x, y, 8, seed=5), TensorBatches(x, y, 8, seed=5)
    m = ME.make_method("lp_ft", {}, seed=5, head_names=info.head_names)
    m.prepare(model, _Tools(lambda mod: 0.5, batches, 2))
    assert torch.equal(batches.next()[0], twin.next()[0])  # the probe drew from its own stream
    assert m.extra["lp_val"] == 0.5 and "lp_train_acc" in m.extra


def test_probe_picks_its_c_on_id_val():
    from gmixout_optim.finetune.models import build_model

    model, info = build_model("tiny_cnn", 10, head_seed=0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, 32, 32, generator=gen), torch.arange(40) % 10
    # a made-up ID-val score: the head fitted with the second C tried scores best
    norms = {}

    def val(mod):
        n = mod.classifier.weight.norm().item()
        norms[n] = len(norms)
        return 1.0 if len(norms) == 2 else 0.0  # the second C tried scores best

    m = ME.make_method("linear_probe", {"lp_c": [1e-4, 1.0, 100.0]}, seed=0, head_names=info.head_names)
    m.prepare(model, _Tools(val, TensorBatches(x, y, 8, seed=0), 2))
    assert m.extra["lp_c"] == 1.0 and m.extra["lp_val"] == 1.0
    assert set(m.extra["lp_val_by_c"]) == {"0.0001", "1.0", "100.0"}
    assert model.classifier.weight.norm().item() == pytest.approx(list(norms)[1])  # the chosen head is kept
    with pytest.raises(ValueError, match="lp_c must be > 0"):
        ME.make_method("linear_probe", {"lp_c": [1.0, -1.0]}, head_names=info.head_names).prepare(
            model, _Tools(val, TensorBatches(x, y, 8, seed=0), 2))


def test_no_step_methods_train_nothing_and_zero_shot_needs_a_mapped_head(tmp_path):
    rec = train_run(TINY, "linear_probe", {}, 0, str(tmp_path / "lp"), progress=False)
    assert rec["steps"] == 0 and rec["state_bytes"] == 0 and rec["extra"]["lp_iterations"] > 0
    with pytest.raises(ValueError, match="zero_shot.*imagenet_head"):
        train_run(TINY, "zero_shot", {}, 0, str(tmp_path / "zs"), progress=False)
    with pytest.raises(ValueError, match="built after training"):
        ME.make_method("soup_greedy")


def test_mapped_imagenet_head_rows_are_class_means():
    from gmixout_optim.finetune.models import mapped_imagenet_head

    src = nn.Linear(4, 6)
    head = mapped_imagenet_head(src, [(0, 1), (), (5,)])
    assert torch.allclose(head.weight[0], src.weight[[0, 1]].mean(0)) and torch.allclose(head.weight[2], src.weight[5])
    assert torch.allclose(head.weight[1], src.weight.mean(0)) and torch.allclose(head.bias[1], src.bias.mean())
    with pytest.raises(ValueError, match="outside 0..5"):
        mapped_imagenet_head(src, [(6,)])


# -- Model Soups and WiSE-FT at a fixed alpha -------------------------------------------------------------

def test_average_state_dicts_averages_floats_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    avg = PH.average_state_dicts([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and avg["n"].item() == 4
    with pytest.raises(ValueError, match="other keys"):
        PH.average_state_dicts([a, {"v": torch.zeros(2)}])


def test_greedy_soup_follows_the_papers_rule():
    # val of a soup = -(w - 2)^2: ingredients w = 1 (val .9), 10 (val .8), 3 (val .7), 2.5 (val .7)
    def val_of(sd):
        return -float((sd["w"] - 2.0) ** 2)

    ing = [("a", {"w": torch.tensor(1.0)}, 0.9), ("b", {"w": torch.tensor(10.0)}, 0.8),
           ("c", {"w": torch.tensor(3.0)}, 0.7), ("d", {"w": torch.tensor(2.5)}, 0.7)]
    chosen, best = PH.greedy_soup(ing, val_of)
    # a first (best own val); b would pull the mean to 5.5 (worse): skipped; c gives mean 2 (better): kept;
    # d (tie with c, listed after it) gives mean 6.5/3 = 2.17: worse than 2, skipped
    assert chosen == ["a", "c"] and best == pytest.approx(0.0)
    # ">=": an ingredient that leaves the soup's val unchanged is kept
    same = [("x", {"w": torch.tensor(2.0)}, 0.5), ("y", {"w": torch.tensor(2.0)}, 0.4)]
    assert PH.greedy_soup(same, val_of)[0] == ["x", "y"]


def test_interpolate_keeps_the_head_and_checks_alpha():
    pre = {"body.w": torch.zeros(2), "classifier.weight": torch.zeros(2), "bn.num": torch.tensor(1)}
    ft = {"body.w": torch.ones(2), "classifier.weight": torch.full((2,), 5.0), "bn.num": torch.tensor(7)}
    out = PH.interpolate(pre, ft, 0.5, ["classifier"])
    assert torch.equal(out["body.w"], torch.full((2,), 0.5)) and torch.equal(out["classifier.weight"], ft["classifier.weight"])
    assert out["bn.num"].item() == 7
    with pytest.raises(ValueError, match="alpha"):
        PH.interpolate(pre, ft, 1.5, ["classifier"])


def test_soups_need_the_full_ft_grid():
    from gmixout_optim.finetune.experiment import DEFAULT_CONFIG, merge_config, validate

    cfg = merge_config(DEFAULT_CONFIG, {"methods": ["full_ft", "soup_uniform"], "search": {"full_ft": {"lr": [1e-3]}}})
    with pytest.raises(ValueError, match="at least 2 combinations"):
        validate(cfg)
    cfg = merge_config(DEFAULT_CONFIG, {"methods": ["wise_ft_fixed"]})
    with pytest.raises(ValueError, match="add full_ft"):
        validate(cfg)


# -- the v2 smoke comparison end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from gmixout_optim.finetune.cli import load_config
    from gmixout_optim.finetune.experiment import run_experiment

    torch.set_num_threads(1)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "experiments", "compare_v2_smoke.yaml"))
    out = tmp_path_factory.mktemp("v2")
    cfg["output_dir"], cfg["work_dir"] = str(out), str(out / "work")
    return run_experiment(cfg), out


def test_smoke_comparison_has_every_row_paired_and_the_reference_first(smoke):
    result, out = smoke
    cfg = result["config"]
    by = {}
    for r in result["runs"]:
        by.setdefault(r["method"], []).append(r)
    assert set(by) == set(cfg["methods"]) and all(sorted(r["seed"] for r in v) == [0, 1] for v in by.values())
    assert cfg["search"]["gmixout"]["resample_every"] == [1, 2]  # "steps/2", "steps/1" at 2 steps
    # soups: every seed's ingredients are that seed's full-FT grid; the uniform soup uses all of them
    assert all(r["extra"]["ingredients"] == ["lr0.0001", "lr0.001"] for r in by["soup_uniform"])
    assert all(1 <= len(r["extra"]["ingredients"]) <= 2 for r in by["soup_greedy"])
    assert os.path.exists(os.path.join(cfg["work_dir"], "runs", "full_ft-lr0.001-s1", "model.pt"))
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    ood = rows["gmixout"]["ood_sets"]
    ft = {r["seed"]: r for r in by["full_ft"]}
    want = {str(r["seed"]): 100 * (sum(r["test"][n] for n in ood) - sum(ft[r["seed"]]["test"][n] for n in ood)) / len(ood)
            for r in by["gmixout"]}
    assert rows["gmixout"]["d_ood_per_seed"] == pytest.approx(want)
    ref = max(("zero_shot", "linear_probe"), key=lambda m: rows[m]["id"][0])  # ties: zero_shot
    assert summary["reference_check"]["reference"] == ref
    md = (out / "results.md").read_text()
    assert md.index("Reference first") < md.index("| method |")
