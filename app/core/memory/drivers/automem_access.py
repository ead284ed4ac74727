"""Access counts of the ``automem`` driver: recorded in memory, written in the background.

AutoMem has no batch update, and an access count is a read-modify-write of a memory's metadata,
so counting each result of each recall with its own request made a top-10 recall cost ten
PATCHes. Instead a recall records its accesses here (memory id -> count delta, last access time)
and returns; a daemon thread writes each memory's accumulated delta once per flush interval, so
N recalls of the same memory between two flushes cost one write. ``close()`` stops the thread
and flushes what is left.

Reads of the same driver add what is not on the server yet (``overlay``), so a caller sees its
own counts at once; other processes see them after at most the flush interval (longer while the
memory is in its enrichment window, or while the service is unreachable).

A write stamps the memory's metadata with the flush's token. While a write is in flight, or was
just done, a read that shows another token, and began before the write landed, still gets that
write's delta added; one that shows the token already has it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.memory.errors import BackendUnavailableError

log = logging.getLogger(__name__)

#: How long a written delta is still added to a read that began before it landed.
HOLD_SECONDS = 60.0


@dataclass
class Access:
    """Accesses of one memory not yet on the server (or being written with ``token``)."""

    count: int
    last: datetime
    token: str | None = None
    done_at: float | None = None  # time.monotonic() when its write landed


#: Writes one memory's accesses: True written, None the memory is gone (dropped), False not now
#: (kept for the next flush). ``final`` is True for the last flush of ``close()``.
Writer = Callable[[str, Access, bool], "bool | None"]


class AccessLog:
    """A thread-safe table of pending accesses, and the daemon thread that flushes it."""

    def __init__(self, write: Writer, interval: float) -> None:
        self._write = write
        self._interval = max(0.01, interval)
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time: the thread, or a caller
        self._pending: dict[str, Access] = {}
        self._sent: dict[str, Access] = {}  # being written, or written less than HOLD ago
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def record(self, memory_ids: Iterable[str], now: datetime) -> None:
        """Count one access of each memory at ``now`` (starts the flusher on first use)."""
        with self._lock:
            for memory_id in memory_ids:
                access = self._pending.get(memory_id)
                if access is None:
                    self._pending[memory_id] = Access(1, now)
                else:
                    access.count += 1
                    access.last = max(access.last, now)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="automem-access",
                                                daemon=True)
                self._thread.start()

    def overlay(self, memory: dict[str, Any], token: Any, read_started: float) -> None:
        """Add to ``memory`` (as read from the server, carrying ``token``, by a read that began at
        ``read_started``) the accesses the server did not have yet."""
        delta, last = 0, memory.get("last_accessed_at")
        with self._lock:
            sent = self._sent.get(memory["id"])
            if (sent is not None and sent.token != token
                    and (sent.done_at is None or read_started < sent.done_at)):
                delta, last = sent.count, _later(last, sent.last)
            pending = self._pending.get(memory["id"])
            if pending is not None:
                delta, last = delta + pending.count, _later(last, pending.last)
        if delta:
            memory["access_count"] = int(memory.get("access_count") or 0) + delta
            memory["last_accessed_at"] = last

    def flush(self, *, final: bool = False) -> int:
        """Write every pending delta (one write per memory); how many memories were written.

        Never raises: a memory that is gone is dropped; when the service cannot be reached the
        rest of the round is kept for the next flush (and lost at the last one, with a warning).
        """
        with self._flushing:
            now = time.monotonic()
            with self._lock:
                batch, self._pending = self._pending, {}
                self._sent = {i: a for i, a in self._sent.items()
                              if a.done_at is not None and now - a.done_at < HOLD_SECONDS}
                for memory_id, access in batch.items():
                    access.token = uuid.uuid4().hex
                    self._sent[memory_id] = access
            written, unreachable = 0, False
            for memory_id, access in batch.items():
                outcome: bool | None = False
                if not unreachable:
                    try:
                        outcome = self._write(memory_id, access, final)
                    except BackendUnavailableError as exc:
                        log.warning("AutoMem: access counts not written yet (%s)", exc)
                        unreachable = True
                    except Exception:  # noqa: BLE001 - a count must never fail anything
                        log.warning("AutoMem: an access count was dropped", exc_info=True)
                        outcome = None
                with self._lock:
                    if outcome:
                        access.done_at = time.monotonic()
                        written += 1
                        continue
                    self._sent.pop(memory_id, None)
                    if outcome is False and not final:
                        kept = self._pending.setdefault(memory_id, Access(0, access.last))
                        kept.count += access.count
                        kept.last = max(kept.last, access.last)
            if final and unreachable:
                log.warning("AutoMem: access counts of %d memories were lost at close",
                            len(batch) - written)
            return written

    def close(self) -> None:
        """Stop the flusher and write what is left (waiting out enrichment windows)."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join()
        self.flush(final=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()


def _later(first: Any, second: datetime) -> datetime:
    return second if not isinstance(first, datetime) or second > first else first
