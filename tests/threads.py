"""Running a test's calls on threads at once and collecting what they raised."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_together(calls: list[Callable[[], object]], timeout: float = 120) -> list[BaseException]:
    """Start every call on a thread of its own, wait for all (``timeout`` each), and return
    whatever they raised (an empty list: none raised)."""
    errors: list[BaseException] = []

    def guarded(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - returned to the test, which asserts
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return errors
