"""The contract suite against the automem driver, through the AutoMem test double: a real HTTP
server on 127.0.0.1 written from shared/AUTOMEM_API.md (tests/automem_double.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.core.memory.drivers.automem_driver import AutomemDriver
from tests.automem_double import AutomemDouble
from tests.contract.contract import MemoryDriverContract


@pytest.fixture(scope="module")
def automem_service() -> Iterator[tuple[AutomemDouble, str]]:
    double = AutomemDouble(token="contract-token")
    url = double.start()
    yield double, url
    double.stop()


class TestAutomemDriver(MemoryDriverContract):
    ranks_by_meaning = False

    @pytest.fixture
    def driver(self, automem_service: tuple[AutomemDouble, str]) -> Iterator[AutomemDriver]:
        double, url = automem_service
        double.memories.clear()
        driver = AutomemDriver(url=url, token="contract-token", backoff_seconds=0.01)
        yield driver
        driver.close()
