"""Shared test setup. Runs before any test module imports triton."""
import os

import torch

# Without a GPU, Triton kernels run in its interpreter; the flag must be set before `import
# triton` (triton.jit reads it when a kernel is decorated). On a GPU the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
