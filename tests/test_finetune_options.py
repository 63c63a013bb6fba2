"""The commands' choices without torch (issue 14, items 14 and 17): threads from the free cores,
--help without the heavy modules."""
import os
import sys
import textwrap

import pytest

import launch
from gmixout_optim.finetune import options as O

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cores,load,expected", [
    (2, 0.2, 2),   # quiet: every core
    (2, 0.7, 1),   # one core busy already: two OpenMP threads would wait on each other
    (2, 12.0, 1),  # very busy: still one thread, never zero
    (16, 5.0, 11),
])
def test_free_cores_subtracts_the_load_from_the_usable_cores(monkeypatch, cores, load, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert O.free_cores() == expected


def test_auto_threads_never_exceed_omp_num_threads(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert O.resolve_threads("auto") == 8 and O.resolve_threads(None) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert O.resolve_threads("auto") == 3
    assert O.resolve_threads(5) == 5 and O.resolve_threads("2") == 2  # an explicit count is taken as given


@pytest.mark.parametrize("bad", [0, -1, "many", 1.5, True])
def test_bad_threads_are_named(bad):
    with pytest.raises(O.ConfigError, match=r"threads=.*allowed: 'auto'"):
        O.resolve_threads(bad)


def test_apply_threads_sets_torch_and_the_environment_of_children(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        O.apply_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_demo_config_chooses_threads_from_the_free_cores():
    from gmixout_optim.finetune.cli import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "experiments", "demo.yaml"))
    assert cfg["threads"] == "auto"


def _fresh_python(code: str) -> str:
    proc = launch.run([sys.executable, "-c", textwrap.dedent(code)], timeout=300, cwd=ROOT,
                      env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


HEAVY = ("gmixout_optim.finetune.data", "gmixout_optim.finetune.experiment", "gmixout_optim.finetune.train",
         "gmixout_optim.finetune.evaluate", "gmixout_optim.finetune.methods", "gmixout_optim.finetune.models",
         "timm", "sklearn", "skimage", "imagecorruptions", "matplotlib", "peft", "yaml")


def test_help_and_argument_errors_load_none_of_the_finetune_modules():
    # The package's own exports (the optimizer) import torch; what the command adds is measured.
    out = _fresh_python(f"""
        import sys
        import gmixout_optim
        before = set(sys.modules)
        from gmixout_optim.finetune import cli
        for main, argv in ((cli.train_main, ["--help"]), (cli.evaluate_main, ["--help"]),
                           (cli.train_main, []), (cli.evaluate_main, ["--model"])):
            try:
                main(argv)
            except SystemExit:
                pass
        added = set(sys.modules) - before
        print(sorted(m for m in added if m.split(".")[0] in {HEAVY!r} or m in {HEAVY!r}))
    """)
    assert out.strip().splitlines()[-1] == "[]"


def test_help_does_not_import_torch():
    out = _fresh_python("""
        import sys
        from gmixout_optim.finetune import cli
        try:
            cli.train_main(["--help"])
        except SystemExit:
            pass
        print("torch" in sys.modules)
    """)
    assert out.strip().splitlines()[-1] == "False"
