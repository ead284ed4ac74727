"""Access counts of the ``pgvector`` driver: kept by recall, written in batches off its path.

A recall counts an access to each memory it returns. Written by the recall itself (an
``UPDATE ... RETURNING`` of its rows, the rows locked in primary-key order so that concurrent
recalls cannot deadlock), that bookkeeping was ~0.5 ms of a ~5 ms recall at 10k memories
(against a plain ``SELECT`` of the same rows, interleaved). Now a recall reads its rows and
records its accesses here; they are written by a daemon thread every flush interval, each
memory's accumulated count in one statement, and before any other verb of the driver reads
(``PgvectorDriver._connection``), so that this process always reads its own counts: a ``get``
right after a recall shows the access, and the records a recall returns show the new values.

Exactness within the process: a recall reads its rows and the counts pending here under the
shared side of a lock whose exclusive side a write holds from taking the pending counts to its
commit. So a recall sees each count either in the database or here, never in both or neither.

Other processes see the counts after at most the flush interval
(``MEMORY_PG_ACCESS_FLUSH_SECONDS``). A process killed before a flush loses its last counts, as
a crash already could (the writes commit with ``synchronous_commit`` off); ``close()`` and
interpreter exit write what is left. If the database cannot be reached, the counts stay
pending (at most ``MAX_PENDING`` memories; past that the oldest are dropped, with a warning)
and are written when it can.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

logger = logging.getLogger("app.core.memory.drivers.pgvector")

#: Memories whose counts are kept at most while they cannot be written.
MAX_PENDING = 10_000

#: Each memory's pending access count and latest access time, by primary key.
Pending = dict[int, tuple[int, datetime]]

#: The write: given one connection's pending counts, writes them and commits.
Writer = Callable[[Pending], None]


class AccessCounts:
    """Pending access counts, the lock that keeps reads exact, and the thread that writes."""

    def __init__(self, flush_seconds: float) -> None:
        self.flush_seconds = flush_seconds
        self._pending: Pending = {}
        self._state = threading.Condition()
        self._readers = 0
        self._writers_waiting = 0
        self._writing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    # -- recall's side --------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while reading rows and then ``record``-ing their accesses: no write of pending
        counts commits in between (many readers at once; a write waits for them)."""
        with self._state:
            while self._writing or self._writers_waiting:  # a waiting write goes first
                self._state.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._state:
                self._readers -= 1
                if not self._readers:
                    self._state.notify_all()

    def record(self, pks: list[int], now: datetime) -> dict[int, int]:
        """Count one access of each of ``pks`` at ``now``; each one's count pending before it
        (add it and this access to the stored count for the value to show)."""
        with self._state:
            before = {pk: self._pending.get(pk, (0, now))[0] for pk in pks}
            for pk in pks:
                self._pending[pk] = (before[pk] + 1, now)
            if len(self._pending) > MAX_PENDING:
                self._drop_oldest()
        return before

    def pending_of(self, pks: list[int]) -> Pending:
        """The counts and times pending for ``pks`` (read within ``reading``, with their
        rows)."""
        with self._state:
            return {pk: self._pending[pk] for pk in pks if pk in self._pending}

    # -- writing ----------------------------------------------------------------------------------

    def has_pending(self) -> bool:
        return bool(self._pending)

    def write_pending(self, write: Writer) -> None:
        """Take every pending count and ``write`` it, no reader in between; on failure the
        counts go back to pending and the error is raised."""
        with self._state:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._state.wait()
            self._writers_waiting -= 1
            self._writing = True
            taken, self._pending = self._pending, {}
        try:
            if taken:
                write(taken)
        except BaseException:
            with self._state:
                for pk, (count, at) in taken.items():
                    later, latest = self._pending.get(pk, (0, at))
                    self._pending[pk] = (count + later, max(at, latest))
                if len(self._pending) > MAX_PENDING:
                    self._drop_oldest()
            raise
        finally:
            with self._state:
                self._writing = False
                self._state.notify_all()

    def start(self, flush: Callable[[], None]) -> None:
        """Run ``flush`` every ``flush_seconds`` on a daemon thread (idempotent)."""
        with self._state:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, args=(flush,), daemon=True,
                                            name="memory-pgvector-access")
            self._thread.start()

    def stop(self) -> None:
        """End the thread (after a write under way); the caller writes what is left."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self, flush: Callable[[], None]) -> None:
        while not self._stop.wait(self.flush_seconds):
            if not self._pending:
                continue
            try:
                flush()
                self._warned = False
            except Exception as exc:  # noqa: BLE001 - kept pending; said once per outage
                if not self._warned:
                    self._warned = True
                    logger.warning("access counts of %d memories not written yet (%s); "
                                   "retrying every %.1f s", len(self._pending),
                                   type(exc).__name__, self.flush_seconds)

    def _drop_oldest(self) -> None:
        """Keep the ``MAX_PENDING`` most recently accessed (caller holds the lock)."""
        ordered = sorted(self._pending.items(), key=lambda item: item[1][1])
        dropped = len(ordered) - MAX_PENDING
        self._pending = dict(ordered[dropped:])
        logger.warning("dropped the access counts of %d memories (the database could not be "
                       "written and more than %d memories were waiting)", dropped, MAX_PENDING)
