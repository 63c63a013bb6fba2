"""gmixout_optim: GMixout (arXiv 2510.06982) as an optimizer wrapper for robust fine-tuning."""

from .groups import gmixout_param_groups
from .kernels import Segment
from .optimizer import GMixoutOptimizer, find_gmixout

__all__ = ["GMixoutOptimizer", "Segment", "find_gmixout", "gmixout_param_groups"]
__version__ = "0.1.0"
