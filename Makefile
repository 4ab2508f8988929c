# Two entry points that work on a fresh machine with only Python 3.10+ and make:
#   make demo   generate text with the bundled model on the CPU
#   make test   lint + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: setup demo test lint bench
setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m rtdlm generate --prompt 'def fib(n):\n    ' --preset balanced --max-new-tokens 200

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/sampler.py
