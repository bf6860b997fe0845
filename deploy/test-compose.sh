#!/usr/bin/env bash
# `make test-compose`: build the images and run the container test (tests/compose) against a Docker-API
# engine. When none answers, sets up and starts the shared container engine
# (../shared/tools/container-engine, or FACEFUSE_CONTAINER_ENGINE). Picks where torch comes from unless
# FACEFUSE_TORCH_SOURCE is set: the CUDA wheel from PyPI on a host with an NVIDIA GPU, else a local
# torch-2.13.0 wheel that pip can find without an index (copied into deploy/wheels/), else the CPU index.
# Always cleans up: `down -v` of the test project, and `engine stop` if this script started the engine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ENGINE_DIR=${FACEFUSE_CONTAINER_ENGINE:-../shared/tools/container-engine}
export FACEFUSE_COMPOSE_PROJECT=${FACEFUSE_COMPOSE_PROJECT:-facefuse-ctest}

engine_answers() { "$PY" -c "import docker; docker.from_env(timeout=10).ping()" >/dev/null 2>&1; }
compose() {
  if command -v docker-compose >/dev/null 2>&1; then docker-compose "$@"; else docker compose "$@"; fi
}

started_engine=0
cleanup() {
  status=$?
  if engine_answers; then
    compose -p "$FACEFUSE_COMPOSE_PROJECT" -f docker-compose.yml down -v -t 0 --remove-orphans >/dev/null 2>&1 || true
    "$PY" -c "import docker; [c.remove(force=True) for c in docker.from_env().containers.list(all=True, filters={'label': 'facefuse.test'})]" \
      >/dev/null 2>&1 || true
  fi
  if [ "$started_engine" = 1 ]; then "$ENGINE_DIR/engine" stop || true; fi
  exit $status
}
trap cleanup EXIT

if ! engine_answers; then
  if [ -x "$ENGINE_DIR/engine" ]; then
    if ! "$ENGINE_DIR/engine" status >/dev/null 2>&1; then
      if ! command -v podman >/dev/null 2>&1 || ! podman image exists python:3.11-slim 2>/dev/null; then
        echo "test-compose: setting up the container engine ($ENGINE_DIR/setup, a few minutes)..."
        "$ENGINE_DIR/setup" >/tmp/facefuse-engine-setup.log 2>&1 \
          || { tail -30 /tmp/facefuse-engine-setup.log >&2; echo "test-compose: engine setup failed" >&2; exit 1; }
      fi
      started_engine=1
    fi
    eval "$("$ENGINE_DIR/engine" start)"
    engine_answers || { echo "test-compose: the engine started but no Docker API answers at ${DOCKER_HOST:-?}" >&2; exit 1; }
  else
    echo "test-compose: WARNING: no Docker API answers and $ENGINE_DIR is missing; the container test will skip" >&2
  fi
fi

if [ -z "${FACEFUSE_TORCH_SOURCE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    export FACEFUSE_TORCH_SOURCE=pypi
  elif compgen -G "deploy/wheels/torch-2.13.0*.whl" >/dev/null \
      || "$PY" -m pip download --quiet --no-index --no-deps torch==2.13.0 -d deploy/wheels >/dev/null 2>&1; then
    export FACEFUSE_TORCH_SOURCE=wheels
  else
    export FACEFUSE_TORCH_SOURCE=index FACEFUSE_TORCH_INDEX_URL=${FACEFUSE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  fi
fi
echo "test-compose: torch from ${FACEFUSE_TORCH_SOURCE}${FACEFUSE_TORCH_INDEX_URL:+ ($FACEFUSE_TORCH_INDEX_URL)}; engine at ${DOCKER_HOST:-the default socket}"
started=$(date +%s)
"$PY" -m pytest -q -s -p no:cacheprovider --compose --timeout 3600 tests/compose "$@"
echo "test-compose: passed in $(( $(date +%s) - started )) s"
