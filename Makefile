# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both build .venv with the pinned torch pair first (torch/torchvision lie on the
# machine's local package index; everything else comes from PyPI).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR: keep that build inside this
# venv (make clean drops it), not in ~/.cache/torch_extensions, which every environment on
# the machine shares and invalidates. Exported to every recipe that may start DeepSpeed.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv demo compare test bench gpu-check clean

$(STAMP): setup.py requirements-pinned.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -r requirements-pinned.txt
	# deepspeed's setup.py imports torch: build it against the torch just installed.
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	# animal-mnist's metadata requires tensorflow, which only its unused loader module imports; the
	# harness reads the package's two data files directly (finetune/datasets/animal_mnist.py).
	$(BIN)/pip install -q --no-deps animal-mnist==0.4
	$(BIN)/pip install -q --no-build-isolation -e ".[all]"
	# DeepSpeed JIT-builds its CPU shared-memory comm op on first use: build it once here, not in the tests.
	DS_ACCELERATOR=cpu $(BIN)/python -m gmixout_optim.integrations.deepspeed
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gmixout-finetune --config configs/experiments/demo.yaml

compare: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/gmixout-finetune --config configs/experiments/compare_v2_controlled.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/kernels.py

# On a GPU machine, under 8 minutes: the kernel tests on CUDA (the ahead-of-time compile test
# included), then the benchmarks, writing benchmarks/results/*_<gpu>.json. GPU_PY: a Python
# with this package, torch and triton (the machine's own, when .venv was not carried there).
GPU_PY ?= $(BIN)/python
gpu-check:
	$(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device')"
	OMP_NUM_THREADS=4 timeout 200 $(GPU_PY) -m pytest -q tests/test_kernels_*.py
	timeout 200 $(GPU_PY) benchmarks/kernels.py --out benchmarks/results
	if [ -f benchmarks/memory.py ]; then timeout 60 $(GPU_PY) benchmarks/memory.py --device cuda; fi

clean:
	rm -rf $(VENV) build *.egg-info
