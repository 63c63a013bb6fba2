"""tests/launch.py: load-scaled launch timeouts, and a timed-out launch leaves no process behind."""
import os
import sys
import time

import pytest

import launch

# A launcher that starts a worker (its own child), prints the worker's pid, then both sleep
# far past any timeout used here: the shape of a torchrun launch that hangs.
HANGING = ("import subprocess, sys, time\n"
           "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
           "print('worker', w.pid, flush=True)\n"
           "time.sleep(600)\n")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


def test_timeout_kills_the_whole_process_group_and_reports_the_output(monkeypatch):
    monkeypatch.setenv(launch.SCALE_ENV, "1")
    with pytest.raises(pytest.fail.Exception) as info:
        launch.run([sys.executable, "-c", HANGING], timeout=2.0)
    message = str(info.value)
    assert "timed out after" in message and "killed process group" in message
    assert launch.SCALE_ENV in message  # says how to give a slow machine more time
    # the output tail reached the message (a worker left alive would hold the pipes and lose it)
    assert "worker " in message, message
    worker = int(message.split("worker ", 1)[1].split()[0])
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.1)
    assert not _alive(worker), f"worker {worker} outlived its killed launcher"


def test_a_finished_command_returns_like_subprocess_run():
    proc = launch.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                      timeout=60)
    assert proc.returncode == 3 and proc.stdout == "out\n" and proc.stderr == "err\n"


def test_scale_grows_with_the_environment_factor_and_load(monkeypatch):
    monkeypatch.setenv(launch.SCALE_ENV, "1")
    base = launch.timeout_scale()
    assert base >= 1.0  # never below the quiet-machine timeout
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 0.0, 0.0))
    assert launch.timeout_scale() == pytest.approx(4.0)
    monkeypatch.setenv(launch.SCALE_ENV, "2.5")
    assert launch.timeout_scale() == pytest.approx(10.0)
    assert launch.scaled_timeout(100) == pytest.approx(1000.0)


@pytest.mark.parametrize("bad", ["fast", "0", "-1"])
def test_a_bad_scale_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(launch.SCALE_ENV, bad)
    with pytest.raises(ValueError, match=f"{launch.SCALE_ENV}='{bad}' must be a number > 0"):
        launch.timeout_scale()
