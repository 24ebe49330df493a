# meshlink — the commands a newcomer runs. Everything installs into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DISTS  := $(sort $(dir $(wildcard adapters/*/pyproject.toml contrib/*/pyproject.toml)))
SRCS   := src $(addsuffix src,$(DISTS))
LINTED := src tests examples benchmarks scripts $(DISTS)
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit chaos bench clean

$(STAMP): pyproject.toml $(addsuffix pyproject.toml,$(DISTS))
	$(PYTHON) -c 'import sys; sys.exit("meshlink needs Python >= 3.11" if sys.version_info < (3, 11) else 0)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' $(addprefix -e ,$(DISTS))
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install every distribution of the repository with the dev tools

demo: $(STAMP)  ## run the example services on memory://: billing with failures, then a checkout saga
	$(PY) examples/02_demo.py
	@echo
	$(PY) examples/03_checkout_saga.py

lint: $(STAMP)
	$(VENV)/bin/ruff check $(wildcard $(LINTED))
	$(VENV)/bin/ruff format --check $(wildcard $(LINTED))

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict $(SRCS)

unit: $(STAMP)
	$(VENV)/bin/pytest

test: lint typecheck unit  ## lint, type-check and run the whole test suite (real brokers)

chaos: $(STAMP)  ## long fault and soak scenarios
	$(VENV)/bin/pytest -m chaos

bench: $(STAMP)
	$(PY) benchmarks/memory_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
