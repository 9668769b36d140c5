# The two commands of the README, plus helpers. Everything installs what it needs first.
PY ?= python3
export ENSEMBLE_LORA_CACHE ?= $(HOME)/.cache/ensemble-lora
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo benchmark test test-fast bench

SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install:
	$(PY) -m pip install -q -r requirements-lock.txt
	$(PY) -m pip install -q --no-deps -e .
	@# Redis, for the tests of several machines (tests/servers.py starts one on 127.0.0.1)
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

## The main job: the whole pipeline on SmolLM2-135M and six GLUE/SuperGLUE tasks.
demo: install
	ensemble-lora run configs/demo.yaml

## The paper's baselines and three seeds, with confidence intervals (BENCHMARKS.md).
benchmark: install
	ensemble-lora benchmark configs/demo.yaml --seeds 3 \
	    --set "evaluation.baselines=[per-task, mtl-ft, random-groups, gradient-groups]"

## The test suite (what CI runs).
## Two workers (pytest-xdist), one test module each at a time: most of the integration tests'
## time is Prefect servers, workers and subprocesses starting and waiting (BENCHMARKS.md).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -n $(TEST_WORKERS) --dist loadfile \
	    --no-loadscope-reorder

## The unit tests only: no Prefect server, no subprocess, no real model (tests/conftest.py).
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration"

bench: install
	$(PY) bench/gradients.py
