"""The contract as coroutines: ``get_async_memory_driver`` and ``AsyncMemoryDriver``.

SKELETON (issue 18 work in progress): every verb of ``BaseMemoryDriver`` runs the sync driver's
verb on a bounded thread pool, so the event loop never blocks. The helper working on issue 18
replaces this docstring with the layering decision and explicit signatures.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from app.core.memory.base import BaseMemoryDriver
from app.core.memory.manager import MemoryDriverManager

_VERBS = (
    "recall", "recall_global_knowledge", "store", "store_global_knowledge", "delete",
    "health_check", "get", "update", "store_many", "list_memories", "restore", "forget_user",
    "purge", "delete_knowledge", "stats", "create_user", "get_user", "get_profile", "set_profile",
)


class AsyncMemoryDriver:
    """Every contract verb as a coroutine over one sync driver."""

    def __init__(self, driver: BaseMemoryDriver, *, max_workers: int = 8) -> None:
        self.driver = driver
        self.name = driver.name
        self._executor = ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix=f"memory-{driver.name}")

    async def _call(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        method = getattr(self.driver, verb)
        return await loop.run_in_executor(self._executor, lambda: method(*args, **kwargs))

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)
        self.driver.close()

    async def __aenter__(self) -> AsyncMemoryDriver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _make_verb(verb: str) -> Any:
    async def call(self: AsyncMemoryDriver, *args: Any, **kwargs: Any) -> Any:
        return await self._call(verb, *args, **kwargs)

    call.__name__ = verb
    return call


for _verb in _VERBS:
    setattr(AsyncMemoryDriver, _verb, _make_verb(_verb))

_lock = threading.Lock()
_cache: dict[str, AsyncMemoryDriver] = {}


def get_async_memory_driver(name: str | None = None) -> AsyncMemoryDriver:
    """The async driver for ``name`` (else ``MEMORY_DRIVER``), cached per name."""
    driver = MemoryDriverManager.driver(name)
    with _lock:
        cached = _cache.get(driver.name)
        if cached is None or cached.driver is not driver:
            cached = _cache[driver.name] = AsyncMemoryDriver(driver)
        return cached
