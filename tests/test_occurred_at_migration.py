"""The ``add_memories_occurred_at`` migration on both databases: ``up`` on a store that already
holds memories gives each its ``created_at``, ``down`` takes the column and its indexes away
and leaves the memories; a driver on the rolled-back schema refuses clearly."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.core.database.migrator import Migrator, SqliteMigrationDatabase, migrations_dir
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.errors import SchemaNotMigratedError
from tests.conftest import migrate_postgres, migrate_sqlite
from tests.word_hash_embedder import WordHashEmbedder

MIGRATION = "2026_11_29_000002_add_memories_occurred_at"
NEW_INDEXES = {"memories_user_conversation_occurred", "memories_user_occurred"}


class Store:
    """One migrated database: a driver factory, the migrator and plain SQL on it."""

    def __init__(self, kind: str, make_db: Callable[[], Any], make_driver: Callable[[], Any],
                 query: Callable[[str], list[tuple[Any, ...]]]) -> None:
        self.kind, self.make_db, self.make_driver, self.query = kind, make_db, make_driver, query

    def migrator(self, action: Callable[[Migrator], Any]) -> Any:
        db = self.make_db()
        try:
            return action(Migrator(db, migrations_dir(self.kind), out=lambda line: None))
        finally:
            db.close()

    def columns(self) -> set[str]:
        if self.kind == "sqlite":
            return {row[1] for row in self.query("PRAGMA table_info(memories)")}
        return {row[0] for row in self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'memories'")}

    def indexes(self) -> set[str]:
        if self.kind == "sqlite":
            return {row[0] for row in self.query(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'memories'")}
        return {row[0] for row in self.query(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'memories'")}


@pytest.fixture(params=["sqlite", "pgvector"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    embedder = WordHashEmbedder()
    if request.param == "sqlite":
        path = migrate_sqlite(tmp_path / "memory.sqlite3")

        def query(sql: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(path) as connection:
                return connection.execute(sql).fetchall()

        yield Store("sqlite", lambda: SqliteMigrationDatabase(path),
                    lambda: SqliteDriver(path=path, embedder=embedder), query)
        return
    import psycopg

    from app.core.database.postgres_migration import PostgresMigrationDatabase

    url = migrate_postgres(request.getfixturevalue("blank_database"))

    def pg_query(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(url) as connection:
            return connection.execute(sql).fetchall()

    yield Store("pgvector", lambda: PostgresMigrationDatabase(url),
                lambda: PgvectorDriver(url=url, embedder=embedder), pg_query)


def test_up_backfills_created_at_and_down_removes_the_column(store: Store) -> None:
    driver: BaseMemoryDriver = store.make_driver()
    try:
        stored = [driver.store("alice", "Adopted a cat", "c1"),
                  driver.store("alice", "Moved to Lisbon", key="home",
                               occurred_at=datetime(2020, 2, 2, tzinfo=UTC)),
                  driver.store("bob", "Plays the cello")]
    finally:
        driver.close()
    assert "occurred_at" in store.columns() and store.indexes() >= NEW_INDEXES

    # This migration and the ones after it (their down first), back to the schema before it.
    since = store.migrator(lambda m: [name for name in m.files() if name >= MIGRATION])
    assert sorted(store.migrator(lambda m: m.rollback(step=len(since)))) == since
    assert "occurred_at" not in store.columns()
    assert not NEW_INDEXES & store.indexes()
    assert "memories_user_conversation" in store.indexes()
    assert len(store.query("SELECT id FROM memories")) == 3  # down keeps the memories
    stale = store.make_driver()
    try:
        with pytest.raises(SchemaNotMigratedError, match="migrate"):
            stale.get(stored[0]["id"])
    finally:
        stale.close()

    # up on the populated, pre-migration store: every memory gets its created_at.
    assert store.migrator(lambda m: m.migrate()) == since
    assert "occurred_at" in store.columns() and store.indexes() >= NEW_INDEXES
    assert "memories_user_conversation" not in store.indexes()  # a prefix of the new index
    assert store.query("SELECT COUNT(*) FROM memories WHERE occurred_at <> created_at") == [(0,)]
    driver = store.make_driver()
    try:
        for memory in stored:
            found = driver.get(memory["id"])
            assert found is not None
            assert found["occurred_at"] == found["created_at"] == memory["created_at"]
        assert driver.store("alice", "After the migration")["occurred_at"] is not None
    finally:
        driver.close()
