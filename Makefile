# atelier: `make demo` runs a whole look on CPU; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MODELS ?= var/models

.PHONY: install services bench-tools db model demo test lint run clean

# The venv, with everything (torch included) from pyproject.toml. Re-runs when it changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

services:
	@scripts/services.sh

# What the benchmarks drive from outside Python: wrk (bench.api_polling), from apt.
bench-tools: install
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

db: install services
	$(PY) -m core.db.create
	$(VENV)/bin/alembic upgrade head

# The `tiny` profiles' checkpoints: real diffusers/transformers/open_clip classes, seeded
# random weights (Stable Diffusion, and the fashion CLIP).
model: install
	$(PY) -m core.ml.tiny $(MODELS)/tiny
	$(PY) -m core.ml.fashion_clip.tiny $(MODELS)/clip-tiny

demo: db model
	$(PY) -m demo

run: db model
	$(PY) -m demo --serve-only

test: install services
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy api client worker scheduler transport core demo bench

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
