"""GMixout's per-shard kernels: one op per module, a PyTorch reference beside each Triton kernel.

The optimizer calls only the dispatching functions below: CUDA tensors take Triton (when it
imports), everything else the PyTorch path; ``set_backend("torch"|"triton"|"auto")`` or the
``GMIXOUT_BACKEND`` environment variable forces one. See docs/kernels.md.
"""
from ._dispatch import HAS_TRITON, get_backend, set_backend
from .adamw import fused_adamw_step
from .gather import gather_grad
from .merge import merge_episode
from .philox import philox_seed, philox_uniform
from .support import Segment, draw_support, support_capacity
from .write import support_anchor, write_weights

__all__ = [
    "HAS_TRITON", "Segment", "draw_support", "fused_adamw_step", "gather_grad", "get_backend",
    "merge_episode", "philox_seed", "philox_uniform", "set_backend", "support_anchor",
    "support_capacity", "write_weights",
]
