"""The same formula gives the same ranking and the same scores on SQLite and PostgreSQL (issue
17: a threshold must carry over from one driver to the other), with the real model.

Before, a keyword-only match scored 0.62 on SQLite (bm25 over an ideal match) and 1.00 on
PostgreSQL (the share of query words held); both now take ``ranking.KeywordStats`` from the
user's own rows, so they differ only where the stemmers (porter, PostgreSQL's english) or the
float32 and float64 cosines do.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.core.memory import BaseMemoryDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import Embedder

TOLERANCE = 0.02
FACTS = [
    "Caroline went to the LGBTQ support group on Sunday",
    "Melanie painted a sunrise over the lake last year",
    "Jon lost his job as a banker and opened a dance studio",
    "Gina's clothing store got a big order from a boutique",
    "The zebra at the city zoo was sleeping in the shade",
    "Maria volunteers at the homeless shelter every weekend",
    "John's daughter started violin lessons in September",
    "We hiked the Appalachian trail for three weeks",
    "Audrey adopted two puppies named Pepper and Panda",
    "The budget report for the quarter is due on Friday",
    "Tim is reading a fantasy novel about dragons",
    "Dave restored a vintage car and took it to a show",
    "Evan's family trip to Paris was cancelled because of rain",
    "Sam joined a cooking class to learn Italian pasta",
    "Nate won a video game tournament with his team",
    "Joanna wrote a screenplay and sent it to a film festival",
]
QUERIES = ["support group", "what did Melanie paint", "dance studio", "zebra",
           "Who adopted puppies?", "Paris trip rain", "violin lessons in September 2023",
           "budget report Friday", "fantasy dragons novel", "pasta"]


@pytest.fixture
def drivers(sqlite_path: Path, empty_pg: str,
            embedder: Embedder) -> Iterator[tuple[BaseMemoryDriver, BaseMemoryDriver]]:
    sqlite = SqliteDriver(path=sqlite_path, embedder=embedder)
    pg = PgvectorDriver(url=empty_pg, embedder=embedder, pool_max_size=2)
    start = datetime(2023, 9, 1, tzinfo=UTC)
    items = [{"user_id": "alice", "content": fact, "conversation_id": f"c{i % 3}",
              "occurred_at": start + timedelta(days=i)} for i, fact in enumerate(FACTS)]
    for driver in (sqlite, pg):
        driver.store_many(items)
        driver.store_many([{"user_id": "bob", "content": "zebra support group pasta"}] * 5)
    yield sqlite, pg
    sqlite.close()
    pg.close()


@pytest.mark.parametrize("use_vector", [True, False], ids=["hybrid", "keyword-only"])
def test_both_drivers_rank_alike_and_score_within_the_tolerance(
        drivers: tuple[BaseMemoryDriver, BaseMemoryDriver], use_vector: bool) -> None:
    sqlite, pg = drivers
    for query in QUERIES:
        found = [[(m["content"], m["score"]) for m in driver.recall(
            "alice", query=query, top_k=5, use_vector=use_vector)] for driver in (sqlite, pg)]
        on_sqlite, on_pg = found
        assert [c for c, _ in on_sqlite] == [c for c, _ in on_pg], query
        for (_, left), (_, right) in zip(on_sqlite, on_pg, strict=True):
            assert abs(left - right) <= TOLERANCE, (query, on_sqlite, on_pg)
