"""The contract suite against the automem driver, through the AutoMem test double: a real HTTP
server on 127.0.0.1 written from shared/AUTOMEM_API.md (tests/automem_double.py), with every
behaviour of the real server switched on (enrichment writing back tags and metadata, queued
embedding, prefix exclusion, case-insensitive tags, the limit cap, slow batches, summaries)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.core.memory.drivers.automem_driver import AutomemDriver
from tests.automem_double import AutomemDouble
from tests.contract.contract import MemoryDriverContract
from tests.contract.recall_time_context import RecallTimeAndContextContract

#: The double enriches 0.05 s after a store; the driver waits this long before writing tags or
#: metadata of a fresh memory (5x, so a busy test machine delaying the double's job does not
#: turn into a flaky test).
ENRICHMENT_WINDOW = 0.25


@pytest.fixture(scope="module")
def automem_service() -> Iterator[tuple[AutomemDouble, str]]:
    double = AutomemDouble.realistic(token="contract-token")
    url = double.start()
    yield double, url
    double.stop()


class TestAutomemDriver(MemoryDriverContract, RecallTimeAndContextContract):
    ranks_by_meaning = False

    @pytest.fixture
    def driver(self, automem_service: tuple[AutomemDouble, str]) -> Iterator[AutomemDriver]:
        double, url = automem_service
        double.settle()
        double.memories.clear()
        driver = AutomemDriver(url=url, token="contract-token", backoff_seconds=0.01,
                               enrichment_window=ENRICHMENT_WINDOW)
        yield driver
        driver.close()
