"""``SyncOverAsync``: the async API seen through the sync contract, so the contract suite (written
once, synchronously) runs against ``AsyncMemoryDriver`` on every driver.

Every call is a coroutine of the ``AsyncMemoryDriver`` run on an event loop in a thread of its own
(as an application's loop would be), and awaited from the test's thread. The adapter adds nothing:
arguments go through untouched and results and errors come back as the coroutine gave them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from app.core.memory.aio import AsyncMemoryDriver


class EventLoopThread:
    """An event loop running in a daemon thread until ``stop()``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-event-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coroutine`` on the loop and wait for its result (or its exception)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class SyncOverAsync:
    """Looks like a ``BaseMemoryDriver``; each verb awaits the async driver's coroutine."""

    def __init__(self, async_driver: AsyncMemoryDriver, loop: EventLoopThread) -> None:
        self.async_driver = async_driver
        self.name = async_driver.name
        self._loop = loop

    def __getattr__(self, verb: str) -> Callable[..., Any]:
        coroutine_function = getattr(self.async_driver, verb)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run(coroutine_function(*args, **kwargs))

        return call

    def close(self) -> None:
        self._loop.run(self.async_driver.aclose())
