# One entry point for humans and CI. `make test` creates (or reuses) .venv, installs the project
# with its test extras under constraints.txt (torch pinned to the CPU wheel), then runs pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --constraint constraints.txt

.PHONY: install test test-fast research lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	touch $@

# Two test processes, one per core; the tests of one file stay in one process (they share
# its fits).
test: install
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast: install
	$(PY) -m pytest -m "not slow"

# The probe behind the demo's image settings (docs/demo/research.md), a minute: not in `make test`.
research: install
	$(PY) -m pytest --research -m research

lint: install
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tests scripts

demo: install
	$(PY) -m safegrpo_pl fit --config configs/tiny.yaml

bench: install
	$(PIP) -e ".[test,bench]"
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
