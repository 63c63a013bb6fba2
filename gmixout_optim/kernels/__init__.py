"""GMixout's per-shard kernels: one op per module, a PyTorch reference beside each Triton kernel.

The optimizer calls only the dispatching functions below: CUDA tensors take Triton (when it
imports), everything else the PyTorch path; ``set_backend("torch"|"triton"|"auto")`` or the
``GMIXOUT_BACKEND`` environment variable forces one. See docs/kernels.md.
"""
from ._dispatch import HAS_TRITON, get_backend, record, set_backend
from ._table import TensorGroup
from .adamw import fused_adamw_step, fused_adamw_step_grouped
from .gather import gather_grad, gather_grad_grouped
from .merge import merge_episode, merge_episode_grouped
from .philox import philox_seed, philox_uniform
from .remap import RemapPlan, remap_state_grouped
from .support import Segment, SupportPlan, draw_support, draw_support_grouped, support_capacity
from .write import read_anchor_grouped, support_anchor, support_anchor_grouped, write_weights, write_weights_grouped

__all__ = [
    "HAS_TRITON", "RemapPlan", "Segment", "SupportPlan", "TensorGroup", "draw_support", "draw_support_grouped",
    "fused_adamw_step", "fused_adamw_step_grouped", "gather_grad", "gather_grad_grouped", "get_backend",
    "merge_episode", "merge_episode_grouped", "philox_seed", "philox_uniform", "read_anchor_grouped", "record", "remap_state_grouped",
    "set_backend", "support_anchor", "support_anchor_grouped", "support_capacity", "write_weights",
    "write_weights_grouped",
]
