# zdepth from a fresh clone in two commands (README, "Quick start"):
#
#   make serve    set up .venv, fetch the default checkpoint if missing, serve on 127.0.0.1:5555
#   make test     set up .venv with the test extra and run the README's test command
#
# ARGS passes flags on: make serve ARGS="--random-weights --port 6000", make test ARGS="-x tests/test_config.py".
# Set-up runs once: each step leaves a stamp file in .venv and is redone only when setup.cfg or
# pyproject.toml change (or the stamp is deleted). An existing .venv is reused as it is.
# `make lint` runs ruff's linter and format check.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# PyPI's Linux torch wheel is the CUDA build; the CPU build comes from PyTorch's own index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=

BIN := $(VENV)/bin
PACKAGING := setup.cfg pyproject.toml
# The CUDA build where an NVIDIA GPU is visible (nvidia-smi runs and lists one), else the CPU build.
TORCH_BUILD := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
ifeq ($(TORCH_BUILD),cuda)
TORCH_INDEX :=
else
TORCH_INDEX := --index-url $(TORCH_CPU_INDEX)
endif

.PHONY: serve test lint

serve: $(VENV)/.stamp-server
	$(BIN)/python -m zdepth serve --fetch-weights $(ARGS)

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q $(ARGS)

# ruff's linter and format check (pyproject.toml), as .ci/run runs them.
lint: $(VENV)/.stamp-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that the extras below never pull another build of it: the wheel from
# the build's index (only torch itself is looked up there), then its dependencies from the usual one.
$(VENV)/.stamp-torch-$(TORCH_BUILD): | $(BIN)/python
	$(BIN)/python -m pip install -q --no-deps $(TORCH_INDEX) torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.stamp-server: $(PACKAGING) $(VENV)/.stamp-torch-$(TORCH_BUILD)
	$(BIN)/python -m pip install -q -e '.[server]'
	touch $@

$(VENV)/.stamp-test: $(PACKAGING) $(VENV)/.stamp-server
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@
