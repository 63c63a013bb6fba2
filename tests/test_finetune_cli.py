"""End to end: gmixout-finetune on the tiny preset, then gmixout-evaluate on a saved model."""
import json
import os
import shutil

import pytest

from gmixout_optim.finetune import cli

PRESET = os.path.join(os.path.dirname(__file__), "..", "configs", "experiments", "test_tiny.yaml")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert cli.train_main(["--config", PRESET, f"output_dir={out}", f"work_dir={out / 'work'}"]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_experiment_writes_runs_and_report(experiment):
    out, result = experiment
    runs = result["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("full_ft", 0), ("full_ft", 1), ("gmixout", 0), ("gmixout", 1)]
    for r in runs:
        assert set(r["test"]) == {"test", "digits", "corruption:fog:3"}
    for name in ("results.md", "results.csv", "summary.json", "id_vs_ood.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "id_vs_ood.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_search_picks_the_best_validation_candidate(experiment):
    _, result = experiment
    sel = result["selection"]["gmixout"]
    cands = sel["val_by_candidate"]
    assert [c[0] for c in cands] == [{"lr": 1e-4}, {"lr": 1e-3}]
    best = max(cands, key=lambda c: c[1])[0]  # max keeps the first of ties, as the experiment does
    assert sel["chosen"] == best
    assert all(r["hp"]["lr"] == best["lr"] for r in result["runs"] if r["method"] == "gmixout")


def test_evaluate_command_matches_the_experiment(experiment, tmp_path, capsys):
    out, result = experiment
    rec = result["runs"][0]
    model = out / "work" / "runs" / "full_ft-default-s0" / "model.pt"
    scores_path = tmp_path / "scores.json"
    assert cli.evaluate_main(["--model", str(model), "--test-set", "test", "--test-set", "corruption:fog:3",
                              "--test-set", "corruption:zoom_blur:2", "--test-limit", "20", "--json", str(scores_path),
                              "--threads", "1"]) == 0
    scores = json.loads(scores_path.read_text())["scores"]
    # Same weights, same images (same split seed and limit): the very same accuracy.
    assert scores["test"] == rec["test"]["test"] and scores["corruption:fog:3"] == rec["test"]["corruption:fog:3"]
    assert 0.0 <= scores["corruption:zoom_blur:2"] <= 1.0  # a corruption no preset uses
    assert "corruption:zoom_blur:2" in capsys.readouterr().out


def test_evaluate_rejects_a_bad_test_set(experiment, capsys):
    out, _ = experiment
    with pytest.raises(SystemExit):
        cli.evaluate_main(["--model", str(out / "work" / "runs" / "full_ft-default-s0" / "model.pt"), "--test-set", "corruption:rain:3"])
    assert "unknown corruption 'rain'" in capsys.readouterr().err


def test_config_overrides_and_typos(tmp_path):
    cfg = cli.load_config(PRESET, ["train.steps=7", "seeds=[3]", "method_params.gmixout.p=0.8"])
    assert cfg["train"]["steps"] == 7 and cfg["seeds"] == [3] and cfg["method_params"]["gmixout"]["p"] == 0.8
    assert cfg["train"]["batch_size"] == 8  # untouched keys keep the file's value
    with pytest.raises(ValueError, match="unknown config key 'step'"):
        cli.load_config(PRESET, ["step=7"])
    with pytest.raises(ValueError, match="key=value"):
        cli.parse_override("steps")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        cli.load_config(str(tmp_path / "nope.yaml"))


def test_rerun_reuses_finished_runs_and_retrains_on_a_changed_setting(experiment, capsys):
    out, result = experiment
    shutil.copytree(out / "work", out / "work2")  # leave the module's runs untouched
    capsys.readouterr()
    argv = ["--config", PRESET, f"output_dir={out / 'again'}", f"work_dir={out / 'work2'}"]
    assert cli.train_main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("[resume] reusing") == 5  # full_ft seeds 0, 1; gmixout lr 1e-4 and 1e-3 at seed 0, seed 1
    again = json.loads((out / "again" / "results.json").read_text())
    assert [r["test"] for r in again["runs"]] == [r["test"] for r in result["runs"]]
    assert cli.train_main(argv + ["train.steps=1", "methods=[full_ft]", "seeds=[0]"]) == 0
    assert "[resume]" not in capsys.readouterr().out  # another step budget: another fingerprint


def test_bn_recalibration_is_a_post_training_step(experiment, capsys):
    out, result = experiment
    shutil.copytree(out / "work", out / "work3")
    argv = ["--config", PRESET, f"output_dir={out / 'bn'}", f"work_dir={out / 'work3'}", "methods=[full_ft]",
            "seeds=[0]"]
    capsys.readouterr()
    assert cli.train_main(argv + ["train.recalibrate_bn=true"]) == 0
    assert capsys.readouterr().out.count("[resume] reusing") == 1  # the trained run is reused, not retrained
    rec = json.loads((out / "work3" / "runs" / "full_ft-default-s0" / "run.json").read_text())
    assert rec["bn_recalibrated"] and rec["val_before_bn"] == result["runs"][0]["val"]
    again = cli.train_main(argv + ["train.recalibrate_bn=true"])  # idempotent: reset + same seeded batches
    assert again == 0 and json.loads((out / "bn" / "results.json").read_text())["runs"][0]["val"] == rec["val"]
    with pytest.raises(ValueError, match="re-estimated BatchNorm statistics but train.recalibrate_bn is off"):
        cli.train_main(argv)
