"""What is particular to the pgvector driver, on a real PostgreSQL with pgvector: filtered vector
recall against exact search, surviving killed backends and a server restart, pool exhaustion,
an unmigrated database, and ``migrate.py --database pgvector``."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from app.core.memory import BackendUnavailableError, SchemaNotMigratedError
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.support import EMBED_CHUNK_SIZE
from app.core.memory.embeddings import SentenceTransformerEmbedder
from app.core.memory.ranking import FusionWeights
from tests.conftest import PG_ADMIN_URL, PROJECT_ROOT

VECTOR_ONLY = FusionWeights(vector=1.0, keyword=0.0, importance=0.0, neighbour=0.0)
TOPICS = ["cooking dinner", "cycling routes", "database tuning", "piano practice", "gardening",
          "travel plans", "personal finance", "dog training", "film reviews", "home repairs",
          "language learning", "running a marathon"]


@pytest.fixture
def driver(empty_pg: str, embedder: SentenceTransformerEmbedder) -> Iterator[PgvectorDriver]:
    driver = PgvectorDriver(url=empty_pg, embedder=embedder, pool_max_size=4, pool_timeout=2.0)
    yield driver
    driver.close()


def note(i: int) -> str:
    return (f"Note {i}: thoughts on {TOPICS[i % len(TOPICS)]}, entry {i * 7 % 101} "
            f"from week {i % 52}")


def test_filtered_vector_recall_equals_exact_search(
    empty_pg: str, embedder: SentenceTransformerEmbedder
):
    """A user with 3,000 memories among 40 users: the default recall's top 10 is the exact top
    10; with the HNSW index forced (no exact scans), pgvector's iterative scan keeps it there."""
    exact_first = PgvectorDriver(url=empty_pg, embedder=embedder, weights=VECTOR_ONLY)
    index_only = PgvectorDriver(url=empty_pg, embedder=embedder, weights=VECTOR_ONLY,
                                exact_scan_max_rows=0)
    items = [{"user_id": "target", "content": note(i)} for i in range(3000)]
    items += [{"user_id": f"other{i % 39}", "content": note(i)} for i in range(3000, 7000)]
    for start in range(0, len(items), 1000):
        exact_first.store_many(items[start:start + 1000])

    with psycopg.connect(empty_pg) as connection:
        rows = connection.execute(
            "SELECT id, embedding::text FROM memories WHERE user_id = 'target'").fetchall()
    ids = [row[0] for row in rows]
    matrix = np.array([np.array(row[1][1:-1].split(","), dtype=np.float32) for row in rows])

    queries = [f"{topic} {suffix}" for topic in TOPICS for suffix in ("tips", "last week")]
    overlap = []
    for query in queries:
        scores = matrix @ embedder.embed_query(query)
        expected = [ids[i] for i in np.argsort(-scores)[:10]]
        got = [m["id"] for m in exact_first.recall("target", query=query, top_k=10)]
        assert got == expected, query
        indexed = index_only.recall("target", query=query, top_k=10)
        assert all(m["user_id"] == "target" for m in indexed)
        overlap.append(len({m["id"] for m in indexed} & set(expected)) / 10)
    print(f"HNSW iterative scan, top-10 overlap with exact: mean {np.mean(overlap):.3f}, "
          f"min {min(overlap):.1f} over {len(queries)} queries")
    assert np.mean(overlap) >= 0.95
    exact_first.close()
    index_only.close()


class FailingEmbedder:
    """The real model, except that one call fails: a model error cannot be caused for real
    mid-batch, so this double stands in for it."""

    def __init__(self, model: SentenceTransformerEmbedder, fail_on_call: int) -> None:
        self.model, self.fail_on_call, self.calls = model, fail_on_call, 0
        self.model_name, self.dimension = model.model_name, model.dimension

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("the model failed on this chunk")
        return self.model.embed_documents(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self.model.embed_query(text)


def test_store_many_across_chunks_keeps_order_and_vectors(
        driver: PgvectorDriver, embedder: SentenceTransformerEmbedder, empty_pg: str):
    texts = [note(i) for i in range(3 * EMBED_CHUNK_SIZE + 5)]  # four chunks, the last short
    stored = driver.store_many([{"user_id": "u", "content": text} for text in texts])
    assert [memory["content"] for memory in stored] == texts
    with psycopg.connect(empty_pg) as conn:
        rows = dict(conn.execute("SELECT id, embedding::text FROM memories").fetchall())
    expected = embedder.embed_documents(texts)
    for memory, vector in zip(stored, expected, strict=True):
        saved = np.array(rows[memory["id"]].strip("[]").split(","), dtype=np.float32)
        np.testing.assert_allclose(saved, vector, atol=1e-6)


def test_store_many_writes_nothing_when_a_later_chunk_fails_to_embed(
        empty_pg: str, embedder: SentenceTransformerEmbedder):
    failing = FailingEmbedder(embedder, fail_on_call=3)
    driver = PgvectorDriver(url=empty_pg, embedder=failing)
    try:
        with pytest.raises(RuntimeError, match="failed on this chunk"):
            driver.store_many([{"user_id": "u", "content": note(i)}
                               for i in range(4 * EMBED_CHUNK_SIZE)])
        assert failing.calls == 3  # chunks 1 and 2 were written inside the transaction
        with psycopg.connect(empty_pg) as conn:
            assert conn.execute("SELECT COUNT(*) FROM memories").fetchone() == (0,)
    finally:
        driver.close()


def test_killed_backends_are_survived(driver: PgvectorDriver, empty_pg: str):
    memory = driver.store("alice", "Prefers dark mode")
    assert driver.get(memory["id"]) is not None
    database = psycopg.conninfo.conninfo_to_dict(empty_pg)["dbname"]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchone()[0]
    assert killed >= 1
    assert driver.get(memory["id"]) is not None  # the pool's check replaced the dead connection
    assert driver.recall("alice", query="dark mode")[0]["id"] == memory["id"]


def test_a_call_on_a_connection_killed_mid_query_raises_backend_unavailable(
    driver: PgvectorDriver, empty_pg: str
):
    driver.store("alice", "warm up")
    database = psycopg.conninfo.conninfo_to_dict(empty_pg)["dbname"]

    def kill_soon() -> None:
        time.sleep(0.5)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND query LIKE '%%pg_sleep%%' "
                          "AND pid <> pg_backend_pid()", (database,))

    killer = threading.Thread(target=kill_soon)
    killer.start()
    # A real statement that is still running when its backend is killed. The driver's verbs
    # finish in milliseconds, so a slow one is made by running pg_sleep on a pooled connection
    # through the same error translation the verbs use.
    from app.core.memory.drivers.pgvector_driver import _translate_errors

    @_translate_errors
    def slow_call(self: PgvectorDriver) -> None:
        with self._connection() as conn:
            conn.execute("SELECT pg_sleep(10)")

    with pytest.raises(BackendUnavailableError):
        slow_call(driver)
    killer.join()
    assert driver.recall("alice")[0]["content"] == "warm up"


@pytest.mark.skipif(os.environ.get("MEMORY_TEST_RESTART_POSTGRES") != "1",
                    reason="stops and starts the machine's PostgreSQL server, which other work "
                           "may be using: set MEMORY_TEST_RESTART_POSTGRES=1 to run it (CI does)")
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None,
                    reason="restarting PostgreSQL needs root and Debian's pg_ctlcluster")
def test_server_restart_is_survived(driver: PgvectorDriver):
    memory = driver.store("alice", "survives restarts")
    version = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True,
                             check=True).stdout.split()[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop",
                    "-m", "fast"], check=True)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            driver.get(memory["id"])
        assert time.monotonic() - started < 10  # pool_timeout is 2s: bounded, never a hang
        assert driver.health_check()["status"] == "down"
    finally:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                       check=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert driver.get(memory["id"]) is not None
            break
        except BackendUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert driver.health_check()["status"] == "ok"


def test_pool_exhaustion_ends_in_a_clear_error(empty_pg: str,
                                               embedder: SentenceTransformerEmbedder):
    driver = PgvectorDriver(url=empty_pg, embedder=embedder, pool_min_size=1, pool_max_size=1,
                            pool_timeout=1.0)
    driver.store("alice", "only one connection")
    with driver._pool.connection():  # the pool's only connection, held by someone else
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="within 1.0s"):
            driver.recall("alice")
        assert 0.9 < time.monotonic() - started < 5
    assert driver.recall("alice")[0]["content"] == "only one connection"
    driver.close()


def test_unmigrated_database_raises_schema_not_migrated(
    blank_database: str, embedder: SentenceTransformerEmbedder
):
    driver = PgvectorDriver(url=blank_database, embedder=embedder)
    with pytest.raises(SchemaNotMigratedError, match="--database pgvector"):
        driver.recall("alice")
    assert driver.health_check()["status"] == "down"
    driver.close()


def test_password_never_appears_in_errors_or_health(embedder: SentenceTransformerEmbedder):
    url = "postgresql://someone:hunter2-secret@127.0.0.1:1/nowhere"
    driver = PgvectorDriver(url=url, embedder=embedder, pool_timeout=1.0, connect_timeout=1.0)
    report = driver.health_check()
    assert report["status"] == "down"
    assert "hunter2" not in repr(report)
    with pytest.raises(BackendUnavailableError) as raised:
        driver.recall("alice")
    assert "hunter2" not in str(raised.value)
    driver.close()


def migrate_pg(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "APP_ENV": "local"}
    return subprocess.run([sys.executable, "migrate.py", "--database", "pgvector", *args],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_migrate_cli_on_postgres(blank_database: str):
    def tables() -> set[str]:
        with psycopg.connect(blank_database) as connection:
            return {name for (name,) in connection.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

    assert "Pending" in migrate_pg("status", url=blank_database).stdout
    first = migrate_pg(url=blank_database)
    assert first.returncode == 0, first.stderr
    assert {"memories", "knowledge_chunks", "users", "migrations"} <= tables()
    assert "Nothing to migrate" in migrate_pg(url=blank_database).stdout
    assert "Ran (batch 1)" in migrate_pg("status", url=blank_database).stdout
    assert migrate_pg("rollback", url=blank_database).returncode == 0
    assert tables() == {"migrations"}
    assert migrate_pg("fresh", url=blank_database).returncode == 0
    assert "memories" in tables()
    pretend = migrate_pg("rollback", "--pretend", url=blank_database)
    assert "DROP TABLE IF EXISTS memories" in pretend.stdout and "memories" in tables()


def test_migrate_creates_a_missing_database():
    name = f"memory_created_{secrets.token_hex(4)}"
    url = make_conninfo(PG_ADMIN_URL, dbname=name)
    try:
        result = migrate_pg(url=url)
        assert result.returncode == 0, result.stderr
        with psycopg.connect(url) as connection:
            assert connection.execute("SELECT COUNT(*) FROM memories").fetchone()[0] == 0
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
