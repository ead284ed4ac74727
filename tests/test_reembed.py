"""``reembed``: switching a store to another model, as a user does it (the command killed part
way and run again), and what happens to rows written while it runs, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from app.core.memory.errors import EmbeddingMismatchError
from tests.conftest import PROJECT_ROOT, migrate_postgres
from tests.word_hash_embedder import WordHashEmbedder

MEMORIES = 1_500


class SmallWordHash(WordHashEmbedder):
    """Another "model": different name, 128 dimensions, so a switch changes the vector size."""

    model_name = "word-hash-128"
    dimension = 128


@pytest.fixture
def pg_store(blank_database: str) -> str:
    """A migrated database of this test's own: a re-embed may change its vector columns."""
    return migrate_postgres(blank_database)


@pytest.fixture(params=["sqlite", "pgvector"])
def store(request: pytest.FixtureRequest, sqlite_path: Path) -> Iterator[dict[str, Any]]:
    """Per driver: how to open it with an embedder, its CLI environment, a staged-rows probe."""
    if request.param == "sqlite":
        def staged() -> int:
            with closing(sqlite3.connect(sqlite_path)) as conn:
                return int(conn.execute("SELECT COUNT(next_embedding) FROM memories"
                                        ).fetchone()[0])

        yield {"open": lambda embedder: SqliteDriver(path=sqlite_path, embedder=embedder),
               "env": {"MEMORY_DRIVER": "sqlite", "MEMORY_SQLITE_PATH": str(sqlite_path)},
               "staged": staged}
        return
    import psycopg

    url = request.getfixturevalue("pg_store")

    def pg_staged() -> int:
        with psycopg.connect(url) as conn:
            return int(conn.execute("SELECT COUNT(next_embedding) FROM memories").fetchone()[0])

    opened: list[PgvectorDriver] = []

    def open_pg(embedder: Any) -> PgvectorDriver:
        opened.append(PgvectorDriver(url=url, embedder=embedder))
        return opened[-1]

    yield {"open": open_pg, "env": {"MEMORY_DRIVER": "pgvector", "DATABASE_URL": url},
           "staged": pg_staged, "url": url}
    for driver in opened:
        driver.close()


def stored_vectors(driver: Any) -> dict[str, tuple[str, np.ndarray]]:
    """Every memory's and chunk's (text, vector), by id."""
    found = {}
    for record in driver.export_records(with_embeddings=True):
        if record["type"] == "memory":
            found[record["id"]] = (record["content"], record["embedding"])
        elif record["type"] == "knowledge_document":
            for chunk in record["chunks"]:
                found[f"{record['doc_id']}#{chunk['chunk_index']}"] = (chunk["content"],
                                                                      chunk["embedding"])
    return found


def assert_made_by(driver: Any, embedder: Any) -> None:
    vectors = stored_vectors(driver)
    texts = [text for text, _ in vectors.values()]
    expected = embedder.embed_documents(texts)
    for (text, vector), wanted in zip(vectors.values(), expected, strict=True):
        assert vector.shape == wanted.shape and np.allclose(vector, wanted, atol=1e-5), text


def test_reembed_killed_part_way_then_run_again_completes(
        store: dict[str, Any], embedder: SentenceTransformerEmbedder):
    old = store["open"](WordHashEmbedder())
    old.store_many([{"user_id": f"user{i % 7}", "content": f"memory {i} about topic {i % 13}"}
                    for i in range(MEMORIES)])
    old.store_global_knowledge("Badges are at the front desk. " * 80, "handbook")
    with pytest.raises(EmbeddingMismatchError, match="python -m app reembed"):
        store["open"](embedder).recall("user1", query="topic")

    run = subprocess.Popen([sys.executable, "-m", "app", "reembed", "--batch-size", "32"],
                           cwd=PROJECT_ROOT, env={**os.environ, **store["env"]},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while store["staged"]() < 64 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
    finally:
        run.wait(timeout=60)
    staged = store["staged"]()
    assert 64 <= staged < MEMORIES, "the run was not cut part way"
    assert old.stats()["embedding"]["model"] == "word-hash-test"  # nothing switched yet

    again = subprocess.run([sys.executable, "-m", "app", "--json", "reembed"],
                           cwd=PROJECT_ROOT, env={**os.environ, **store["env"]},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["resumed"] and report["already_staged"] == staged
    assert report["embedded"] == report["total"] - staged
    assert report["previous"] == {"model": "word-hash-test", "dimension": 384}
    new = store["open"](embedder)
    assert new.stats()["embedding"] == {"model": "all-MiniLM-L6-v2", "dimension": 384}
    assert store["staged"]() == 0
    assert_made_by(new, embedder)
    assert new.recall("user3", query="memory 3 about topic 3", top_k=1)[0]["content"] == \
        "memory 3 about topic 3"


class Interfering:
    """The new model, wrapped: on its second batch, ``act`` writes through another driver."""

    def __init__(self, model: Any, act: Callable[[], None]) -> None:
        self.model, self.act, self.calls = model, act, 0
        self.model_name, self.dimension = model.model_name, model.dimension

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        if self.calls == 2:
            self.act()
        return self.model.embed_documents(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self.model.embed_query(text)


def test_rows_written_during_a_run_get_vectors_of_their_final_text(store: dict[str, Any]):
    writer = store["open"](WordHashEmbedder())
    first = writer.store_many([{"user_id": "ana", "content": f"note {i}"} for i in range(40)])
    late: dict[str, str] = {}

    def act() -> None:  # while the run is under way: an already staged row changes, one arrives
        writer.update(first[0]["id"], content="note zero, rewritten during the run")
        late["id"] = writer.store("ana", "a note stored during the run")["id"]

    new_model = SmallWordHash()
    report = store["open"](WordHashEmbedder()).reembed(Interfering(new_model, act),
                                                        batch_size=8)
    assert report.model == "word-hash-128" and report.dimension == 128
    after = store["open"](new_model)
    vectors = stored_vectors(after)
    assert vectors[first[0]["id"]][0] == "note zero, rewritten during the run"
    assert late["id"] in vectors
    assert_made_by(after, new_model)
    assert after.recall("ana", query="rewritten during the run", top_k=1)[0]["id"] == \
        first[0]["id"]
    if "url" in store:  # the column now holds the new size, and its HNSW index is rebuilt
        import psycopg

        with psycopg.connect(store["url"]) as conn:
            column = conn.execute(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'memories'::regclass AND attname = 'embedding'").fetchone()
            index = conn.execute("SELECT indexdef FROM pg_indexes "
                                 "WHERE indexname = 'memories_embedding'").fetchone()
        assert column == ("vector(128)",) and "hnsw" in index[0]


def test_a_run_for_another_model_starts_over(store: dict[str, Any]):
    driver = store["open"](WordHashEmbedder())
    driver.store_many([{"user_id": "ana", "content": f"note {i}"} for i in range(30)])

    class Interrupted(Exception):
        pass

    def stop() -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        driver.reembed(Interfering(SmallWordHash(), stop), batch_size=8)
    assert store["staged"]() == 8  # one batch committed before the interruption

    report = driver.reembed(WordHashEmbedder(), batch_size=8)
    assert not report.resumed and report.already_staged == 0 and report.embedded == 30
    assert_made_by(store["open"](WordHashEmbedder()), WordHashEmbedder())
