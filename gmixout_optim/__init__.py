"""gmixout_optim: GMixout (arXiv 2510.06982) as an optimizer wrapper for robust fine-tuning."""

import importlib

__all__ = ["GMixoutOptimizer", "Segment", "find_gmixout", "gmixout_param_groups"]
__version__ = "0.1.0"

# Exports resolve on first use (PEP 562), so that command lines such as `gmixout-finetune --help`
# answer without importing torch.
_EXPORTS = {
    "GMixoutOptimizer": ".optimizer",
    "find_gmixout": ".optimizer",
    "Segment": ".kernels",
    "gmixout_param_groups": ".groups",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
