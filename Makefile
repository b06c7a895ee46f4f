# `make run` and `make test` are all a fresh machine needs: they create .venv with pip first.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# Where pip gets torch and torchvision when it creates .venv; empty: PyPI's default (the CUDA build
# on Linux). TORCH_INDEX=https://download.pytorch.org/whl/cpu: PyTorch's CPU-only wheels, far smaller.
TORCH_INDEX ?=

.PHONY: run test test-all lint ui
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(VENV)/bin/pip install -q torch torchvision --index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.installed   ## train; extra Hydra overrides in ARGS="experiment=tutorial_fast ..."
	$(PY) -m cifar_exp $(ARGS)

test: $(VENV)/.installed  ## the default suite (a few minutes on 2 cores)
	$(PY) -m pytest -q $(ARGS)

test-all: $(VENV)/.installed  ## default suite, then the slow end-to-end tests
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

ui: $(VENV)/.installed
	$(VENV)/bin/cifar-exp ui
