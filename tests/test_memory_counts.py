"""``memory_counts`` (kept by triggers, on SQLite and PostgreSQL) against a plain count, through
every verb that adds, removes, hides or brings back a memory, and the migrations' backfill of
existing rows."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.core.database.migrator import Migrator, SqliteMigrationDatabase, migrations_dir
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.drivers import sqlite_search as search
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.validation import prepare_filters
from tests.conftest import (
    migrate_postgres,
    roll_back_postgres_to_before,
    roll_back_to_before,
)
from tests.word_hash_embedder import WordHashEmbedder

USERS = ("alice", "bob")
MIGRATION = "2026_12_04_000001_add_memory_counts"


@dataclass
class Counted:
    """A driver, and how to read one user's whole-user scope size both ways at a given time:
    ``(from memory_counts, counted from the rows)``."""

    driver: BaseMemoryDriver
    sizes: Callable[[str, float], tuple[int, int]]


def sqlite_sizes(path: Path) -> Callable[[str, float], tuple[int, int]]:
    def sizes(user_id: str, now: float) -> tuple[int, int]:
        with sqlite3.connect(path) as conn:
            scope = search.memory_scope(prepare_filters(user_id), now)
            assert scope.whole_user == (user_id, now)
            fast = search.scope_size(conn, search.MEMORIES, scope)
            (slow,) = conn.execute(f"SELECT COUNT(*) FROM memories m WHERE {scope.sql}",
                                   scope.params).fetchone()
        return fast, slow
    return sizes


def pg_sizes(url: str) -> Callable[[str, float], tuple[int, int]]:
    import psycopg

    from app.core.memory.drivers import pgvector_driver as pg

    def sizes(user_id: str, now: float) -> tuple[int, int]:
        scope, params = pg._memory_scope(prepare_filters(user_id),
                                         datetime.fromtimestamp(now, UTC))
        with psycopg.connect(url) as conn:
            (fast,) = conn.execute(f"SELECT {pg._scope_size(pg._MEMORIES, scope, True)}",
                                   params).fetchone()
            (slow,) = conn.execute(f"SELECT COUNT(*) FROM memories m WHERE {scope}",
                                   params).fetchone()
        return fast, slow
    return sizes


@pytest.fixture(params=["sqlite", "pgvector"])
def counted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Counted]:
    if request.param == "sqlite":
        path = request.getfixturevalue("sqlite_path")
        driver: BaseMemoryDriver = SqliteDriver(path=path, embedder=WordHashEmbedder())
        sizes = sqlite_sizes(path)
    else:
        from app.core.memory.drivers.pgvector_driver import PgvectorDriver

        url = request.getfixturevalue("empty_pg")
        driver = PgvectorDriver(url=url, embedder=WordHashEmbedder())
        sizes = pg_sizes(url)
    yield Counted(driver, sizes)
    driver.close()


def assert_counts_agree(counted: Counted, *, later: float = 0.0) -> None:
    now = time.time() + later
    for user_id in USERS:
        fast, slow = counted.sizes(user_id, now)
        assert fast == slow, f"{user_id}: memory_counts says {fast}, the rows say {slow}"


def test_counts_follow_every_verb(counted: Counted) -> None:
    driver = counted.driver
    kept = driver.store("alice", "Likes green tea", key="drink")
    driver.store_many([{"user_id": user, "content": f"note {i} of {user}"}
                       for i in range(5) for user in USERS])
    short = driver.store("alice", "On call this week", ttl=timedelta(hours=1))
    assert_counts_agree(counted)
    assert_counts_agree(counted, later=7200)  # the ttl memory has expired by then
    assert counted.sizes("alice", time.time() + 7200)[0] == 6

    assert driver.delete(kept["id"], "alice")
    assert_counts_agree(counted)
    driver.store("alice", "Likes oolong tea", key="drink")  # the upsert brings it back
    assert_counts_agree(counted)
    assert driver.delete(kept["id"], "alice") and driver.restore(kept["id"], "alice")
    assert_counts_agree(counted)
    assert driver.delete(short["id"], "alice")
    assert driver.purge(retention=timedelta(0)) == 1  # hard-deletes the soft-deleted one
    assert_counts_agree(counted)

    records = list(driver.export_records(user_id="bob", with_embeddings=True))
    assert driver.forget_user("bob") > 0
    assert counted.sizes("bob", time.time()) == (0, 0)
    driver.import_records(records)
    assert_counts_agree(counted)
    assert counted.sizes("bob", time.time())[0] == 5


def test_a_store_many_across_users_returns_its_memories_in_the_order_given(
        counted: Counted) -> None:
    # The PostgreSQL driver writes a batch grouped by user (its counters are locked in write
    # order at the commit); what it returns must still follow the input.
    items = [{"user_id": USERS[i % 2], "content": f"note {i}"} for i in range(7)]
    stored = counted.driver.store_many(items)
    assert [(m["user_id"], m["content"]) for m in stored] == [
        (item["user_id"], item["content"]) for item in items]
    assert_counts_agree(counted)
    assert counted.sizes("alice", time.time())[0] == 4


def test_the_migration_counts_the_memories_already_there(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Both backends: migrate, roll ours back, add rows by hand (some soft-deleted), migrate.
    rows = [(f"m{i}", USERS[i % 2], i % 3 == 0) for i in range(12)]
    path = tmp_path / "memory.sqlite3"
    sqlite_db = SqliteMigrationDatabase(path)
    try:
        roll_back_to_before(sqlite_db, "sqlite", MIGRATION)
    finally:
        sqlite_db.close()
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO memories (id, user_id, namespace, content, tags, metadata, importance, "
            "access_count, created_at, updated_at, occurred_at, embedding, deleted_at) "
            "VALUES (?, ?, 'default', 'x', '[]', '{}', 0.5, 0, 1, 1, 1, x'00', ?)",
            [(memory_id, user, 5.0 if deleted else None) for memory_id, user, deleted in rows])
    sqlite_db = SqliteMigrationDatabase(path)
    try:
        Migrator(sqlite_db, migrations_dir("sqlite"), out=lambda line: None).migrate()
    finally:
        sqlite_db.close()

    import psycopg

    url = request.getfixturevalue("blank_database")
    roll_back_postgres_to_before(url, MIGRATION)
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            "INSERT INTO memories (id, user_id, content, created_at, updated_at, occurred_at, "
            "embedding, deleted_at) VALUES (%s, %s, 'x', now(), now(), now(), "
            "array_fill(0.1, ARRAY[384])::vector, CASE WHEN %s THEN now() END)", rows)
    migrate_postgres(url)

    for sizes in (sqlite_sizes(path), pg_sizes(url)):
        for user_id in USERS:
            assert sizes(user_id, time.time()) == (4, 4)  # 6 rows, 2 of them soft-deleted
