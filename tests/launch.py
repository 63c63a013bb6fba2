"""Launch a test's child processes with a timeout sized for the machine's load, and leave nothing behind.

A fixed timeout that suits a quiet machine fails on a busy one (a 2-core machine at load 12
runs each process at a sixth of its quiet speed), and a launcher killed on timeout leaves its
workers running as orphans. So:

- the base timeout is multiplied by ``timeout_scale()``: ``GMIXOUT_TEST_TIMEOUT_SCALE`` (a
  number > 0) times ``max(1, load / cores)``, the 1-minute load average over the cores this
  process may use, read when the launch starts;
- ``run`` starts the command in a new session (its own process group) and, on timeout, kills
  the whole group (launcher and workers), then fails the test with the tail of the output.
  Members of the group still alive after a normal exit are killed too;
- ``spawn`` does the same for ``torch.multiprocessing`` workers started from the test process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

SCALE_ENV = "GMIXOUT_TEST_TIMEOUT_SCALE"
TAIL_CHARS = 6000


def _cores() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def timeout_scale(environ=os.environ) -> float:
    """``GMIXOUT_TEST_TIMEOUT_SCALE`` (default 1) x ``max(1, 1-minute load / usable cores)``."""
    text = environ.get(SCALE_ENV, "").strip()
    try:
        factor = float(text) if text else 1.0
    except ValueError:
        raise ValueError(f"{SCALE_ENV}={text!r} must be a number > 0 (a factor on every launch timeout)") from None
    if not factor > 0:
        raise ValueError(f"{SCALE_ENV}={text!r} must be a number > 0 (a factor on every launch timeout)")
    try:
        load = os.getloadavg()[0]
    except OSError:  # load average unavailable: trust the factor alone
        load = 0.0
    return factor * max(1.0, load / _cores())


def scaled_timeout(base_s: float) -> float:
    """``base_s`` (what the launch needs on a quiet machine, with margin) scaled for the load now."""
    if not base_s > 0:
        raise ValueError(f"base timeout must be > 0 s, got {base_s!r}")
    return base_s * timeout_scale()


def _tail(text: str | None) -> str:
    text = text or ""
    return text[-TAIL_CHARS:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass


def run(cmd, *, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new process group, with
    ``timeout`` (seconds on a quiet machine) scaled by ``timeout_scale()``.

    On timeout the whole group is killed and the test fails with the output's tail; the
    caller checks ``returncode`` as with ``subprocess.run``.
    """
    limit = scaled_timeout(timeout)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)  # pgid == proc.pid: the launcher and all it starts
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        try:  # the pipes close once every member is dead; a member that left the group could hold them
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", "(output lost: a process outside the group still holds the pipes)"
        pytest.fail(f"timed out after {limit:.0f} s ({timeout:.0f} s x {limit / timeout:.2f} for the load; "
                    f"{SCALE_ENV} scales it), killed process group {proc.pid}: {' '.join(map(str, cmd))}\n"
                    f"--- stdout tail ---\n{_tail(out)}\n--- stderr tail ---\n{_tail(err)}", pytrace=False)
    except BaseException:  # KeyboardInterrupt, a failing read: never leave the group running
        _kill_group(proc.pid)
        proc.wait()
        raise
    _kill_group(proc.pid)  # workers that outlived their launcher
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def spawn(fn, args=(), *, nprocs: int, timeout: float) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs, join=True)`` with a load-scaled timeout:
    on timeout every worker is killed and the test fails (a worker's exception is raised as
    ``spawn`` raises it)."""
    import torch.multiprocessing as mp

    limit = scaled_timeout(timeout)
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    try:
        while not ctx.join(timeout=max(min(deadline - time.monotonic(), 5.0), 0.1)):
            if time.monotonic() >= deadline:
                pytest.fail(f"{getattr(fn, '__name__', fn)} x {nprocs} did not finish in {limit:.0f} s "
                            f"({timeout:.0f} s x {limit / timeout:.2f} for the load; {SCALE_ENV} scales it); "
                            "workers killed", pytrace=False)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
