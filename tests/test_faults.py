"""Faults and resources (issue 15): the store run into walls, each wall caused for real.

Threads that end, a schema dropped under a live connection, database files deleted under a running
driver, another process re-embedding the store, a writer holding the lock past the budget, a bad
record in the middle of an import batch, an interrupted ``fresh``, a killed backup, a huge line in
an import file, a cache of many small users. Each test failed on the code before its fix (see
the closing note of issue 15 for what each showed before and after).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from app.core.database.migrator import Migrator, SqliteMigrationDatabase, migrations_dir
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.errors import (
    BackendUnavailableError,
    EmbeddingMismatchError,
    MemoryDriverError,
    SchemaNotMigratedError,
)
from tests.conftest import PROJECT_ROOT, migrate_postgres
from tests.word_hash_embedder import WordHashEmbedder


class SmallWordHash(WordHashEmbedder):
    """Another "model": another name and 128 dimensions, so a switch changes the vector size."""

    model_name = "word-hash-128"
    dimension = 128


def run_python(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter (from the project root, on this PYTHONPATH)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


@pytest.fixture
def driver(sqlite_path: Path) -> Iterator[SqliteDriver]:
    opened = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder(), busy_timeout_ms=300)
    yield opened
    opened.close()


# -- item 4: connections of ended threads ------------------------------------------------------


def test_connections_of_ended_threads_are_closed_under_a_low_file_limit(sqlite_path: Path):
    """1,000 short-lived threads, one call each, in a process allowed 256 open files: every call
    works and the process ends with the file descriptors it started with (give or take)."""
    result = run_python(f"""
        import os, resource, threading
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from app.core.memory.drivers.sqlite_driver import SqliteDriver
        from tests.word_hash_embedder import WordHashEmbedder
        driver = SqliteDriver(path={str(sqlite_path)!r}, embedder=WordHashEmbedder())
        driver.store("alice", "the first note")
        before = len(os.listdir("/proc/self/fd"))
        failures = []
        def one_call(i):
            try:
                driver.store("alice", f"note {{i}}") if i % 2 else driver.recall("alice")
            except Exception as exc:
                failures.append(f"call {{i}}: {{exc!r}}")
        for i in range(1000):
            thread = threading.Thread(target=one_call, args=(i,))
            thread.start()
            thread.join()
        print("failures", len(failures), failures[:1])
        print("fd_growth", len(os.listdir("/proc/self/fd")) - before)
        print("stored", driver.stats("alice")["memories"]["visible"])
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["failures"].startswith("0 "), lines["failures"]
    assert int(lines["fd_growth"]) <= 6, lines["fd_growth"]
    assert int(lines["stored"]) == 501


def test_close_closes_the_connections_of_live_threads(driver: SqliteDriver):
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        driver.recall("alice")
        ready.set()
        release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(10)
    driver.recall("alice")
    opened = list(driver._open)  # noqa: SLF001 - which connections the driver holds
    assert len(opened) == 2
    driver.close()
    release.set()
    thread.join()
    for holder in opened:
        with pytest.raises(sqlite3.ProgrammingError):
            holder.connection.execute("SELECT 1")


# -- item 1: a connection whose schema changed under it ---------------------------------------


def test_a_thread_that_met_fresh_mid_drop_recovers(sqlite_path: Path, driver: SqliteDriver):
    """The writer's store lands between ``fresh`` dropping the FTS table and the rest: it fails
    (the schema is away), and once ``fresh`` has rebuilt the schema the same thread works again."""
    driver.store("alice", "before fresh")
    with closing(sqlite3.connect(sqlite_path)) as other:
        other.execute("DROP TABLE memories_fts")  # the first step of fresh's drop
    with pytest.raises(SchemaNotMigratedError):
        driver.store("alice", "while the schema is away")
    db = SqliteMigrationDatabase(sqlite_path)
    try:
        Migrator(db, migrations_dir("sqlite"), out=lambda line: None).fresh()
    finally:
        db.close()
    stored = driver.store("alice", "after fresh, same thread")
    assert [m["id"] for m in driver.recall("alice", query="after fresh")] == [stored["id"]]


# -- item 2: database files deleted under a running driver ------------------------------------


def test_a_deleted_database_is_an_error_for_every_verb_and_never_recreated(
        sqlite_path: Path, driver: SqliteDriver):
    driver.store("alice", "stored before the files went")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(SchemaNotMigratedError, match="does not exist"):
        driver.store("alice", "acknowledged into no file")
    with pytest.raises(SchemaNotMigratedError, match="does not exist"):
        driver.recall("alice", query="stored")
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            driver.store("alice", "from a thread with no connection yet")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert [type(error) for error in errors] == [SchemaNotMigratedError]
    assert not sqlite_path.exists(), "the driver created a new, empty database at the path"
    assert driver.health_check()["status"] == "down"


# -- item 7: the write lock held past the budget ----------------------------------------------


@pytest.fixture
def locked(sqlite_path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the database's write lock until the test ends."""
    holder = sqlite3.connect(sqlite_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    yield holder
    if holder.in_transaction:
        holder.execute("ROLLBACK")
    holder.close()


def test_recall_works_while_a_writer_holds_the_lock_and_counts_the_access_later(
        driver: SqliteDriver, sqlite_path: Path):
    stored = driver.store("alice", "the quick brown fox")
    holder = sqlite3.connect(sqlite_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        found = driver.recall("alice", query="quick fox")
        assert [m["id"] for m in found] == [stored["id"]]
        assert found[0]["access_count"] == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    driver.recall("alice", query="quick fox")
    assert driver.get(stored["id"])["access_count"] == 2  # the deferred count was written


def test_a_writer_past_the_budget_fails_naming_it(driver: SqliteDriver,
                                                  locked: sqlite3.Connection):
    with pytest.raises(BackendUnavailableError, match=r"300 ms.*MEMORY_SQLITE_BUSY_TIMEOUT_MS"):
        driver.store("alice", "waits for the lock")
    with pytest.raises(BackendUnavailableError, match=r"300 ms"):
        driver.forget_user("alice")
    locked.execute("ROLLBACK")
    assert driver.store("alice", "the lock is free")["content"] == "the lock is free"


def test_threads_of_one_process_queue_for_the_lock_within_the_budget(sqlite_path: Path):
    """16 threads storing at once behind a 2 s budget: none fails (they queue in the process
    instead of racing in SQLite's sleep-and-retry loop)."""
    driver = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder(), busy_timeout_ms=2_000)
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        for i in range(20):
            try:
                driver.store(f"user{worker}", f"note {i}")
                driver.recall(f"user{worker}", query=f"note {i}")
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    driver.close()
    assert failures == []


# -- item 3: another process re-embedded the store --------------------------------------------


def test_sqlite_a_process_on_the_old_model_is_refused_after_a_reembed(sqlite_path: Path):
    old = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    old.store("alice", "written with the old model")
    old.recall("alice", query="old model")
    new = SqliteDriver(path=sqlite_path, embedder=SmallWordHash())
    new.reembed()
    with pytest.raises(EmbeddingMismatchError, match="reembed"):
        old.store("alice", "a vector of the old size")
    with pytest.raises(EmbeddingMismatchError):
        old.store_many([{"user_id": "alice", "content": "a batch of the old size"}])
    with pytest.raises(EmbeddingMismatchError):
        old.recall("alice", query="old model")
    assert [m["content"] for m in new.recall("alice", query="old model")] == [
        "written with the old model"]
    assert new.health_check()["status"] == "ok"
    old.close()
    new.close()


def test_pgvector_a_process_on_the_old_model_is_refused_after_a_reembed(blank_database: str):
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    url = migrate_postgres(blank_database)
    old = PgvectorDriver(url=url, embedder=WordHashEmbedder())
    new = PgvectorDriver(url=url, embedder=SmallWordHash())
    try:
        old.store("alice", "written with the old model")
        new.reembed()
        with pytest.raises(EmbeddingMismatchError, match="reembed"):
            old.store("alice", "a vector of the old size")
        with pytest.raises(EmbeddingMismatchError):
            old.store_many([{"user_id": "alice", "content": "a batch of the old size"}])
        assert [m["content"] for m in new.recall("alice", query="old model")] == [
            "written with the old model"]
    finally:
        old.close()
        new.close()


# -- item 9: PostgreSQL import batches are one transaction ------------------------------------


def memory_record(memory_id: str, content: str) -> dict[str, Any]:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return {"type": "memory", "id": memory_id, "user_id": "alice", "agent_id": None,
            "conversation_id": None, "namespace": "default", "key": None, "content": content,
            "tags": [], "metadata": {}, "importance": 0.5, "access_count": 0,
            "last_accessed_at": None, "expires_at": None, "deleted_at": None,
            "created_at": now, "updated_at": now, "embedding": None}


@pytest.mark.parametrize("backend", ["sqlite", "pgvector"])
def test_an_import_batch_that_fails_leaves_nothing(backend: str, request: pytest.FixtureRequest):
    """[ok, ok, bad, ok]: the bad record (a NUL character PostgreSQL cannot store, an id SQLite
    cannot bind) makes the call raise, and none of the batch stays."""
    if backend == "sqlite":
        target: Any = request.getfixturevalue("driver")
        bad = memory_record("m3", "fine")
        bad["id"] = object()  # a value the database cannot bind: the write itself fails
    else:
        from app.core.memory.drivers.pgvector_driver import PgvectorDriver

        target = PgvectorDriver(url=request.getfixturevalue("empty_pg"),
                                embedder=WordHashEmbedder())
        request.addfinalizer(target.close)
        bad = memory_record("m3", "a NUL \x00 here")
    records = [memory_record("m1", "first"), memory_record("m2", "second"), bad,
               memory_record("m4", "fourth")]
    with pytest.raises(MemoryDriverError):
        target.import_records(records)
    assert target.list_memories("alice")["items"] == []


# -- item 6: fresh, rollback and reset are all-or-nothing; status tells the truth --------------


def migrations_with_extra(tmp_path: Path, database: str, up: str) -> Path:
    """The project's migrations for ``database`` plus a last one whose ``up`` runs ``up``."""
    folder = tmp_path / f"migrations-{database}"
    folder.mkdir()
    for source in migrations_dir(database).glob("*.py"):
        (folder / source.name).write_text(source.read_text())
    (folder / "2099_01_01_000001_the_last_one.py").write_text(textwrap.dedent(f"""
        import sys, time
        def up(db):
            {up}
        def down(db):
            pass
    """))
    return folder


def test_sqlite_fresh_killed_part_way_leaves_the_old_schema_and_data(sqlite_path: Path,
                                                                    tmp_path: Path):
    driver = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    kept = driver.store("alice", "kept through a killed fresh")
    folder = migrations_with_extra(
        tmp_path, "sqlite", 'print("ready", flush=True); time.sleep(60)')
    run = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from app.core.database.migrator import Migrator, SqliteMigrationDatabase
        from pathlib import Path
        Migrator(SqliteMigrationDatabase({str(sqlite_path)!r}), Path({str(folder)!r}),
                 out=lambda line: None).fresh()
    """)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert run.stdout is not None and run.stdout.readline().strip() == "ready"
    finally:
        run.kill()  # the tables are dropped and the schema rebuilt, not yet committed
        run.wait(30)
    assert [m["id"] for m in driver.recall("alice", query="killed fresh")] == [kept["id"]]
    db = SqliteMigrationDatabase(sqlite_path)
    try:
        assert Migrator(db, migrations_dir("sqlite")).damage() is None
    finally:
        db.close()
    driver.close()


def test_postgres_fresh_that_fails_part_way_leaves_the_old_schema_and_data(blank_database: str,
                                                                          tmp_path: Path):
    from app.core.database.migrator import MigrationError
    from app.core.database.postgres_migration import PostgresMigrationDatabase
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    url = migrate_postgres(blank_database)
    driver = PgvectorDriver(url=url, embedder=WordHashEmbedder())
    try:
        kept = driver.store("alice", "kept through a failed fresh")
        folder = migrations_with_extra(tmp_path, "pgvector",
                                       'raise RuntimeError("interrupted")')
        db = PostgresMigrationDatabase(url)
        try:
            with pytest.raises(MigrationError, match="interrupted"):
                Migrator(db, folder, out=lambda line: None).fresh()
            assert [m["id"] for m in driver.list_memories("alice")["items"]] == [kept["id"]]
            assert Migrator(db, migrations_dir("pgvector")).damage() is None
        finally:
            db.close()
    finally:
        driver.close()


def test_sqlite_rollback_whose_down_fails_part_way_rolls_back_nothing(tmp_path: Path):
    from app.core.database.migrator import MigrationError

    folder = tmp_path / "three"
    folder.mkdir()
    for number, table, down in ((1, "alpha", 'db.execute("DROP TABLE alpha")'),
                                (2, "beta", 'raise RuntimeError("beta cannot go")'),
                                (3, "gamma", 'db.execute("DROP TABLE gamma")')):
        (folder / f"2026_01_01_00000{number}_create_{table}.py").write_text(textwrap.dedent(f"""
            def up(db):
                db.execute("CREATE TABLE {table} (id INTEGER)")
            def down(db):
                {down}
        """))
    db = SqliteMigrationDatabase(tmp_path / "three.sqlite3")
    try:
        migrator = Migrator(db, folder, out=lambda line: None)
        migrator.migrate()
        with pytest.raises(MigrationError, match="beta cannot go"):
            migrator.rollback()
        assert [row.ran for row in migrator.status()] == [True, True, True]
        names = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert {"alpha", "beta", "gamma"} <= names
        with pytest.raises(MigrationError):
            migrator.reset()
        assert [row.ran for row in migrator.status()] == [True, True, True]
    finally:
        db.close()


def test_status_and_migrate_tell_a_half_dropped_schema(sqlite_path: Path):
    """The state an interrupted fresh used to leave: the log says migrated, tables are gone."""
    with closing(sqlite3.connect(sqlite_path)) as conn:
        conn.execute("DROP TABLE memories_fts")
        conn.execute("DROP TABLE memories")
    env = {**os.environ, "MEMORY_DRIVER": "sqlite", "MEMORY_SQLITE_PATH": str(sqlite_path),
           "APP_ENV": "local"}
    status = subprocess.run([sys.executable, "migrate.py", "status"], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 1, status.stdout
    assert "memories" in status.stdout and "fresh" in status.stderr
    migrate = subprocess.run([sys.executable, "migrate.py"], cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 1 and "Nothing to migrate" not in migrate.stdout
    assert "fresh" in migrate.stderr and "Traceback" not in migrate.stderr


# -- item 8: a killed backup's partial file ---------------------------------------------------


def test_a_killed_backups_partial_file_is_removed_by_the_next_backup(tmp_path: Path):
    source = tmp_path / "big.sqlite3"
    with closing(sqlite3.connect(source)) as conn:
        conn.execute("CREATE TABLE pages (data BLOB)")
        conn.executemany("INSERT INTO pages VALUES (randomblob(4000))", [()] * 1_000)
        conn.commit()
    backups = tmp_path / "backups"
    killed = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from app.core.database.sqlite_backup import backup_sqlite
        def stall(done, total):
            print("copying", flush=True)
            time.sleep(60)
        backup_sqlite(Path({str(source)!r}), Path({str(backups / "first.sqlite3")!r}),
                      progress=stall)
    """)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert killed.stdout is not None and killed.stdout.readline().strip() == "copying"
    finally:
        killed.kill()
        killed.wait(30)
    leftover = backups / "first.sqlite3.partial"
    assert leftover.exists()
    someone_elses = backups / "notes.partial"
    someone_elses.write_text("not a backup")

    from app.core.database.sqlite_backup import backup_sqlite

    result = backup_sqlite(source, backups / "second.sqlite3")
    assert result.path.exists()
    assert not leftover.exists(), "the killed backup's partial file is still there"
    assert someone_elses.exists()


# -- item 10: a huge line in an import file ---------------------------------------------------


def test_a_huge_line_in_an_import_file_is_refused_without_reading_it_whole(tmp_path: Path):
    """A 300 MB line between two good records: the good ones are imported, the line is refused
    with its number, and the process never holds it (peak memory grows by far less than it)."""
    from app.core.memory import transfer
    from app.core.memory.portable import header, to_json_line

    dump = tmp_path / "dump.jsonl"
    with dump.open("w", encoding="utf-8") as out:
        out.write(to_json_line(header(driver="sqlite", user_id=None, embedding=None,
                                      with_embeddings=False)))
        out.write(to_json_line(memory_record("m1", "before the huge line")))
        out.write('{"type": "memory", "content": "')
        block = "x" * (1 << 20)
        for _ in range(300):
            out.write(block)
        out.write('"}\n')
        out.write(to_json_line(memory_record("m2", "after the huge line")))
    result = run_python(f"""
        import resource
        from app.core.memory import transfer
        from app.core.memory.drivers.sqlite_driver import SqliteDriver
        from tests.conftest import migrate_sqlite
        from pathlib import Path
        from tests.word_hash_embedder import WordHashEmbedder
        driver = SqliteDriver(path=migrate_sqlite(Path({str(tmp_path / "db.sqlite3")!r})),
                              embedder=WordHashEmbedder())
        driver.list_memories("alice")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # What the CLI does before an import: count the lines for the progress bar (before the
        # fix it iterated the file's lines).
        count = getattr(transfer, "count_lines", lambda path: sum(1 for _ in open(path)))
        total = count({str(dump)!r})
        with open({str(dump)!r}, encoding="utf-8") as lines:
            report = transfer.import_dump(driver, lines, total=total)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("total", total)
        print("refused", report.refused)
        print("stored", sorted(m["id"] for m in driver.list_memories("alice")["items"]))
        print("grew_mb", grew // 1024)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["total"] == "4"
    assert int(lines["grew_mb"]) < 150, lines["grew_mb"]
    assert "line 3" in lines["refused"] and "longer than" in lines["refused"]
    assert lines["stored"] == "['m1', 'm2']"
    assert transfer.MAX_LINE_CHARS < 300 * (1 << 20)


# -- item 5: the vector cache is bounded by bytes ----------------------------------------------


def test_the_vector_cache_of_many_one_memory_users_stays_within_its_budget():
    """20,000 users with one memory each under a budget of 10,000 vectors (15 MB): what the
    cache really allocates (numpy reports its buffers to tracemalloc) stays within the budget."""
    import tracemalloc

    import numpy as np

    from app.core.memory.drivers.vector_cache import VectorCache

    blob = np.ones(384, dtype=np.float32).tobytes()
    budget = 10_000 * 384 * 4
    tracemalloc.start()
    try:
        cache = VectorCache(384, 10_000)
        for user in range(20_000):
            space = cache.space(f"memory:user{user}")
            with space.lock:
                space.upsert([(user, blob)])
        allocated, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert allocated <= budget, f"{allocated / 1e6:.0f} MB allocated, budget {budget / 1e6:.0f} MB"
    assert cache.space("memory:user19999").size == 1  # the latest users are still cached


def test_a_space_that_grows_past_the_budget_evicts_the_others(sqlite_path: Path):
    driver = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder(),
                          vector_cache_max_bytes=400_000)
    driver.store_many([{"user_id": f"small{n}", "content": f"note {n}"} for n in range(50)])
    for n in range(50):
        driver.recall(f"small{n}", query=f"note {n}")
    driver.store_many([{"user_id": "big", "content": f"big note {n}"} for n in range(200)])
    driver.recall("big", query="big note 7")
    cache = driver._vectors  # noqa: SLF001 - the cache's accounting is what is under test
    assert cache is not None and cache.total_bytes() <= 400_000
    assert [m["content"] for m in driver.recall("small3", query="note 3")] == ["note 3"]
    driver.close()
