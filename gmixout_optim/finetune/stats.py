"""Paired comparisons over seeds: per-seed differences against a baseline and their t-interval.

Every method of an experiment trains seed s with the same head initialisation and the same
order of training batches as the baseline's seed s, so ``method(s) - baseline(s)`` removes the
variation the seed causes in both; the interval is the Student-t interval of the mean of those
differences over seeds (``t_{n-1, 0.975} * sd / sqrt(n)`` for 95%), which assumes the per-seed
differences are roughly normal. With one seed there is no interval (NaN bounds).
"""
from __future__ import annotations

import math
import statistics


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the two-sided Student-t interval of the mean at ``level``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("t_interval needs at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2.0, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def mean_ood(record: dict, ood_names) -> float:
    """Plain mean of a run's accuracies over the OOD sets."""
    if not ood_names:
        return float("nan")
    return statistics.fmean(record["test"][n] for n in ood_names)


def paired_differences(runs: list, method: str, baseline: str, value) -> dict:
    """``{seed: value(method's run) - value(baseline's run)}`` over the seeds both have.

    ``value(record) -> float``. A seed present for only one of them is left out (it has no pair).
    """
    def by_seed(name):
        out = {}
        for r in runs:
            if r["method"] == name:
                if r["seed"] in out:
                    raise ValueError(f"method {name!r} has two runs with seed {r['seed']}")
                out[r["seed"]] = r
        return out

    a, b = by_seed(method), by_seed(baseline)
    return {s: value(a[s]) - value(b[s]) for s in sorted(set(a) & set(b))}
