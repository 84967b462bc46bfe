# Two commands for a fresh machine: `make demo` (the embedded pipeline) and `make test` (the test suite).
# Both create .venv, install the project and fetch Fashion-MNIST from Debian when it is missing; `make test` also
# installs Debian's chromium (the browser test of report.html) when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
# Never reach for a model hub: every weight file is local.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup data browser demo test test-fast test-emulated-cpu clean-demo gpu-check-deps

setup: $(VENV)/.installed

# torch/torchvision first and pinned, so no other package can pull a different build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e ".[test]"
	touch $@

data:
	@if [ ! -f $(FMNIST) ]; then \
		echo "Fashion-MNIST not found: installing the Debian package dataset-fashion-mnist"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# A real headless browser for tests/test_report_html.py. Where it cannot be installed (no root, no Debian), the
# install failure is reported and that test skips, naming the reason; everything else still runs.
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "chromium not found: installing the Debian package chromium"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium \
			|| echo "could not install chromium: the report.html browser test will be skipped"; \
	fi

demo: setup data
	$(VENV)/bin/saliency-lab demo --out outputs/demo

test: setup data browser
	$(PY) -m pytest -n 2 --durations=15 -q
	$(MAKE) --no-print-directory test-emulated-cpu

# The explainer conformance and metric tests again on a CPU without vector extensions (ATen's scalar kernels,
# oneDNN at most AVX2): other kernels sum in another order, so tolerances and tie rules that only hold on the
# developer's CPU fail here instead of on a user's.
EMULATED_TESTS := tests/test_explainers_conformance.py $(wildcard tests/test_metrics_*.py) tests/test_metric_wrappers.py

test-emulated-cpu: setup
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -n 2 -q $(EMULATED_TESTS)

test-fast: setup data browser
	$(PY) -m pytest -n 2 -q -m "not slow"

clean-demo:
	rm -rf outputs/demo

# build/gpu_deps: the packages benchmarks/gpu_check.py needs on a GPU machine beyond the torch, torchvision,
# lightning, timm, torchmetrics and onnx it has there (the list: `python -m benchmarks.gpu_check --print-deps`),
# as wheels for its Python 3.12; there: PYTHONPATH=src:build/gpu_deps python -m benchmarks.gpu_check --out DIR.
# Not part of `make test`.
GPU_DEPS_DIR := build/gpu_deps

gpu-check-deps: setup
	rm -rf $(GPU_DEPS_DIR) && mkdir -p $(GPU_DEPS_DIR)
	deps="$$(PYTHONPATH=src:. $(PY) -m benchmarks.gpu_check --print-deps)"; \
	if [ -n "$$deps" ]; then \
		$(PIP) install --quiet --target $(GPU_DEPS_DIR) --python-version 3.12 --only-binary=:all: \
			--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --no-deps $$deps; \
	else \
		echo "benchmarks/gpu_check.py needs nothing beyond the GPU machine's own packages"; \
	fi
	@du -sh $(GPU_DEPS_DIR)
