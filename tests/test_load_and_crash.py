"""Load and crash: several processes on one SQLite file, a writer killed with SIGKILL in the
middle of ``store_many`` on SQLite and on PostgreSQL. Real processes, real files, a real server;
the workers are in ``tests/workers.py``."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from tests.conftest import PROJECT_ROOT, migrate_sqlite
from tests.workers import BATCH, STORES_PER_THREAD, THREADS

PROCESSES = 4


def worker(*arguments: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.workers", *arguments],
                            cwd=PROJECT_ROOT, **options)


def test_four_processes_of_two_threads_share_one_sqlite_file(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "shared.sqlite3")
    outputs = [tmp_path / f"worker{p}.json" for p in range(PROCESSES)]
    started = time.monotonic()
    running = [worker("mixed", str(path), str(p), str(out)) for p, out in enumerate(outputs)]
    assert all(process.wait(timeout=600) == 0 for process in running)
    elapsed = time.monotonic() - started
    results = [json.loads(out.read_text()) for out in outputs]

    errors = [error for result in results for error in result["errors"]]
    assert errors == [], errors[0]  # "database is locked" or anything else escaping is a failure
    stored = {memory_id for result in results for memory_id in result["stored"]}
    deleted = {memory_id for result in results for memory_id in result["deleted"]}
    assert len(stored) == PROCESSES * THREADS * STORES_PER_THREAD
    with closing(sqlite3.connect(path)) as conn:
        rows = dict(conn.execute("SELECT id, deleted_at IS NOT NULL FROM memories").fetchall())
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # FTS5's own check: raises if the keyword index disagrees with the table.
        conn.execute("INSERT INTO memories_fts (memories_fts) VALUES ('integrity-check')")
    assert set(rows) == stored  # every acknowledged store is there, nothing else is
    assert {memory_id for memory_id, gone in rows.items() if gone} == deleted
    print(f"{len(stored)} stores, {len(deleted)} deletes and {len(stored) // 10} recalls by "
          f"{PROCESSES} processes x {THREADS} threads in {elapsed:.1f} s")


def kill_during_store_many(kind: str, location: str) -> int:
    """Start a batch writer, SIGKILL it at a random moment after two batches; returns how many
    batches it acknowledged."""
    process = worker("batches", kind, location, stdout=subprocess.PIPE, text=True)
    acked, acked_at = 0, []
    try:
        while acked < 2:
            line = process.stdout.readline()
            assert line.startswith("ack"), f"the writer stopped: {line!r}"
            acked += 1
            acked_at.append(time.monotonic())
        # One batch takes about as long as the last one did: a random moment within the next.
        time.sleep(random.uniform(0.0, acked_at[1] - acked_at[0]))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    rest = process.stdout.read()
    return acked + rest.count("ack")


def check_batches(counts: Counter, acked: int) -> None:
    assert all(count == BATCH for count in counts.values()), counts  # no half batch
    assert set(range(acked)) <= set(counts) <= set(range(acked + 1))  # acked ones all kept


@pytest.mark.parametrize("attempt", range(3))
def test_sqlite_writer_killed_mid_batch_leaves_whole_batches(tmp_path: Path, attempt: int):
    path = migrate_sqlite(tmp_path / "crash.sqlite3")
    acked = kill_during_store_many("sqlite", str(path))
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        contents = [row[0] for row in conn.execute("SELECT content FROM memories")]
    check_batches(Counter(int(content.split()[1]) for content in contents), acked)


@pytest.mark.parametrize("attempt", range(2))
def test_postgres_writer_killed_mid_batch_leaves_whole_batches(empty_pg: str, attempt: int):
    acked = kill_during_store_many("pgvector", empty_pg)
    with psycopg.connect(empty_pg) as conn:
        counts = Counter(dict(conn.execute(
            "SELECT split_part(content, ' ', 2)::int, COUNT(*) FROM memories GROUP BY 1"
        ).fetchall()))
    check_batches(counts, acked)
