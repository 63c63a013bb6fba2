"""Shared test setup. Runs before any test module imports triton."""
import os
import sys

import torch

# DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR (the tests' launches inherit
# this environment): keep the build inside the venv that runs the tests, as the Makefile does,
# not in ~/.cache/torch_extensions, which other environments on the machine invalidate.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# Without a GPU, Triton kernels run in its interpreter; the flag must be set before `import
# triton` (triton.jit reads it when a kernel is decorated). On a GPU the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
