"""SQLite's ``memory_counts`` (kept by triggers) against a plain count, through every verb that
adds, removes, hides or brings back a memory, and the migration's backfill of existing rows."""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta
from pathlib import Path

from app.core.database.migrator import Migrator, SqliteMigrationDatabase, migrations_dir
from app.core.memory.drivers import sqlite_search as search
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.validation import prepare_filters
from tests.word_hash_embedder import WordHashEmbedder

USERS = ("alice", "bob")


def counted(path: Path, user_id: str, now: float) -> tuple[int, int]:
    """The whole-user scope's size from ``memory_counts``, and the same scope counted."""
    with sqlite3.connect(path) as conn:
        scope = search.memory_scope(prepare_filters(user_id), now)
        assert scope.whole_user == (user_id, now)
        fast = search.scope_size(conn, search.MEMORIES, scope)
        (slow,) = conn.execute(f"SELECT COUNT(*) FROM memories m WHERE {scope.sql}",
                               scope.params).fetchone()
    return fast, slow


def assert_counts_agree(path: Path, *, later: float = 0.0) -> None:
    now = time.time() + later
    for user_id in USERS:
        fast, slow = counted(path, user_id, now)
        assert fast == slow, f"{user_id}: memory_counts says {fast}, the rows say {slow}"


def test_counts_follow_every_verb(sqlite_path: Path) -> None:
    driver = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    kept = driver.store("alice", "Likes green tea", key="drink")
    driver.store_many([{"user_id": user, "content": f"note {i} of {user}"}
                       for i in range(5) for user in USERS])
    short = driver.store("alice", "On call this week", ttl=timedelta(hours=1))
    assert_counts_agree(sqlite_path)
    assert_counts_agree(sqlite_path, later=7200)  # the ttl memory has expired by then
    assert counted(sqlite_path, "alice", time.time() + 7200)[0] == 6

    assert driver.delete(kept["id"], "alice")
    assert_counts_agree(sqlite_path)
    driver.store("alice", "Likes oolong tea", key="drink")  # the upsert brings it back
    assert_counts_agree(sqlite_path)
    assert driver.delete(kept["id"], "alice") and driver.restore(kept["id"], "alice")
    assert_counts_agree(sqlite_path)
    assert driver.delete(short["id"], "alice")
    assert driver.purge(retention=timedelta(0)) == 1  # hard-deletes the soft-deleted one
    assert_counts_agree(sqlite_path)

    records = list(driver.export_records(user_id="bob", with_embeddings=True))
    assert driver.forget_user("bob") > 0
    assert counted(sqlite_path, "bob", time.time()) == (0, 0)
    driver.import_records(records)
    assert_counts_agree(sqlite_path)
    assert counted(sqlite_path, "bob", time.time())[0] == 5
    driver.close()


def test_the_migration_counts_the_memories_already_there(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    migrations = migrations_dir("sqlite")
    names = sorted(file.stem for file in migrations.glob("*.py"))
    ours = "2026_12_04_000001_add_memory_counts"
    db = SqliteMigrationDatabase(path)
    try:
        migrator = Migrator(db, migrations, out=lambda line: None)
        migrator.migrate()
        migrator.rollback(step=1)  # back to the migration before ours
        assert ours in migrator.pending()
    finally:
        db.close()
    assert names[-1] == ours, "this test rolls back the newest migration: keep it ours"
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO memories (id, user_id, namespace, content, tags, metadata, importance, "
            "access_count, created_at, updated_at, occurred_at, embedding, deleted_at) "
            "VALUES (?, ?, 'default', 'x', '[]', '{}', 0.5, 0, 1, 1, 1, x'00', ?)",
            [(f"m{i}", USERS[i % 2], None if i % 3 else 5.0) for i in range(12)])
    db = SqliteMigrationDatabase(path)
    try:
        Migrator(db, migrations, out=lambda line: None).migrate()
    finally:
        db.close()
    assert_counts_agree(path)
    assert counted(path, "alice", time.time())[0] == 4  # 6 rows, 2 of them soft-deleted
