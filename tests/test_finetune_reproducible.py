"""A run's result does not depend on what ran before it in the same process (issue 12), and a
finished run is reused only when the same code trained it."""
import hashlib
import json
import os

import pytest
import torch

from gmixout_optim.finetune import experiment as EX
from gmixout_optim.finetune.evaluate import accuracy
from gmixout_optim.finetune.train import load_id_tensors, recalibrate_saved_run, train_run

# Two short runs as the comparison runs them (train, re-estimate BN, score), different methods
# and seeds; GMixout redraws its support twice within the 7 steps, so episode boundaries and
# the merge are part of what is compared.
CFG = {"model": "efficientnet_lite0", "image_size": 32, "device": "cpu", "threads": 1,
       "data": {"seed": 0, "n_val": 20, "n_test": 20, "n_train": 64},
       "train": {"steps": 7, "batch_size": 8, "warmup_frac": 0.0, "bn_batches": 2, "recalibrate_bn": True}}
RUNS = {"a": ("full_ft", {"lr": 1e-3}, 0), "b": ("gmixout", {"lr": 3e-3, "resample_every": 3}, 1)}


def _sequence(names, root):
    """In one (fresh) process: each named run in turn; per run the hash of its saved weights and its scores."""
    out = {}
    for name in names:
        method, hp, seed = RUNS[name]
        run_dir = os.path.join(root, name)
        rec = recalibrate_saved_run(CFG, run_dir, train_run(CFG, method, hp, seed, run_dir, progress=False))
        sd = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
        digest = hashlib.sha1(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()
        model, _ = EX.load_saved_model(os.path.join(run_dir, "model.pt"))
        val = load_id_tensors(CFG, (0.5,) * 3, (0.5,) * 3)["val"]
        out[name] = (digest, rec["val"], rec["val_before_bn"], accuracy(model, *val))
    return out


def test_two_runs_in_one_process_in_both_orders_match_each_run_alone(tmp_path):
    # Every sequence in a fresh process, so the test process's own history plays no part.
    def fresh(names, tag):
        return EX.run_in_child(_sequence, (names, str(tmp_path / tag)), f"runs {names}", threads=1)

    alone = {**fresh(["a"], "a"), **fresh(["b"], "b")}
    ab, ba = fresh(["a", "b"], "ab"), fresh(["b", "a"], "ba")
    assert alone["a"][0] != alone["b"][0]  # two different runs, so the comparison below means something
    for name in RUNS:
        assert ab[name] == alone[name], f"run {name} after the other differs from it alone"
        assert ba[name] == alone[name], f"run {name} before the other differs from it alone"


def test_a_run_is_reused_only_when_the_same_code_trained_it(tmp_path, capsys, monkeypatch):
    cfg = EX.validate(EX.merge_config(EX.DEFAULT_CONFIG, {**CFG, "progress": False, "memory_probe_steps": 0,
                                                          "train": {**CFG["train"], "steps": 1}}))
    run_dir = str(tmp_path / "run")
    rec = EX._train(cfg, "full_ft", {}, 0, run_dir)
    assert rec["code"] == EX.code_version()
    capsys.readouterr()
    EX._train(cfg, "full_ft", {}, 0, run_dir)
    assert "[resume] reusing" in capsys.readouterr().out
    # the same settings, trained by other code (what mixed the committed comparison's runs)
    with open(os.path.join(run_dir, "run.json")) as f:
        stale = json.load(f)
    stale["code"] = "0" * 16
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(stale, f)
    EX._train(cfg, "full_ft", {}, 0, run_dir)
    assert "trained by other code: training again" in capsys.readouterr().out
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["code"] == EX.code_version()
    stale["code"] = "0" * 16
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(stale, f)
    EX._train({**cfg, "resume": "any_code"}, "full_ft", {}, 0, run_dir)
    assert "trained by other code (resume: any_code)" in capsys.readouterr().out
    with pytest.raises(EX.ConfigError, match="resume='sometimes': allowed: true, false, any_code"):
        EX.validate({**cfg, "resume": "sometimes"})


def test_code_version_follows_the_training_sources(tmp_path, monkeypatch):
    before = EX.code_version()
    assert before == EX.code_version() and len(before) == 16
    # the hash is over the package's sources: a changed byte in the optimizer changes it
    import gmixout_optim

    pkg = os.path.dirname(gmixout_optim.__file__)
    copy = tmp_path / "gmixout_optim"
    import shutil

    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(EX, "__file__", str(copy / "finetune" / "experiment.py"))
    EX.code_version.cache_clear()
    try:
        assert EX.code_version() == before
        with open(copy / "optimizer.py", "a") as f:
            f.write("\n# changed\n")
        EX.code_version.cache_clear()
        assert EX.code_version() != before
        EX.code_version.cache_clear()
        with open(copy / "finetune" / "report.py", "a") as f:  # the report decides no run
            f.write("\n# changed\n")
        changed = EX.code_version()
        with open(copy / "finetune" / "report.py", "a") as f:
            f.write("\n# again\n")
        EX.code_version.cache_clear()
        assert EX.code_version() == changed
    finally:
        EX.code_version.cache_clear()
