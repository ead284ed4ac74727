"""The contract suite against the SQLite driver, on a real migrated file per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from tests.contract.contract import MemoryDriverContract
from tests.contract.recall_time_context import RecallTimeAndContextContract


class TestSqliteDriver(MemoryDriverContract, RecallTimeAndContextContract):
    @pytest.fixture
    def driver(self, sqlite_path: Path,
               embedder: SentenceTransformerEmbedder) -> Iterator[SqliteDriver]:
        driver = SqliteDriver(path=sqlite_path, embedder=embedder)
        yield driver
        driver.close()
