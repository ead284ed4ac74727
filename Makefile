# The project's entry points. `make demo` and `make test` are the README's quick start.
PY := .venv/bin/python

.PHONY: install models demo install-dev test lint bench-perf bench-retrieval

install:  ## the package (torch CPU build) into .venv, and the ONNX embedding model prepared
	scripts/install.sh

models:  ## (re)prepare the ONNX embedding model files only (python -m app models prepare)
	$(PY) -m app models prepare

demo: install  ## install, migrate the SQLite file, store and recall with the real model
	$(PY) migrate.py
	$(PY) -m app demo

install-dev:  ## everything the tests need: the package with its extras, PostgreSQL with pgvector
	scripts/install.sh dev pgvector automem service
	scripts/install-postgres.sh

test: install-dev  ## install what the tests need and run them
	$(PY) -m pytest

lint: install-dev  ## ruff and mypy
	$(PY) -m ruff check app config database tests bench migrate.py
	$(PY) -m mypy app config bench migrate.py

bench-perf: install-dev  ## speed and memory of every driver and embedding backend (~30 min)
	$(PY) -m bench.perf

bench-retrieval:  ## retrieval quality on LoCoMo (needs ../shared/bench/locomo-dev.json)
	scripts/install.sh bench pgvector
	$(PY) -m bench.retrieval
