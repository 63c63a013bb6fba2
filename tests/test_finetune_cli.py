"""End to end: gmixout-finetune on the tiny preset, then gmixout-evaluate on a saved model."""
import json
import os
import shutil

import numpy as np
import pytest

import launch
from gmixout_optim.finetune import cli, data
from gmixout_optim.finetune import experiment as EX

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
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # found mid-run, still one line and exit code 2
        cli.train_main(argv)
    assert info.value.code == 2
    assert "re-estimated BatchNorm statistics but train.recalibrate_bn is off" in capsys.readouterr().err


def _one_line_error(capsys, run) -> tuple[int, str]:
    """Run a command that must fail on its input: exit code and the single line it printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return info.value.code, err


@pytest.mark.parametrize("argv,match", [
    (["--config", "nope.yaml"], "config file 'nope.yaml' not found"),
    (["--config", PRESET, "step=7"], "unknown config key 'step'"),
    (["--config", PRESET, "methods=[sgd]"], "unknown method 'sgd'"),
    (["--config", PRESET, "threads=0"], "threads=0: allowed: 'auto'"),
    (["--config", PRESET, "test_sets=[corruption:rain:3]"], "unknown corruption 'rain'"),
    (["--config", PRESET, "steps"], "must look like key=value"),
])
def test_config_errors_are_one_line_with_exit_code_2(capsys, argv, match):
    code, err = _one_line_error(capsys, lambda: cli.train_main(argv))
    assert code == 2 and match in err and err.startswith("gmixout-finetune: error: ")


def test_invalid_yaml_says_where_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseeds: [0, 1\n")
    code, err = _one_line_error(capsys, lambda: cli.train_main(["--config", str(bad)]))
    assert code == 2 and "is not valid YAML at line" in err


def test_evaluate_with_a_missing_model_says_no_such_file(tmp_path, capsys):
    missing = str(tmp_path / "nope" / "model.pt")
    code, err = _one_line_error(capsys, lambda: cli.evaluate_main(["--model", missing, "--test-set", "test"]))
    assert code == 2 and f"--model {missing!r}: no such file" in err


def _die(*args):
    os._exit(3)  # what an out-of-memory kill or a native crash looks like to the parent: no answer


def _guarded(fn, timeout_s: float):
    """``fn()`` in a thread; the test fails (instead of hanging) when it does not return in time."""
    import threading

    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(launch.scaled_timeout(timeout_s))
    assert not t.is_alive(), f"still waiting after {timeout_s} s (scaled for load): the parent hangs on a dead child"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_a_child_that_dies_fails_with_its_exit_code():
    with pytest.raises(EX.ChildFailed, match="exit code 3") as info:
        _guarded(lambda: EX.run_in_child(os._exit, (3,), "dying"), 120)
    assert info.value.exitcode == 3
    with pytest.raises(EX.ChildFailed, match="exit code 1.*ValueError: invalid literal") as info:
        _guarded(lambda: EX.run_in_child(int, ("x",), "raising"), 120)
    assert info.value.exitcode == 1
    assert _guarded(lambda: EX.run_in_child(int, ("42",), "fine"), 120) == 42


def test_the_command_fails_with_the_dead_childs_exit_code(tmp_path, capsys, monkeypatch):
    # The training child imports this module by name and runs _die instead of train_run.
    monkeypatch.setattr(EX, "train_run", _die)
    argv = ["--config", PRESET, f"output_dir={tmp_path}", f"work_dir={tmp_path / 'work'}", "isolate=true",
            "methods=[full_ft]", "seeds=[0]"]
    code, err = _one_line_error(capsys, lambda: _guarded(lambda: cli.train_main(argv), 300))
    assert code == 3 and "training full_ft" in err and "exit code 3" in err


def test_evaluate_caches_test_sets_keyed_by_set_size_and_seed(experiment, tmp_path):
    out, _ = experiment
    model = str(out / "work" / "runs" / "full_ft-default-s0" / "model.pt")
    cache = tmp_path / "cache"
    argv = ["--model", model, "--test-set", "corruption:glass_blur:3", "--threads", "1", "--cache-dir", str(cache),
            "--test-limit", "10"]
    assert cli.evaluate_main(argv) == 0
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("corruption_glass_blur_3-")
    first = np.load(cache / files[0])["x"]
    assert cli.evaluate_main(argv) == 0 and sorted(p.name for p in cache.iterdir()) == files  # reused
    assert cli.evaluate_main(argv[:-1] + ["12"]) == 0  # another size: another file
    assert len(list(cache.iterdir())) == 2
    # the cached images are what a fresh build gives (seeded corruption): the cache changes no score
    x, _ = data.load_test_set("corruption:glass_blur:3", seed=0, n_val=20, n_test=20, limit=10)
    assert np.array_equal(first, x)
    # by default the cache is the experiment's own (WORK_DIR/cache), filled by gmixout-finetune
    assert cli._cache_dir(None, model) == str(out / "work" / "cache")


def test_a_set_the_corruption_leaves_unchanged_is_warned_about_and_left_out_of_the_ood_mean(tmp_path):
    from gmixout_optim.finetune import evaluate, report

    cfg = {"seed": 0, "n_val": 20, "n_test": 20, "test_limit": 8}
    with pytest.warns(UserWarning, match="'corruption:saturate:3'.*left out of the OOD mean"):
        left = evaluate.unchanged_sets(["test", "digits", "corruption:saturate:3", "corruption:fog:3"], cfg,
                                       str(tmp_path))
    assert left == ["corruption:saturate:3"]
    rec = {"method": "full_ft", "seed": 0, "val": 0.9, "train_wall_s": 1.0, "peak_mem_bytes": 0, "state_bytes": 0,
           "trainable_params": 1, "test": {"test": 0.9, "corruption:saturate:3": 0.9, "corruption:fog:3": 0.3}}
    row = report.summarize({"runs": [rec], "unchanged_sets": left})[0]
    assert row["ood_sets"] == ["corruption:fog:3"] and row["mean_ood"][0] == pytest.approx(30.0)
    assert report.summarize({"runs": [rec]})[0]["mean_ood"][0] == pytest.approx(60.0)
