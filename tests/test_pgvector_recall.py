"""How the pgvector driver picks and scores recall candidates, on a real PostgreSQL: keyword
coverage for every candidate, statistics from the user's own rows (common words: in
``tests/test_common_words.py``, for both SQL drivers).

The word-hash test embedder stands in for the model: these tests are about which candidates the
SQL finds and the scores it gives them, and need vectors whose cosines are known exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.ranking import (
    DEFAULT_WEIGHTS,
    KeywordStats,
    candidate_depth,
    keyword_coverage,
)
from tests.threads import run_together
from tests.word_hash_embedder import WordHashEmbedder


@pytest.fixture
def driver(empty_pg: str) -> Iterator[PgvectorDriver]:
    driver = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder(), pool_max_size=2)
    yield driver
    driver.close()


def test_a_vector_candidate_past_the_keyword_cut_off_keeps_its_keyword_coverage(
        driver: PgvectorDriver):
    """More rows hold both query words than the keyword side takes (its depth), so the memory
    holding one of them is found by its vector alone; it must still score its coverage of
    the query. Before, such a candidate scored 0 on keywords and lost to every two-word
    match."""
    fillers = " ".join(f"w{i}x" for i in range(200))  # two-word matches, far from the query
    depth = candidate_depth(1)
    driver.store_many([{"user_id": "u", "content": f"alpha beta {fillers} n{i}x"}
                       for i in range(depth + 10)])
    # Enough other rows that neither word is common (held by more than 10% of them).
    others = 10 * (depth + 11)
    driver.store_many([{"user_id": "u", "content": f"o{i}x"} for i in range(others)])
    near = driver.store("u", "alpha")

    found = driver.recall("u", query="alpha beta", top_k=1)

    embedder = WordHashEmbedder()
    cosine = float(embedder.embed_query("alpha") @ embedder.embed_query("alpha beta"))
    rows = depth + 11 + others
    weights = KeywordStats(rows, {"alpha": depth + 11, "beta": depth + 10}).weights()
    coverage = weights["alpha"] / (weights["alpha"] + weights["beta"])
    w = DEFAULT_WEIGHTS
    expected = (w.vector * cosine + w.keyword * coverage + w.importance * 0.5) / (
        w.vector + w.keyword + w.importance)
    assert [memory["id"] for memory in found] == [near["id"]]
    assert found[0]["score"] == pytest.approx(expected, abs=1e-6)


def test_recall_sends_no_vector_as_text(driver: PgvectorDriver, empty_pg: str):
    """Stored and queried vectors arrive exactly (the binary parameter format)."""
    stored = driver.store("u", "exact vectors please")
    with psycopg.connect(empty_pg) as connection:
        text = connection.execute("SELECT embedding::text FROM memories WHERE id = %s",
                                  (stored["id"],)).fetchone()
    assert text is not None
    saved = np.array(text[0].strip("[]").split(","), dtype=np.float32)
    np.testing.assert_array_equal(saved, WordHashEmbedder().embed_query("exact vectors please"))
    found = driver.recall("u", query="exact vectors please", top_k=1)
    assert found[0]["id"] == stored["id"]


def test_the_statistics_are_the_users_own_visible_rows(driver: PgvectorDriver,
                                                       empty_pg: str):
    """The candidate statement counts the scope's rows and each term's rows in it: another
    user's rows, and the user's deleted ones, never count."""
    driver.store_many([{"user_id": "u", "content": f"garden tomato n{i}x"} for i in range(7)]
                      + [{"user_id": "u", "content": f"garden n{i}y"} for i in range(5)])
    driver.store_many([{"user_id": "other", "content": "garden tomato piano"}
                       for _ in range(50)])
    gone = driver.store("u", "tomato piano")
    driver.delete(gone["id"], "u")
    sql, values = driver.explain_recall("u", "garden tomato piano", None, 5)
    with psycopg.connect(empty_pg) as connection:
        rows = connection.execute(sql, values).fetchall()
    assert rows and {(row[7], tuple(row[8])) for row in rows} == {(12.0, (12.0, 7.0, 0.0))}


def test_every_query_term_a_row_holds_counts_up_to_the_last_of_64(driver: PgvectorDriver):
    """The terms a holder holds travel as 63-term bit masks: the 64th query term (the second
    mask's first bit) counts toward a row's coverage as the first does."""
    terms = [f"k{i}x" for i in range(1, 65)]
    last_only = driver.store("u", "k64x")
    first_and_last = driver.store("u", "k1x k64x")
    driver.store_many([{"user_id": "u", "content": f"o{i}x"} for i in range(20)])

    found = driver.recall("u", query=" ".join(terms), top_k=2, use_vector=False)

    weights = KeywordStats(22, {term: 0 for term in terms} | {"k1x": 1, "k64x": 2}).weights()
    assert [(memory["id"], memory["score"]) for memory in found] == [
        (first_and_last["id"], pytest.approx(keyword_coverage({"k1x", "k64x"}, weights), abs=1e-6)),
        (last_only["id"], pytest.approx(keyword_coverage({"k64x"}, weights), abs=1e-6))]


@pytest.mark.parametrize("with_query", [True, False], ids=["ranked", "newest-first"])
def test_concurrent_recalls_of_the_same_memories_never_deadlock(empty_pg: str, with_query: bool):
    """Recalls count accesses, and the counts are written while other recalls run (every
    10 ms here). Writes of overlapping rows must lock them in one order (the primary key's),
    or each can wait for a row the other holds: PostgreSQL then kills one with "deadlock
    detected". Before, each ranked recall updated its rows in the join's order and 100
    concurrent recalls of one user (bench.aio) failed this way."""
    driver = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder(), pool_max_size=8,
                            access_flush_seconds=0.01)
    words = [f"w{i}" for i in range(12)]
    driver.store_many([{"user_id": "u", "content": " ".join(words[i % 12:i % 12 + 4] + [f"n{i}"])}
                       for i in range(40)])
    queries = [" ".join(words[i:i + 3]) for i in range(10)]

    def recall_many(offset: int) -> None:
        for round_ in range(25):
            query = queries[(offset + round_) % len(queries)] if with_query else None
            driver.recall("u", query=query, top_k=20)

    try:
        errors = run_together([functools.partial(recall_many, i) for i in range(8)])
    finally:
        driver.close()
    assert errors == []
    with psycopg.connect(empty_pg) as connection:
        total = connection.execute("SELECT sum(access_count) FROM memories").fetchone()[0]
    assert total == 8 * 25 * 20  # every recall counted each of its 20 results once


@pytest.mark.parametrize("own_pool", [True, False])
def test_a_recall_leaves_no_plan_setting_to_the_next_user_of_its_connection(
        empty_pg: str, own_pool: bool):
    """A recall runs its statements on generic plans (``plan_cache_mode``); whatever uses the
    connection next, another verb or a pool shared with the application, gets the default
    back: through the driver's own pool's check, or by the recall itself with a pool given."""
    from psycopg_pool import ConnectionPool

    pool = None if own_pool else ConnectionPool(empty_pg, min_size=1, max_size=1, open=False)
    driver = PgvectorDriver(url=empty_pg, pool=pool, embedder=WordHashEmbedder(),
                            pool_min_size=1, pool_max_size=1)
    try:
        driver.store("u", "alpha beta gamma")
        assert driver.recall("u", query="alpha")
        with driver._connection() as conn:  # the one connection the recall used
            assert conn.execute("SHOW plan_cache_mode").fetchone() == ("auto",)
    finally:
        driver.close()
        if pool is not None:
            pool.close()
