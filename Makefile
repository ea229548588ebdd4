# The two commands of the README, plus the checks CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-shuffled lint typecheck check bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "edge-agent needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# silero-vad ships the VAD model the stateful-stream test uses; --no-deps keeps torch out.
	$(PY) -m pip install -q --no-deps 'silero-vad>=5'
	touch $@

demo: $(VENV)/.installed   ## run the daemon on a simulated sensor, print results (Ctrl-C stops)
	$(PY) scripts/demo.py

test: $(VENV)/.installed   ## the whole test suite (starts its own Mosquitto instances)
	$(PY) -m pytest -q

test-shuffled: $(VENV)/.installed   ## the suite in a random order; SEED=n repeats one order
	$(PY) -m pytest -q $(if $(SEED),--random-order-seed=$(SEED),--random-order)

bench: $(VENV)/.installed   ## daemon vs raw onnxruntime vs a hand-written loop (a few minutes)
	$(PY) scripts/bench.py
	$(PY) scripts/bench_reload.py
	$(PY) scripts/bench_update.py
	$(PY) scripts/bench_overload.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf demo-run .pytest_cache .mypy_cache .ruff_cache
