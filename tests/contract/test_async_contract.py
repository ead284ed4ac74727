"""The contract suite against the async API (``AsyncMemoryDriver``) on every driver, through the
thin sync-over-async adapter of ``async_adapter.py``: the same tests, the same real backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.memory.aio import AsyncMemoryDriver
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.drivers.automem_driver import AutomemDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from tests.automem_double import AutomemDouble
from tests.contract.async_adapter import EventLoopThread, SyncOverAsync
from tests.contract.contract import MemoryDriverContract
from tests.contract.recall_time_context import RecallTimeAndContextContract
from tests.contract.test_automem_contract import ENRICHMENT_WINDOW


@pytest.fixture(scope="module")
def event_loop_thread() -> Iterator[EventLoopThread]:
    loop = EventLoopThread()
    yield loop
    loop.stop()


def adapted(driver: BaseMemoryDriver, loop: EventLoopThread) -> Iterator[SyncOverAsync]:
    adapter = SyncOverAsync(AsyncMemoryDriver(driver, max_workers=4), loop)
    yield adapter
    adapter.close()


class TestAsyncSqlite(MemoryDriverContract, RecallTimeAndContextContract):
    @pytest.fixture
    def driver(self, sqlite_path: Path, embedder: SentenceTransformerEmbedder,
               event_loop_thread: EventLoopThread) -> Iterator[SyncOverAsync]:
        yield from adapted(SqliteDriver(path=sqlite_path, embedder=embedder), event_loop_thread)


class TestAsyncPgvector(MemoryDriverContract, RecallTimeAndContextContract):
    @pytest.fixture
    def driver(self, empty_pg: str, embedder: SentenceTransformerEmbedder,
               event_loop_thread: EventLoopThread) -> Iterator[SyncOverAsync]:
        yield from adapted(PgvectorDriver(url=empty_pg, embedder=embedder, pool_max_size=4),
                           event_loop_thread)


@pytest.fixture(scope="module")
def automem_service() -> Iterator[tuple[AutomemDouble, str]]:
    """The same realistic AutoMem double as the sync contract suite's."""
    double = AutomemDouble.realistic(token="contract-token")
    url = double.start()
    yield double, url
    double.stop()


class TestAsyncAutomem(MemoryDriverContract, RecallTimeAndContextContract):
    ranks_by_meaning = False

    @pytest.fixture
    def driver(self, automem_service: tuple[AutomemDouble, str],
               event_loop_thread: EventLoopThread) -> Iterator[SyncOverAsync]:
        double, url = automem_service
        double.settle()
        double.memories.clear()
        yield from adapted(AutomemDriver(url=url, token="contract-token", backoff_seconds=0.01,
                                         enrichment_window=ENRICHMENT_WINDOW), event_loop_thread)
