"""GMixout's hyperparameters: one table that every check and every document reads.

The constructor, ``add_param_group``, ``load_state_dict``, DeepSpeed's config check, the
fine-tune CLI and the timm / Hugging Face registrations all check values through
:func:`check` / :func:`check_kwargs`, so an error reads the same wherever it is raised.
Numbers may be Python or NumPy scalars (``np.float32(0.9)``, ``np.int64(50)``); they are
returned as Python ``float`` / ``int``. ``bool`` is never a number here.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["HParam", "HPARAMS", "GROUP_KEYS", "MERGE_RULES", "STATE_POLICIES", "check", "check_kwargs",
           "split_kwargs", "defaults", "markdown_table"]

MERGE_RULES = ("ema", "residual")
STATE_POLICIES = ("remap", "carry", "reset")


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its type, allowed range or choices, default and meaning."""

    name: str
    kind: type  # float, int, bool or str
    default: Any
    meaning: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    per_group: bool = False  # may differ between param groups

    def allowed(self) -> str:
        """What the value may be, in words (used by every error message)."""
        if self.choices:
            return f"one of {self.choices}"
        if self.kind is bool:
            return "a bool"
        what = "an int" if self.kind is int else "a float"
        if self.low is None and self.high is None:
            return what
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open or self.high is None else "]"
        high = "inf" if self.high is None else ("2**63" if self.high == 2**63 else f"{self.high:g}")
        return f"{what} in {lo}{self.low:g}, {high}{hi}"

    def check(self, value: Any, where: str = "") -> Any:
        """``value`` as a plain Python value, or ``ValueError`` naming it and what is allowed."""
        ok, out = False, value
        if self.choices:
            ok = isinstance(value, str) and value in self.choices
        elif self.kind is bool:
            ok = isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy bool
            out = bool(value) if ok else value
        elif not _is_bool(value):
            if self.kind is int and isinstance(value, numbers.Integral):
                ok, out = True, int(value)
            elif self.kind is float and isinstance(value, numbers.Real):
                out = float(value)
                ok = math.isfinite(out)
            if ok:
                ok = self._in_range(out)
        if not ok:
            raise ValueError(f"{self.name}{where} must be {self.allowed()} ({self.meaning}), got {value!r}")
        return out

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


HPARAMS: dict[str, HParam] = {h.name: h for h in (
    HParam("gmixout", bool, True, "train the group sparsely with GMixout; False trains it densely",
           per_group=True),
    HParam("p", float, 0.9, "masking probability; the support fraction is 1 - p",
           low=0.0, high=1.0, high_open=True, per_group=True),
    HParam("ema_decay", float, 0.3, "weight of the old anchor at each merge; 1 keeps the pretrained anchor",
           low=0.0, high=1.0, per_group=True),
    HParam("resample_every", int, 50, "episode length k in optimizer steps", low=1, per_group=True),
    HParam("merge", str, "ema", "how a finished episode enters the anchor", choices=MERGE_RULES),
    HParam("state_policy", str, "remap", "what the inner optimizer's state does at a redraw",
           choices=STATE_POLICIES),
    HParam("seed", int, 0, "seed of the support draws", low=0, high=2**63, high_open=True),
    HParam("skip_nonfinite", bool, True, "skip a step whose gradients hold inf/nan"),
    HParam("capture_grads", bool, False, "a backward hook keeps only each GMixout tensor's support gradient "
           "and frees its dense gradient (no dense weight gradient kept)"),
)}

# Keys every param group carries (they may differ between groups).
GROUP_KEYS = tuple(name for name, h in HPARAMS.items() if h.per_group)


def check(name: str, value: Any, where: str = "") -> Any:
    """Check one hyperparameter by name; returns it as a plain Python value."""
    if name not in HPARAMS:
        raise ValueError(f"unknown GMixout hyperparameter {name!r}{where}; known: {sorted(HPARAMS)}")
    return HPARAMS[name].check(value, where)


def check_kwargs(kwargs: dict, where: str = "", *, names: Iterable[str] | None = None) -> dict:
    """Check every GMixout key of ``kwargs`` (all must be known when ``names`` is None);
    returns a new dict with the checked values. ``names`` limits the keys looked at."""
    keys = list(kwargs) if names is None else [k for k in names if k in kwargs]
    return {k: check(k, kwargs[k], where) for k in keys}


def split_kwargs(kwargs: dict, where: str = "") -> tuple[dict, dict]:
    """``(gmixout, inner)``: the GMixout keys of ``kwargs``, checked, and the rest (for the
    inner optimizer). ``gmixout`` itself is a group key, not a constructor argument."""
    ours = {k: v for k, v in kwargs.items() if k in HPARAMS and k != "gmixout"}
    inner = {k: v for k, v in kwargs.items() if k not in ours}
    return check_kwargs(ours, where), inner


def defaults() -> dict:
    """Every hyperparameter's default, by name."""
    return {name: h.default for name, h in HPARAMS.items()}


def markdown_table() -> str:
    """The table as Markdown (docs/DESIGN.md shows it)."""
    rows = ["| name | type | allowed | default | per group | meaning |", "|---|---|---|---|---|---|"]
    for h in HPARAMS.values():
        rows.append(f"| `{h.name}` | {h.kind.__name__} | {h.allowed()} | `{h.default!r}` | "
                    f"{'yes' if h.per_group else 'no'} | {h.meaning} |")
    return "\n".join(rows)
