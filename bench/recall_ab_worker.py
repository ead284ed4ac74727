"""One side of ``bench.recall_ab``: a scratch store of one driver, loaded, then timed recalls.

    python -P bench/recall_ab_worker.py --driver sqlite --corpus FOLDER
    (cwd and PYTHONPATH: the tree whose ``app`` is measured)

The controller starts this file from the current work tree, but with the working directory and
``PYTHONPATH`` of the side it measures, which may be an older commit's worktree (``-P``: this
file's folder is not put on ``sys.path``, so nothing of the current ``bench`` is imported).
Hence it relies only on what every commit of the project has had: ``app``'s ``Migrator`` and
migration databases, the drivers' keyword constructors with ``embedder=``, ``store_many`` and
``recall``; and numpy. Stored rows are the same on every side: the corpus's texts and vectors
for one user, nothing else given (no ``occurred_at``: older commits have no such field).

Protocol, one JSON line per answer on stdout: ``{"ready": ...}`` once the store is loaded, then
for every ``run`` line read on stdin, the seconds each recall of the block took. End of input
(or ``quit``) ends the worker, its scratch store removed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np

PG_ADMIN_URL = os.environ.get("MEMORY_BENCH_PG_ADMIN_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
LOAD_BATCH = 1_000
TOP_K = 10


class PresetEmbedder:
    """An ``Embedder`` that never runs a model: documents take the queued vectors in order, a
    query its preset vector (a dict lookup, so recall is timed without the query embedding)."""

    def __init__(self, model_name: str, dimension: int, queries: dict[str, np.ndarray]) -> None:
        self.model_name = model_name
        self.dimension = dimension
        self._queries = queries
        self._documents: list[np.ndarray] = []

    def queue_documents(self, vectors: np.ndarray) -> None:
        self._documents.extend(vectors)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        # The drivers may ask in chunks (pgvector encodes ahead on a thread), always in order.
        if len(texts) > len(self._documents):
            raise RuntimeError(f"{len(texts)} texts to embed, {len(self._documents)} vectors left")
        batch, self._documents = self._documents[:len(texts)], self._documents[len(texts):]
        return np.stack(batch)

    def embed_query(self, text: str) -> np.ndarray:
        return self._queries[text]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", choices=("sqlite", "pgvector"), required=True)
    parser.add_argument("--corpus", type=Path, required=True, help="folder bench.recall_ab wrote")
    args = parser.parse_args(argv)
    # Answers go to the real stdout; a stray print from the library goes to stderr instead.
    answers, sys.stdout = sys.stdout, sys.stderr
    corpus = json.loads((args.corpus / "corpus.json").read_text(encoding="utf-8"))
    vectors = np.load(args.corpus / "memories.npy")
    queries = dict(zip(corpus["queries"], np.load(args.corpus / "queries.npy"), strict=True))
    embedder = PresetEmbedder(corpus["model"], corpus["dimension"], queries)
    with _scratch_store(args.driver, embedder) as (driver, settle):
        started = time.perf_counter()
        _load(driver, embedder, corpus["user"], corpus["texts"], vectors)
        settle()
        import app

        _answer(answers, {"ready": True, "app": app.__file__,
                          "load_s": round(time.perf_counter() - started, 2)})
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            _answer(answers, {"seconds": _block(driver, corpus["user"], corpus["queries"])})
    return 0


def _scratch_store(name: str, embedder: PresetEmbedder) -> Any:
    """A context manager: a driver on a new store migrated by this tree's migrations, and the
    store's ``settle``; the store is removed when the block ends."""
    return _sqlite_store(embedder) if name == "sqlite" else _pgvector_store(embedder)


@contextmanager
def _sqlite_store(embedder: PresetEmbedder) -> Iterator[tuple[Any, Callable[[], None]]]:
    from app.core.database.migrator import SqliteMigrationDatabase
    from app.core.memory.drivers.sqlite_driver import SqliteDriver

    with tempfile.TemporaryDirectory(prefix="bench-recall-ab-") as folder:
        path = Path(folder) / "memory.sqlite3"
        _migrate(SqliteMigrationDatabase(path), "sqlite")
        driver = SqliteDriver(path=path, embedder=embedder)
        try:
            yield driver, lambda: None
        finally:
            driver.close()


@contextmanager
def _pgvector_store(embedder: PresetEmbedder) -> Iterator[tuple[Any, Callable[[], None]]]:
    import psycopg
    from psycopg.conninfo import make_conninfo

    from app.core.database.postgres_migration import PostgresMigrationDatabase
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    database_name = f"memory_bench_ab_{secrets.token_hex(4)}"
    url = make_conninfo(PG_ADMIN_URL, dbname=database_name)

    def settle() -> None:
        # What autovacuum does soon after a bulk load (planner statistics, visibility map), so
        # that both sides are timed in the steady state rather than in whatever the load left.
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("VACUUM ANALYZE")

    try:
        _migrate(PostgresMigrationDatabase(url, create_missing=True), "pgvector")
        driver = PgvectorDriver(url=url, embedder=embedder)
        try:
            yield driver, settle
        finally:
            driver.close()
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database_name}" WITH (FORCE)')


def _migrate(database: Any, backend: str) -> None:
    """Run every migration of ``backend`` (this side's) on ``database``, then close it."""
    from app.core.database.migrator import Migrator, migrations_dir

    try:
        Migrator(database, migrations_dir(backend), out=lambda line: None).migrate()
    finally:
        database.close()


def _load(driver: Any, embedder: PresetEmbedder, user: str, texts: list[str],
          vectors: np.ndarray) -> None:
    for start in range(0, len(texts), LOAD_BATCH):
        stop = min(start + LOAD_BATCH, len(texts))
        embedder.queue_documents(vectors[start:stop])
        driver.store_many([{"user_id": user, "content": texts[i]} for i in range(start, stop)])


def _block(driver: Any, user: str, queries: list[str]) -> list[float]:
    """The seconds of each hybrid top-10 recall, one query after another."""
    seconds = []
    for query in queries:
        start = time.perf_counter()
        hits = driver.recall(user, query=query, top_k=TOP_K)
        seconds.append(time.perf_counter() - start)
        if len(hits) != TOP_K:  # checked outside the timing; a short answer is a broken side
            raise RuntimeError(f"recall of {query!r} gave {len(hits)} memories, not {TOP_K}")
    return seconds


def _answer(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
