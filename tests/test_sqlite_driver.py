"""What is particular to the SQLite driver: its schema check, the embedding identity, and the
in-memory vector copy staying exact when other connections and processes write to the file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from app.core.memory import EmbeddingMismatchError, SchemaNotMigratedError
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from app.core.memory.ranking import FusionWeights
from tests.conftest import PROJECT_ROOT


class RenamedEmbedder:
    """The real model under another name: stands in for "a different model was configured",
    which cannot be caused for real because only one model is installed offline."""

    def __init__(self, inner: SentenceTransformerEmbedder, name: str) -> None:
        self.inner, self.model_name = inner, name

    @property
    def dimension(self) -> int:
        return self.inner.dimension

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self.inner.embed_query(text)


class CountingEmbedder(RenamedEmbedder):
    """The real model, counting how often it is asked for a query vector."""

    def __init__(self, inner: SentenceTransformerEmbedder) -> None:
        super().__init__(inner, inner.model_name)
        self.queries = 0

    def embed_query(self, text: str) -> np.ndarray:
        self.queries += 1
        return super().embed_query(text)


@pytest.fixture
def driver(sqlite_path: Path, embedder: SentenceTransformerEmbedder):
    driver = SqliteDriver(path=sqlite_path, embedder=embedder)
    yield driver
    driver.close()


def run_in_other_process(path: Path, code: str) -> str:
    """Run ``code`` (with ``driver`` bound to a new SqliteDriver on ``path``) in a new Python."""
    script = textwrap.dedent(f"""
        from app.core.memory.drivers.sqlite_driver import SqliteDriver
        driver = SqliteDriver(path={str(path)!r})
    """) + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_unmigrated_database_raises_schema_not_migrated(tmp_path: Path,
                                                        embedder: SentenceTransformerEmbedder):
    driver = SqliteDriver(path=tmp_path / "empty.sqlite3", embedder=embedder)
    with pytest.raises(SchemaNotMigratedError, match="python migrate.py"):
        driver.recall("alice")
    report = driver.health_check()
    assert report["status"] == "down"
    driver.close()


def test_missing_file_is_reported_down_by_health_check_without_creating_it(tmp_path: Path):
    path = tmp_path / "absent.sqlite3"
    report = SqliteDriver(path=path).health_check()
    assert report["status"] == "down"
    assert "migrate" in report["checks"]["database"]["error"]
    assert not path.exists()


def test_connections_use_wal_and_foreign_keys(driver: SqliteDriver):
    driver.stats()
    connection = driver._connection()
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_another_model_is_refused_with_the_fix_named(sqlite_path: Path,
                                                     embedder: SentenceTransformerEmbedder):
    first = SqliteDriver(path=sqlite_path, embedder=embedder)
    first.store("alice", "made with MiniLM")
    first.close()
    other = SqliteDriver(path=sqlite_path, embedder=RenamedEmbedder(embedder, "other-model"))
    with pytest.raises(EmbeddingMismatchError, match="MEMORY_EMBEDDING_MODEL=all-MiniLM-L6-v2"):
        other.store("alice", "would mix vectors")
    with pytest.raises(EmbeddingMismatchError):
        other.recall("alice", query="anything")
    assert other.recall("alice", query="MiniLM", use_vector=False)  # keyword search still works
    assert other.health_check()["status"] == "degraded"
    other.close()


def test_keyword_only_recall_computes_no_embedding(sqlite_path: Path,
                                                   embedder: SentenceTransformerEmbedder):
    counting = CountingEmbedder(embedder)
    driver = SqliteDriver(path=sqlite_path, embedder=counting)
    driver.store("alice", "invoice INV-4471")
    assert driver.recall("alice", query="INV-4471", use_vector=False)
    assert counting.queries == 0
    driver.recall("alice", query="INV-4471")
    assert counting.queries == 1
    driver.close()


def test_writes_from_another_process_are_seen_by_the_next_recall(driver: SqliteDriver,
                                                                sqlite_path: Path):
    driver.store("alice", "Prefers dark mode")
    assert len(driver.recall("alice", query="dark mode")) == 1  # builds the in-memory copy
    run_in_other_process(sqlite_path, """
        driver.store("alice", "Keeps a sourdough starter named Bubbles")
        target = driver.recall("alice", query="dark mode", top_k=1)[0]
        driver.update(target["id"], "alice", content="Plays the cello every evening")
    """)
    found = driver.recall("alice", query="sourdough bread baking", top_k=1)
    assert found[0]["content"] == "Keeps a sourdough starter named Bubbles"
    found = driver.recall("alice", query="musical instrument practice", top_k=1)
    assert found[0]["content"] == "Plays the cello every evening"
    run_in_other_process(sqlite_path, "driver.forget_user('alice')")
    assert driver.recall("alice", query="cello") == []
    driver.store("alice", "A fresh start")
    assert [m["content"] for m in driver.recall("alice", query="fresh start")] == ["A fresh start"]


def test_vector_recall_equals_exact_search_over_the_stored_blobs(
    driver: SqliteDriver, sqlite_path: Path, embedder: SentenceTransformerEmbedder
):
    topics = ["cooking", "cycling", "databases", "music", "gardening", "travel", "finance"]
    items = []
    for i in range(420):
        user = f"user{i % 3}"
        items.append({"user_id": user, "content": f"Note {i} about {topics[i % 7]} and item {i}",
                      "conversation_id": f"c{i % 5}", "tags": [f"t{i % 4}"]})
    driver.store_many(items)
    deleted = driver.recall("user1", query="music", top_k=3)
    for memory in deleted:
        driver.delete(memory["id"], "user1")

    # Weights that ignore keywords and importance, so the ranking is the vector ranking alone.
    vector_only = SqliteDriver(path=sqlite_path, embedder=embedder,
                               weights=FusionWeights(vector=1.0, keyword=0.0, importance=0.0,
                                                     neighbour=0.0))
    vector_only.recall("user1", query="warm up the copy")
    connection = sqlite3.connect(sqlite_path)
    rows = connection.execute(
        "SELECT id, embedding, conversation_id, tags FROM memories "
        "WHERE user_id = 'user1' AND deleted_at IS NULL").fetchall()
    connection.close()
    matrix = np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob, _, _ in rows])

    def exact(query: str, keep) -> list[str]:
        scores = matrix @ embedder.embed_query(query)
        order = [i for i in np.argsort(-scores) if keep(rows[i])]
        return [rows[i][0] for i in order[:10]]

    for query in ("garden flowers", "bank account", "playing piano"):
        got = [m["id"] for m in vector_only.recall("user1", query=query, top_k=10)]
        assert got == exact(query, lambda row: True)
        narrowed = [m["id"] for m in vector_only.recall("user1", "c2", query, top_k=10)]
        assert narrowed == exact(query, lambda row: row[2] == "c2")
        tagged = [m["id"] for m in vector_only.recall("user1", query=query, top_k=10,
                                                       exclude_tags=["t0", "t1", "t2"])]
        assert tagged == exact(query, lambda row: '"t3"' in row[3])
    vector_only.close()


def test_concurrent_threads_store_and_recall_on_one_driver(driver: SqliteDriver):
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(15):
                driver.store(f"user{worker}", f"worker {worker} fact {i}")
                results = driver.recall(f"user{worker}", query=f"fact {i}", top_k=3)
                assert all(m["user_id"] == f"user{worker}" for m in results)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert driver.stats()["memories"]["visible"] == 60

