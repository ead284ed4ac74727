"""Fresh, empty storage for a benchmark run, per driver, removed afterwards.

``open_backend(name)`` is a context manager yielding a ``Backend``: a migrated SQLite file in a
temporary folder, a new PostgreSQL database on ``MEMORY_BENCH_PG_ADMIN_URL`` (default: the local
server's ``postgres`` database; dropped at the end), or the AutoMem test double serving on a free
127.0.0.1 port (stopped at the end). ``Backend.driver(...)`` builds as many drivers on it as the
benchmark needs (e.g. one ranking by the default fusion and one by cosine alone).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.core.database.migrator import Migrator, migrations_dir
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.embeddings import Embedder
from app.core.memory.ranking import DEFAULT_WEIGHTS, FusionWeights

DRIVERS = ("sqlite", "pgvector", "automem")
PG_ADMIN_URL = os.environ.get("MEMORY_BENCH_PG_ADMIN_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
AUTOMEM_TOKEN = "bench-token"


@dataclass
class Backend:
    """Where a benchmark's memories live, and how to build drivers on it."""

    name: str
    location: str
    driver: Callable[..., BaseMemoryDriver]
    #: Brings the storage to the steady state it reaches on its own after a bulk load.
    settle: Callable[[], None] = lambda: None


@contextmanager
def open_backend(name: str) -> Iterator[Backend]:
    """Empty, migrated storage for driver ``name``; removed when the block ends."""
    if name == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield _sqlite(Path(folder) / "bench.sqlite3")
    elif name == "pgvector":
        with _postgres_database() as url:
            yield _pgvector(url)
    elif name == "automem":
        from tests.automem_double import AutomemDouble

        double = AutomemDouble(token=AUTOMEM_TOKEN)
        url = double.start()
        try:
            yield _automem(url)
        finally:
            double.stop()
    else:
        raise ValueError(f"unknown driver {name!r}; choose from {', '.join(DRIVERS)}")


def _sqlite(path: Path) -> Backend:
    from app.core.database.migrator import SqliteMigrationDatabase
    from app.core.memory.drivers.sqlite_driver import SqliteDriver

    database = SqliteMigrationDatabase(path)
    try:
        Migrator(database, migrations_dir("sqlite"), out=lambda line: None).migrate()
    finally:
        database.close()

    def driver(embedder: Embedder | None = None,
               weights: FusionWeights = DEFAULT_WEIGHTS) -> BaseMemoryDriver:
        return SqliteDriver(path=path, embedder=embedder, weights=weights)

    return Backend("sqlite", str(path), driver)


@contextmanager
def _postgres_database() -> Iterator[str]:
    import psycopg
    from psycopg.conninfo import make_conninfo

    from app.core.database.postgres_migration import PostgresMigrationDatabase

    name = f"memory_bench_{secrets.token_hex(4)}"
    url = make_conninfo(PG_ADMIN_URL, dbname=name)
    database = PostgresMigrationDatabase(url, create_missing=True)
    try:
        Migrator(database, migrations_dir("pgvector"), out=lambda line: None).migrate()
        database.close()
        yield url
    finally:
        database.close()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pgvector(url: str) -> Backend:
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    def driver(embedder: Embedder | None = None,
               weights: FusionWeights = DEFAULT_WEIGHTS) -> BaseMemoryDriver:
        return PgvectorDriver(url=url, embedder=embedder, weights=weights)

    def settle() -> None:
        # What autovacuum does within a minute or so of a bulk load: planner statistics, and the
        # visibility map that lets a user's rows be counted from the index alone.
        import psycopg

        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("VACUUM ANALYZE")

    return Backend("pgvector", url, driver, settle)


def _automem(url: str) -> Backend:
    from app.core.memory.drivers.automem_driver import AutomemDriver

    def driver(embedder: Embedder | None = None,
               weights: FusionWeights = DEFAULT_WEIGHTS) -> BaseMemoryDriver:
        # The service embeds and ranks on its side: embedder and weights do not apply.
        return AutomemDriver(url=url, token=AUTOMEM_TOKEN)

    return Backend("automem", url, driver)
