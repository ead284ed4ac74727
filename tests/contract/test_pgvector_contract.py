"""The contract suite against the pgvector driver, on a real PostgreSQL with pgvector (a database
of this test run's own, emptied before every test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from tests.contract.contract import MemoryDriverContract
from tests.contract.recall_time_context import RecallTimeAndContextContract


class TestPgvectorDriver(MemoryDriverContract, RecallTimeAndContextContract):
    @pytest.fixture
    def driver(self, empty_pg: str,
               embedder: SentenceTransformerEmbedder) -> Iterator[PgvectorDriver]:
        driver = PgvectorDriver(url=empty_pg, embedder=embedder, pool_max_size=4)
        yield driver
        driver.close()
