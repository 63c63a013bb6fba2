"""What the commands accept, importable without torch or numpy.

``gmixout-finetune --help`` and argument errors must answer at once; torch takes tens of
seconds to import on a busy machine, so the command-line module reads its choices from here
and imports the rest only after the arguments are parsed.
"""
from __future__ import annotations

import os

# The 19 corruptions of imagecorruptions(-imaug), in its own order (checked against the package
# in tests); listed here so a bad name is reported without importing the suite.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)


class ConfigError(ValueError):
    """A configuration or command-line value the run cannot use. The commands print its message
    as one line and exit with code 2, wherever in the run it is found."""


def free_cores() -> int:
    """Cores this process may use that other work is not using now: the usable cores
    (``sched_getaffinity``) minus the 1-minute load average, rounded, at least 1.

    Why not simply every core: OpenMP threads of one op wait for each other at every barrier,
    so on a 2-core machine that runs anything else, two threads take several times the CPU
    of one per training step (issue 14: 4 CPU-s instead of 0.5).
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average: use one core, which never oversubscribes
        return 1
    return max(1, min(usable, int(usable - load + 0.5)))


def resolve_threads(setting) -> int:
    """``threads`` of a config or command line: a positive int, or ``"auto"`` / None =
    ``free_cores()``, never more than ``OMP_NUM_THREADS`` when the environment sets it."""
    if setting is None or setting == "auto":
        n = free_cores()
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env.isdigit() and int(env) >= 1:
            n = min(n, int(env))
        return n
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        if isinstance(setting, str) and setting.isdigit() and int(setting) >= 1:
            return int(setting)
        raise ConfigError(f"threads={setting!r}: allowed: 'auto' (the free cores) or an integer >= 1")
    return setting


def apply_threads(n: int) -> None:
    """Use ``n`` intra-op threads here and in every process started from here (spawned training
    and memory-probe processes read ``OMP_NUM_THREADS`` when torch loads)."""
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
