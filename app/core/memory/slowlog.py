"""The slow-operation warning shared by the drivers.

A public verb of a driver that takes longer than ``MEMORY_SLOW_OPERATION_MS`` (default 1,000;
0 turns it off) is logged at WARNING by the driver's module logger: the driver, the verb and the
time the caller waited. Measured per verb, not per SQL statement, so it is what the caller felt
(embedding, lock waits and retries included) and nothing of the call (no arguments, no SQL, no
content) is logged.
"""

from __future__ import annotations

import logging
import time

#: The default threshold in milliseconds.
DEFAULT_SLOW_OPERATION_MS = 1_000


def log_if_slow(logger: logging.Logger, driver: str, verb: str, started: float,
                threshold_ms: int) -> None:
    """Warn when the verb begun at ``started`` (``time.perf_counter()``) took over the threshold."""
    if threshold_ms <= 0:
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    if elapsed_ms >= threshold_ms:
        logger.warning("slow %s.%s: %.0f ms (over MEMORY_SLOW_OPERATION_MS=%d)",
                       driver, verb, elapsed_ms, threshold_ms)
