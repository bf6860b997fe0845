# facefuse: the two commands a new user needs are `make demo` and `make test` (see README).
# Everything runs as local processes; test-compose and the docker targets use a container engine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Extra pip index for torch (e.g. a CUDA or CPU build index); empty = pip's configured indexes.
TORCH_INDEX ?=
STAMP := $(VENV)/.facefuse-installed
OUT ?= facefuse-demo

.PHONY: help install protos check-protos demo lint test test-fast test-compose smoke up down compose-config bench clean

help:
	@echo "make demo     set up .venv and run the demo (local mesh, open pack) into ./$(OUT)"
	@echo "make test     set up .venv and run the whole test suite (ruff + mypy first)"
	@echo "make lint     ruff and mypy only"
	@echo "make protos   regenerate src/facefuse/v1 from protos/"
	@echo "make smoke    start the mesh locally and call it with grpcurl"
	@echo "make test-compose  build the images and test the mesh in containers (sets up an engine if none)"
	@echo "make up       docker compose up (needs a Docker engine)"

$(STAMP): pyproject.toml constraints.txt requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ]; then $(PIP) install --quiet --index-url "$(TORCH_INDEX)" torch==2.13.0; fi
	$(PIP) install --quiet -c constraints.txt -r requirements/dev.txt -e .
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=src --pyi_out=src --grpc_python_out=src protos/facefuse/v1/*.proto

check-protos: $(STAMP)
	$(PY) -m pytest -q tests/unit/test_protos.py

demo: $(STAMP)
	$(PY) -m facefuse.client.cli demo -o $(OUT)

# ruff and mypy (config in pyproject.toml) run first: a lint or type error fails `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The container suite (not part of `make test`): builds the four images, runs docker-compose.yml, tests it.
test-compose: $(STAMP)
	PY=$(PY) bash deploy/test-compose.sh

smoke: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash deploy/smoke.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_grpc_hop.py

# Compose v2 (`docker compose`) where installed, else docker-compose v1.29.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

up:
	$(COMPOSE) up --build -d

down:
	$(COMPOSE) down

compose-config:
	docker-compose -f docker-compose.yml config -q || docker compose -f docker-compose.yml config -q
	docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q || docker compose -f docker-compose.yml -f docker-compose.gpu.yml config -q

clean:
	rm -rf $(VENV) .pytest_cache $(OUT)
