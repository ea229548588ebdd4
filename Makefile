# The two commands of the README, plus the checks CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-shuffled ensure-mosquitto lint typecheck check bench bench-fleet docs clean

# The venv itself; each extra below has its own marker, so `make test` after `make demo`
# adds the dev extra to the same venv.
$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "edge-agent needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo: the runtime dependencies, onnx (builds its model) and the embedded broker. No
# test tooling: on a Raspberry Pi that is minutes and hundreds of MB saved.
$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PY) -m pip uninstall -q -y edge-agent 2>/dev/null || true
	$(PY) -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed: pyproject.toml | $(PY)
	# the distribution's earlier name (taken on PyPI by another project), if this venv has it
	$(PY) -m pip uninstall -q -y edge-agent 2>/dev/null || true
	# demo too: the embedded-broker test runs here (amqtt needs a newer pyyaml than the
	# oldest the second CI leg pins, which installs dev alone and skips that test)
	$(PY) -m pip install -q -e '.[dev,demo]'
	# silero-vad ships the VAD model the stateful-stream test uses; --no-deps keeps torch out.
	$(PY) -m pip install -q --no-deps 'silero-vad>=5'
	touch $@

# `make docs`: MkDocs and the Material theme, for the site built from docs/ and mkdocs.yml.
$(VENV)/.docs-installed: pyproject.toml | $(PY)
	$(PY) -m pip uninstall -q -y edge-agent 2>/dev/null || true
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

demo: $(VENV)/.demo-installed   ## run the daemon on a simulated sensor, print results (Ctrl-C stops)
	$(PY) scripts/demo.py

# Listed first: a missing Mosquitto is reported (or installed) before minutes of pip.
# Three workers (pytest-xdist): the tests mostly wait on brokers and daemons, so three share
# two cores well (5 min instead of 12 on 2 cores). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 3
test: ensure-mosquitto $(VENV)/.installed   ## the whole test suite (starts its own Mosquitto instances)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# In one process: pytest-xdist needs every worker to collect the same order.
test-shuffled: ensure-mosquitto $(VENV)/.installed   ## the suite in a random order; SEED=n repeats one order
	$(PY) -m pytest -q $(if $(SEED),--random-order-seed=$(SEED),--random-order)

ensure-mosquitto:   ## install Mosquitto (root or passwordless sudo), else name the command
	@sh scripts/ensure-mosquitto.sh

bench: $(VENV)/.installed   ## daemon vs raw onnxruntime vs a hand-written loop (a few minutes)
	$(PY) scripts/bench.py
	$(PY) scripts/bench_reload.py
	$(PY) scripts/bench_update.py
	$(PY) scripts/bench_overload.py

bench-fleet: $(VENV)/.installed   ## rollouts: 30 daemons, then 10,000 simulated devices (about 12 minutes)
	$(PY) scripts/bench_fleet.py
	$(PY) scripts/bench_rollout.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

docs: $(VENV)/.docs-installed   ## build the documentation site into site/; a broken link or anchor fails it
	# MkDocs 2 is not compatible with the Material theme: pinned below 2 in pyproject.toml
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

check: lint typecheck test

clean:
	rm -rf demo-run site .pytest_cache .mypy_cache .ruff_cache
