"""Migrations under fire: ``fresh`` and ``rollback`` while a driver keeps writing to the same
database (SQLite and PostgreSQL), and two ``migrate`` runs at once on PostgreSQL. The writer may
see ``SchemaNotMigratedError`` or ``BackendUnavailableError`` while the schema is away, never a raw
error or a hang, and works again once the schema is back."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from app.core.memory import MemoryDriverError, SchemaNotMigratedError
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from tests.conftest import PROJECT_ROOT, migrate_sqlite
from tests.word_hash_embedder import WordHashEmbedder


def migrate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "migrate.py", *args], cwd=PROJECT_ROOT, env={
        **os.environ, "APP_ENV": "local", **env}, capture_output=True, text=True, timeout=120)


def under_fire(driver: BaseMemoryDriver, commands: list[Callable[[], object]]) -> list[str]:
    """Run ``commands`` one after another while a thread stores and recalls; returns the
    kinds of errors the thread saw (every one must be a contract error)."""
    seen: list[str] = []
    stop = threading.Event()

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            try:
                driver.store("alice", f"note {i} while the schema changes")
                driver.recall("alice", query=f"note {i}")
            except MemoryDriverError as error:
                seen.append(type(error).__name__)
            except Exception as error:  # noqa: BLE001 - a raw error is what this test hunts
                seen.append(f"RAW {error!r}")
            i += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.3)
        for command in commands:
            command()
            time.sleep(0.3)
    finally:
        stop.set()
        writer.join(timeout=60)
    assert not writer.is_alive(), "the writer hung"
    assert not [kind for kind in seen if kind.startswith("RAW")], seen
    return seen


def check_commands(driver: BaseMemoryDriver, run: Callable[..., subprocess.CompletedProcess[str]]):
    driver.store("alice", "kept before the storm")
    results: list[subprocess.CompletedProcess[str]] = []
    under_fire(driver, [lambda: results.append(run("fresh")),
                        lambda: results.append(run("rollback", "--force")),
                        lambda: results.append(run())])
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    # fresh emptied the store; what is there now was written after the last migrate
    assert all("while the schema changes" in m["content"]
               for m in driver.list_memories("alice", limit=500)["items"])
    driver.store("alice", "after the storm")
    assert driver.recall("alice", query="after the storm", top_k=1)[0]["content"] == \
        "after the storm"


def test_sqlite_fresh_and_rollback_while_a_driver_writes(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "fire.sqlite3")
    driver = SqliteDriver(path=path, embedder=WordHashEmbedder())
    env = {"MEMORY_DRIVER": "sqlite", "MEMORY_SQLITE_PATH": str(path)}
    check_commands(driver, lambda *args: migrate(*args, env=env))
    migrate("rollback", "--force", env=env)
    try:
        driver.store("alice", "no schema")
    except SchemaNotMigratedError as error:
        assert "migrate.py" in str(error)
    else:
        raise AssertionError("a store without a schema must raise SchemaNotMigratedError")
    driver.close()


def test_postgres_fresh_and_rollback_while_a_driver_writes(empty_pg: str):
    driver = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder(), pool_timeout=5.0)
    env = {"MEMORY_DRIVER": "pgvector", "DATABASE_URL": empty_pg}
    check_commands(driver, lambda *args: migrate(*args, "--database", "pgvector", env=env))
    driver.close()


def test_two_postgres_migrations_at_once_do_not_interleave(blank_database: str):
    env = {"MEMORY_DRIVER": "pgvector", "DATABASE_URL": blank_database}
    runs = [subprocess.Popen([sys.executable, "migrate.py", "--database", "pgvector"],
                             cwd=PROJECT_ROOT, env={**os.environ, **env}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count("Nothing to migrate") == 1 and "Migrated:" in stdout
    with psycopg.connect(blank_database) as connection:
        ran = connection.execute("SELECT migration, COUNT(*) FROM migrations GROUP BY 1")
        assert all(count == 1 for _, count in ran.fetchall())
