"""The maintenance commands as a user runs them: ``backup`` (a consistent online copy while a
writer keeps writing; the pg_dump command for PostgreSQL, which is then run for real), ``purge``
and ``forget-user`` (with its confirmation)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

from app.core.memory.drivers.sqlite_driver import SqliteDriver
from tests.conftest import PROJECT_ROOT, migrate_sqlite
from tests.word_hash_embedder import WordHashEmbedder
from tests.workers import BATCH


def cli(*args: str, path: Path | None = None, env: dict[str, str] | None = None,
        answer: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "MEMORY_DRIVER": "sqlite", **(env or {})}
    if path is not None:
        environment["MEMORY_SQLITE_PATH"] = str(path)
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=PROJECT_ROOT, text=True,
                          capture_output=True, timeout=120, env=environment,
                          input=answer if answer is not None else "")


def test_backup_while_a_writer_writes_is_consistent_and_checked(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "live.sqlite3")
    writer = subprocess.Popen([sys.executable, "-m", "tests.workers", "batches", "sqlite",
                               str(path)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().startswith("ack")  # writing is under way
        target = tmp_path / "copies" / "backup.sqlite3"
        done = cli("--json", "backup", "--output", str(target), path=path)
        assert writer.poll() is None, "the writer was still writing during the backup"
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(target)
    with closing(sqlite3.connect(target)) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        batches = Counter(int(content.split()[1]) for (content,) in
                          copy.execute("SELECT content FROM memories"))
    assert batches and all(count == BATCH for count in batches.values())  # one snapshot


def test_backup_never_overwrites_and_says_so(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "memory.sqlite3")
    target = tmp_path / "taken.sqlite3"
    target.write_text("precious")
    done = cli("backup", "--output", str(target), path=path)
    assert done.returncode == 2 and "exists already" in done.stderr
    assert target.read_text() == "precious"
    default = cli("backup", path=path)
    assert default.returncode == 0, default.stderr
    assert len(list((tmp_path / "backups").glob("memory-*.sqlite3"))) == 1


def test_backup_on_postgres_prints_a_pg_dump_command_that_works(empty_pg: str, tmp_path: Path):
    secret = cli("--json", "backup", env={"MEMORY_DRIVER": "pgvector", "DATABASE_URL":
                                          "postgresql://memory:s3cret-pw@127.0.0.1:5432/memory"})
    assert secret.returncode == 0, secret.stderr
    assert "s3cret-pw" not in secret.stdout + secret.stderr
    assert "--dbname='postgresql://memory@127.0.0.1:5432/memory'" in secret.stdout

    dump = tmp_path / "memory.dump"
    shown = cli("--json", "backup", "--output", str(dump),
                env={"MEMORY_DRIVER": "pgvector", "DATABASE_URL": empty_pg})
    command = json.loads(shown.stdout)["command"]
    assert subprocess.run(command, shell=True, timeout=120).returncode == 0
    listing = subprocess.run(["pg_restore", "--list", str(dump)], capture_output=True, text=True)
    assert "TABLE public memories" in listing.stdout


def seeded(path: Path) -> dict[str, str]:
    driver = SqliteDriver(path=path, embedder=WordHashEmbedder())
    ids = {
        "kept": driver.store("alice", "kept for good")["id"],
        "expired": driver.store("alice", "gone soon", ttl=0.01)["id"],
        "deleted": driver.store("alice", "deleted by the user")["id"],
        "bob": driver.store("bob", "bob's own")["id"],
    }
    driver.delete(ids["deleted"], "alice")
    driver.close()
    return ids


def remaining(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        return {memory_id for (memory_id,) in conn.execute("SELECT id FROM memories")}


def test_purge_removes_expired_and_past_retention_only(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "memory.sqlite3")
    ids = seeded(path)
    kept = cli("--json", "purge", path=path)  # default retention: 30 days
    assert json.loads(kept.stdout) == {"purged": 1}  # only the expired one
    assert remaining(path) == {ids["kept"], ids["deleted"], ids["bob"]}
    now = cli("purge", "--retention-days", "0", path=path)
    assert now.returncode == 0 and "purged 1 memory" in now.stdout
    assert remaining(path) == {ids["kept"], ids["bob"]}
    refused = cli("purge", "--retention-days", "-1", path=path)
    assert refused.returncode == 2 and "retention" in refused.stderr


def test_forget_user_asks_first_and_erases_only_that_user(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "memory.sqlite3")
    ids = seeded(path)
    for answer in ("n\n", "", "maybe\n"):
        declined = cli("forget-user", "alice", path=path, answer=answer)
        assert declined.returncode == 2 and "nothing was erased" in declined.stderr
        assert len(remaining(path)) == 4
    confirmed = cli("forget-user", "alice", path=path, answer="y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "erased user alice and 3 memories" in confirmed.stdout
    assert remaining(path) == {ids["bob"]}
    forced = cli("--json", "forget-user", "bob", "--yes", path=path)
    assert json.loads(forced.stdout) == {"user_id": "bob", "erased_memories": 1}
    assert remaining(path) == set()
