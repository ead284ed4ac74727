"""A word too common to say what a query is about, on both SQL drivers (issue 17's keyword
statistics, ``ranking.KeywordStats``), with the word-hash test embedder: these tests are about
which rows the keyword side finds and how it scores them, not about meaning."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.core.memory import BaseMemoryDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from tests.word_hash_embedder import WordHashEmbedder


@pytest.fixture(params=["sqlite", "pgvector"])
def driver(request: pytest.FixtureRequest, sqlite_path: Path) -> Iterator[BaseMemoryDriver]:
    if request.param == "sqlite":
        made: BaseMemoryDriver = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    else:
        made = PgvectorDriver(url=request.getfixturevalue("empty_pg"),
                              embedder=WordHashEmbedder(), pool_max_size=2)
    yield made
    made.close()


def test_a_common_word_neither_brings_candidates_nor_counts(driver: BaseMemoryDriver):
    """A word in more than ``COMMON_TERM_SHARE`` of the user's rows is not searched and not
    weighed: a keyword recall for it and a rare word returns the rare word's rows at full
    coverage, not the hundreds that hold only the common one (SQLite reads the common word's
    rows only until it knows it common). Asked alone (every word common), it is searched after
    all, equal scores in the total order (what occurred last first). Another user's rows never
    count."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    common = driver.store_many([{"user_id": "u", "content": f"common n{i}x",
                                 "occurred_at": start + timedelta(minutes=i)}
                                for i in range(300)])
    rare = driver.store_many([{"user_id": "u", "content": f"common rareword r{i}x",
                               "occurred_at": start + timedelta(days=1, minutes=i)}
                              for i in range(3)])
    driver.store_many([{"user_id": "other", "content": "rareword"} for _ in range(500)])

    both = driver.recall("u", query="common rareword", use_vector=False, top_k=10)
    assert {memory["id"] for memory in both} == {memory["id"] for memory in rare}
    assert all(memory["score"] == 1.0 for memory in both)

    alone = driver.recall("u", query="common", use_vector=False, top_k=10)
    every = sorted(common + rare, key=lambda m: (m["occurred_at"], m["created_at"], m["id"]),
                   reverse=True)
    assert [memory["id"] for memory in alone] == [memory["id"] for memory in every[:10]]

    hybrid = driver.recall("u", query="common rareword", top_k=3)
    assert {memory["id"] for memory in hybrid} == {memory["id"] for memory in rare}
