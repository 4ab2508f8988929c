# Two entry points that work on a fresh machine with only Python 3.10+ and make:
#   make demo   generate text with the bundled model on the CPU
#   make test   lint + the test suite (make test-fast: without the slow tests)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: setup demo test test-fast test-floor lint bench
setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m rtdlm generate --prompt 'class Stack:\n    def __init__(self):\n        self.' --preset precise \
		--max-new-tokens 200

lint: $(STAMP)
	$(PY) -m ruff check .

# The whole suite (what CI runs), with the 15 slowest tests listed at the end. The tests
# are compile-bound and XLA compiles on one core, so they run in one worker per core (at
# most 4: each holds up to ~4 GB), a test file per worker (its tests share compiled programs).
PYTEST_WORKERS := -n auto --maxprocesses=4 --dist loadfile
test: lint
	$(PY) -m pytest -q $(PYTEST_WORKERS) --durations=15

# Everything but the long statistical, multi-device, benchmark and end-to-end runs
# (`@pytest.mark.slow`).
test-fast: lint
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m "not slow" --durations=10

# The dependency floors of pyproject.toml: the fast subset against the oldest JAX and Flax
# it declares, in a throwaway virtualenv (the other dependencies at their newest).
FLOOR_VENV ?= /tmp/rtdlm-floor
test-floor:
	python3 -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install -q 'jax==0.10.0' 'jaxlib==0.10.0' 'flax==0.12.8' -e '.[dev]'
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" tests/test_processors.py tests/test_verify.py \
		tests/test_draw.py tests/test_loop.py tests/test_readme.py

bench: $(STAMP)
	$(PY) benchmarks/sampler.py
