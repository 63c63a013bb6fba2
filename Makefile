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

.PHONY: venv demo compare test bench clean

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
	$(BIN)/gmixout-finetune --config configs/experiments/compare.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
