"""The contract as coroutines: ``get_async_memory_driver`` and ``AsyncMemoryDriver``.

    from app.core.memory import get_async_memory_driver

    memory = get_async_memory_driver()          # cached per name, like get_memory_driver()
    await memory.store(user_id="u123", content="Prefers dark mode")
    hits = await memory.recall(user_id="u123", query="ui preferences", top_k=5)

Every verb of ``BaseMemoryDriver`` is here as a coroutine with the same arguments, defaults,
records and errors (``export_records`` as an async iterator).

Layering (decided by measurement, ``python -m bench.aio``, on the 2-core development machine):

- **Database and HTTP work: the sync driver on a fixed pool of worker threads.** An
  ``AsyncMemoryDriver`` wraps the sync driver ``get_memory_driver(name)`` returns and runs each
  verb on ``default_workers(name)`` threads (``MEMORY_ASYNC_WORKERS``; unset, one per core for
  SQLite and two per core for pgvector, see ``WORKERS_PER_CORE``; for pgvector at most its pool
  size, so no worker ever waits for a connection). The SQL, the validation and the ranking thus
  exist once. psycopg, sqlite3 and httpx release the interpreter lock while they wait, so the
  threads overlap the waits: 100 concurrent recalls on pgvector took 0.25 of the time of the
  same recalls awaited one after another (0.29 with a new query each, embedding included).
  Native async was measured against it for the database half of a recall (100 nearest-vector
  queries, 8 connections): psycopg's ``AsyncConnectionPool`` on the loop took 0.079 s against
  0.065 s for the sync pool on 8 threads, so no faster; it did keep the loop's worst lateness
  lower there (11 against 33 ms: the threads' own Python competes for the GIL), the one thing it
  would buy. For that it would need every driver's SQL and row handling split from its I/O (a
  second driver per backend, or a rewrite of each) and pools bound to one event loop, where this
  driver serves any loop. So: threads, also for AutoMem's HTTP (``httpx.Client`` is thread-safe
  and waits without the GIL).
- **The embedding model: a child process** (``embed_process.py``; ``MEMORY_ASYNC_EMBED_IN_PROCESS``
  turns it off).
  Loading it (importing torch and sentence-transformers) holds the interpreter lock in stretches
  of 0.2-0.5 s, and a thread cannot change that: with the load on a worker thread the loop woke
  up to 1.1-1.6 s late. In a child process the load and every encode run beside the loop, and
  concurrent queries are encoded together in batches. Installed as the process-wide embedder on
  the first ``get_async_memory_driver`` call, unless a model is loaded in this process already.
  The child runs at a lower CPU priority (``embed_process.CHILD_NICENESS``).
- **Worker threads started with the driver**, not by the first burst of calls: under a burst,
  ``ThreadPoolExecutor`` started a thread inside ``submit`` for each call that found none idle,
  and each start waited for a CPU and the GIL on the loop (the first burst of ``bench.aio``
  kept the loop busy 28-40 ms, against 5-22 ms with the threads already running).
- **The worker idle last takes the next call** (``worker_pool.WorkerPool``), so a caller that
  awaits each call keeps one thread and, on SQLite, its connection's warm page cache: over
  HTTP (``bench.service``, one caller) the service added 2.1-2.6 ms to a recall while two
  workers took turns, 1.3 ms with one worker taking them all.
- **Validation on the loop** before dispatch (the same ``validation.py`` checks the drivers run
  again): bad input fails at once instead of queueing behind busy workers. A ``store_many`` of
  more than ``PRECHECK_MAX_ITEMS`` items is checked on its worker only (~60 us an item).

Loop lag (cold process, 100 recalls and 10 store_many at once, first embedding included; a
5 ms ticker): p50 0.2-0.3 ms; max 7-9 ms (SQLite) and 9-12 ms (pgvector) with the workers of
``WORKERS_PER_CORE``, against 19-21 ms with 8 workers on either, on the quiet 2-core machine.
With 8 threads, the loop waited behind the workers for the interpreter lock (the lateness less
the run-queue wait read from ``/proc/thread-self/schedstat`` was 12-17 ms); with as many
threads as the work can use, less waits. Before the workers started early, the first burst
alone kept the loop 28-40 ms (8 thread starts, each waiting for a CPU and the GIL).

Cancellation: a call that has not started on a worker yet never runs. A call that has started
(a transaction under way) cannot be stopped half-way from outside, so it runs to its end (the
sync driver commits or rolls back the whole batch) and the ``CancelledError`` is raised once it
has: a cancelled ``store_many`` leaves all of its batch or none, and when a cancelled ``await``
returns, nothing more happens behind the caller's back.

Life cycle: ``aclose()`` (or ``async with``) stops the workers after the calls under way, fails
the queued ones with ``BackendUnavailableError`` and closes the sync driver, which the manager
forgets; ``MemoryDriverManager.reset_cache()`` closes every async driver along with its sync one.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from app.core.memory.base import BaseMemoryDriver, Progress
from app.core.memory.errors import BackendUnavailableError
from app.core.memory.manager import MemoryDriverManager
from app.core.memory.records import (
    HealthReport,
    Knowledge,
    KnowledgeDocument,
    Memory,
    MemoryInput,
    MemoryPage,
    User,
)
from app.core.memory.validation import (
    DEFAULT_NAMESPACE,
    check_bool,
    check_by_id,
    check_query,
    check_top_k,
    prepare_filters,
    prepare_recall_time,
    prepare_store,
    prepare_store_many,
)
from app.core.memory.worker_pool import WorkerPool

if TYPE_CHECKING:
    from app.core.memory.embeddings import Embedder
    from app.core.memory.portable import PortableRecord
    from app.core.memory.reembed import ReembedReport

T = TypeVar("T")


class AsyncMemoryDriver:
    """Every contract verb as a coroutine over one sync driver (see the module docstring).

    ``max_workers`` bounds how many calls run at once (default ``default_workers``; for
    ``pgvector`` never more than ``MEMORY_PG_POOL_MAX_SIZE``, so a worker never waits for a
    pooled connection); further calls queue. ``aclose()`` (or leaving ``async with``) stops the
    workers and closes the sync driver.
    """

    def __init__(self, driver: BaseMemoryDriver, *, max_workers: int | None = None) -> None:
        self.driver = driver
        self.name = driver.name
        self.max_workers = max_workers or default_workers(driver.name)
        self._executor = WorkerPool(self.max_workers, f"memory-{driver.name}")
        self._closed = False
        self._close_lock = threading.Lock()

    # -- running a sync verb off the loop --------------------------------------------------------

    async def _run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise BackendUnavailableError(f"this async {self.name} driver is closed")
        future: Future[T] = self._executor.submit(functools.partial(function, *args, **kwargs))
        waiter = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and self._closed and task is not None \
                    and not task.cancelling():
                # Dropped from the queue by close(), not cancelled by the caller.
                raise BackendUnavailableError(
                    f"this async {self.name} driver was closed before the call ran") from None
            # Not started: it never will. Started: let it finish so the batch is whole (or
            # rolled back as a whole) before the cancellation reaches the caller.
            if not future.cancel():
                await asyncio.wait([waiter])
            raise

    # -- the six verbs of the original design ---------------------------------------------------

    async def recall(
        self,
        user_id: str,
        conversation_id: str | None = None,
        query: str | None = None,
        top_k: int = 10,
        use_vector: bool = True,
        exclude_tags: list[str] | None = None,
        *,
        agent_id: str | None = None,
        namespace: str | None = None,
        tags: list[str] | None = None,
        min_importance: float | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        reference_time: datetime | None = None,
        context: int = 0,
    ) -> list[Memory]:
        """``BaseMemoryDriver.recall`` off the loop."""
        prepare_filters(user_id, agent_id=agent_id, conversation_id=conversation_id,
                        namespace=namespace, tags=tags, exclude_tags=exclude_tags,
                        min_importance=min_importance)
        prepare_recall_time(start=start, end=end, reference_time=reference_time,
                            context=context, now=datetime.now(UTC))
        check_top_k(top_k)
        check_bool(use_vector, "use_vector")
        check_query(query)
        return await self._run(
            self.driver.recall, user_id, conversation_id, query, top_k, use_vector,
            exclude_tags, agent_id=agent_id, namespace=namespace, tags=tags,
            min_importance=min_importance, start=start, end=end,
            reference_time=reference_time, context=context,
        )

    async def recall_global_knowledge(
        self, query: str, top_k: int = 5, category: str | None = None
    ) -> list[Knowledge]:
        """``BaseMemoryDriver.recall_global_knowledge`` off the loop."""
        return await self._run(self.driver.recall_global_knowledge, query, top_k, category)

    async def store(
        self,
        user_id: str,
        content: str,
        conversation_id: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        agent_id: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        key: str | None = None,
        importance: float = 0.5,
        ttl: float | timedelta | None = None,
        expires_at: datetime | None = None,
        occurred_at: datetime | None = None,
    ) -> Memory:
        """``BaseMemoryDriver.store`` off the loop."""
        prepare_store(user_id, content, conversation_id, tags, metadata, agent_id=agent_id,
                      namespace=namespace, key=key, importance=importance, ttl=ttl,
                      expires_at=expires_at, occurred_at=occurred_at, now=datetime.now(UTC))
        return await self._run(
            self.driver.store, user_id, content, conversation_id, tags, metadata,
            agent_id=agent_id, namespace=namespace, key=key, importance=importance, ttl=ttl,
            expires_at=expires_at, occurred_at=occurred_at,
        )

    async def store_global_knowledge(
        self,
        content: str,
        category: str,
        title: str | None = None,
        doc_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KnowledgeDocument:
        """``BaseMemoryDriver.store_global_knowledge`` off the loop."""
        return await self._run(self.driver.store_global_knowledge, content, category, title,
                               doc_id, metadata)

    async def delete(self, memory_id: str, user_id: str | None = None) -> bool:
        """``BaseMemoryDriver.delete`` off the loop."""
        check_by_id(memory_id, user_id)
        return await self._run(self.driver.delete, memory_id, user_id)

    async def health_check(self) -> HealthReport:
        """``BaseMemoryDriver.health_check`` off the loop."""
        return await self._run(self.driver.health_check)

    # -- added verbs -------------------------------------------------------------------------

    async def get(
        self, memory_id: str, user_id: str | None = None, *, include_deleted: bool = False
    ) -> Memory | None:
        """``BaseMemoryDriver.get`` off the loop."""
        check_by_id(memory_id, user_id)
        return await self._run(self.driver.get, memory_id, user_id,
                               include_deleted=include_deleted)

    async def update(
        self,
        memory_id: str,
        user_id: str | None = None,
        *,
        content: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        importance: float | None = None,
        ttl: float | timedelta | None = None,
        expires_at: datetime | None = None,
        clear_expiry: bool = False,
        occurred_at: datetime | None = None,
    ) -> Memory | None:
        """``BaseMemoryDriver.update`` off the loop."""
        return await self._run(
            self.driver.update, memory_id, user_id, content=content, tags=tags,
            metadata=metadata, importance=importance, ttl=ttl, expires_at=expires_at,
            clear_expiry=clear_expiry, occurred_at=occurred_at,
        )

    async def store_many(self, items: Iterable[MemoryInput]) -> list[Memory]:
        """``BaseMemoryDriver.store_many`` off the loop; all or nothing, also when cancelled.

        ``items`` is read into a list here (a generator is consumed once, on the loop); a batch
        of at most ``PRECHECK_MAX_ITEMS`` is checked here too, larger ones on the worker only.
        """
        if not isinstance(items, (str, bytes, Mapping)) and isinstance(items, Iterable):
            items = list(items)
            if len(items) <= PRECHECK_MAX_ITEMS:
                prepare_store_many(items, now=datetime.now(UTC))
        return await self._run(self.driver.store_many, items)

    async def list_memories(
        self,
        user_id: str,
        *,
        agent_id: str | None = None,
        conversation_id: str | None = None,
        namespace: str | None = None,
        tags: list[str] | None = None,
        include_deleted: bool = False,
        limit: int = 100,
        cursor: str | None = None,
    ) -> MemoryPage:
        """``BaseMemoryDriver.list_memories`` off the loop."""
        return await self._run(
            self.driver.list_memories, user_id, agent_id=agent_id,
            conversation_id=conversation_id, namespace=namespace, tags=tags,
            include_deleted=include_deleted, limit=limit, cursor=cursor,
        )

    async def restore(self, memory_id: str, user_id: str | None = None) -> bool:
        """``BaseMemoryDriver.restore`` off the loop."""
        check_by_id(memory_id, user_id)
        return await self._run(self.driver.restore, memory_id, user_id)

    async def forget_user(self, user_id: str) -> int:
        """``BaseMemoryDriver.forget_user`` off the loop."""
        return await self._run(self.driver.forget_user, user_id)

    async def purge(self, *, retention: timedelta | None = None) -> int:
        """``BaseMemoryDriver.purge`` off the loop."""
        return await self._run(self.driver.purge, retention=retention)

    async def delete_knowledge(self, doc_id: str) -> bool:
        """``BaseMemoryDriver.delete_knowledge`` off the loop."""
        return await self._run(self.driver.delete_knowledge, doc_id)

    async def stats(self, user_id: str | None = None) -> dict[str, Any]:
        """``BaseMemoryDriver.stats`` off the loop."""
        return await self._run(self.driver.stats, user_id)

    async def create_user(
        self,
        user_id: str | None = None,
        *,
        display_name: str | None = None,
        profile: dict[str, Any] | None = None,
    ) -> User:
        """``BaseMemoryDriver.create_user`` off the loop."""
        return await self._run(self.driver.create_user, user_id, display_name=display_name,
                               profile=profile)

    async def get_user(self, user_id: str) -> User | None:
        """``BaseMemoryDriver.get_user`` off the loop."""
        return await self._run(self.driver.get_user, user_id)

    async def get_profile(self, user_id: str) -> dict[str, Any]:
        """``BaseMemoryDriver.get_profile`` off the loop."""
        return await self._run(self.driver.get_profile, user_id)

    async def set_profile(
        self, user_id: str, profile: dict[str, Any], *, merge: bool = False
    ) -> dict[str, Any]:
        """``BaseMemoryDriver.set_profile`` off the loop."""
        return await self._run(self.driver.set_profile, user_id, profile, merge=merge)

    # -- optional: moving records ---------------------------------------------------------------

    async def export_records(self, *, user_id: str | None = None,
                             with_embeddings: bool = False) -> AsyncIterator[PortableRecord]:
        """``BaseMemoryDriver.export_records`` as an async iterator.

        The sync iterator runs on one worker thread for its whole life (a snapshot is a
        transaction on one connection) and hands records over in batches; leaving the ``async
        for`` early closes it.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=4)
        stop = threading.Event()

        def hand_over(kind: str, value: Any) -> None:
            # Waits for room in the queue, but gives up once the consumer has left (or its
            # loop has gone), so that the worker is never stuck.
            try:
                put = asyncio.run_coroutine_threadsafe(queue.put((kind, value)), loop)
            except RuntimeError:  # the loop is closed
                return
            while not stop.is_set():
                try:
                    put.result(timeout=0.5)
                    return
                except TimeoutError:
                    if loop.is_closed():
                        break
            put.cancel()

        def produce() -> None:
            try:
                records = self.driver.export_records(user_id=user_id,
                                                     with_embeddings=with_embeddings)
                try:
                    batch: list[PortableRecord] = []
                    for record in records:
                        if stop.is_set():
                            return
                        batch.append(record)
                        if len(batch) >= _EXPORT_BATCH:
                            hand_over("records", batch)
                            batch = []
                    hand_over("records", batch)
                finally:
                    close = getattr(records, "close", None)
                    if close is not None:
                        close()
                hand_over("end", None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                hand_over("error", exc)

        if self._closed:
            raise BackendUnavailableError(f"this async {self.name} driver is closed")
        producer = asyncio.wrap_future(self._executor.submit(produce))
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    break
                for record in value:
                    yield record
        finally:
            stop.set()
            while not producer.done():  # unblock a producer waiting for room, then let it end
                while not queue.empty():
                    queue.get_nowait()
                await asyncio.wait([producer], timeout=0.05)

    async def import_records(self, records: Sequence[PortableRecord], *,
                             vectors_from: dict[str, Any] | None = None) -> list[tuple[int, str]]:
        """``BaseMemoryDriver.import_records`` off the loop (one transaction)."""
        return await self._run(self.driver.import_records, records, vectors_from=vectors_from)

    async def reembed(self, embedder: Embedder | None = None, *, batch_size: int = 64,
                      progress: Progress | None = None) -> ReembedReport:
        """``BaseMemoryDriver.reembed`` off the loop; ``progress`` is called on the loop."""
        loop = asyncio.get_running_loop()
        on_loop: Progress | None = None
        if progress is not None:
            report = progress

            def on_loop(done: int, total: int) -> None:
                loop.call_soon_threadsafe(report, done, total)

        return await self._run(self.driver.reembed, embedder, batch_size=batch_size,
                               progress=on_loop)

    # -- life cycle -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the workers (after the calls under way) and close the sync driver; idempotent.

        A cached driver is also dropped from the cache (and from ``MemoryDriverManager``'s), so
        the next ``get_async_memory_driver(name)`` opens a fresh one.
        """
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        """``aclose`` for sync code (``MemoryDriverManager.reset_cache`` calls it); blocks
        until the calls under way have finished."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _forget(self)
        self._executor.shutdown(wait=True, cancel_futures=True)
        MemoryDriverManager.discard(self.driver)
        self.driver.close()

    async def __aenter__(self) -> AsyncMemoryDriver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncMemoryDriver({self.name!r}, max_workers={self.max_workers})"


_EXPORT_BATCH = 256
#: Largest store_many batch checked on the loop before dispatch: checking costs ~60 us an item
#: here (measured), so 64 items stay within a few milliseconds of the loop's time.
PRECHECK_MAX_ITEMS = 64


#: Worker threads per CPU core when ``MEMORY_ASYNC_WORKERS`` is not set (``bench.aio``, 2 cores,
#: loop lag max / concurrent over sequential recalls). SQLite: its recall is Python and numpy
#: under the interpreter lock, so threads beyond the cores only queue for the lock, and the loop
#: behind them: 8 threads 21 ms / 1.42, 2 threads 7 ms / 1.21. PostgreSQL: a thread waits for the
#: server about half the time: 8 threads 20 ms / 0.52, 4 threads 12 ms / 0.42, 2 threads
#: 9 ms / 0.50. Any other driver (AutoMem: HTTP, threads mostly waiting) gets ``OTHER_WORKERS``.
WORKERS_PER_CORE = {"sqlite": 1, "pgvector": 2}
OTHER_WORKERS = 8


def default_workers(driver_name: str) -> int:
    """``MEMORY_ASYNC_WORKERS``, or when it is not set (0) ``WORKERS_PER_CORE`` of the driver
    times the cores (``OTHER_WORKERS`` for other drivers); for ``pgvector`` at most its
    connection pool's size."""
    from config.settings import get_settings

    settings = get_settings()
    workers = settings.async_workers
    if not workers:
        per_core = WORKERS_PER_CORE.get(driver_name)
        workers = OTHER_WORKERS if per_core is None else per_core * (os.cpu_count() or 1)
    if driver_name == "pgvector":
        workers = min(workers, settings.pg_pool_max_size)
    return max(1, workers)


_lock = threading.Lock()
#: id(sync driver) -> its async wrapper; the manager keeps one sync driver per name, so this is
#: one async driver per name too.
_cache: dict[int, AsyncMemoryDriver] = {}


def get_async_memory_driver(name: str | None = None) -> AsyncMemoryDriver:
    """The async driver for ``name``, else the default (as ``get_memory_driver``), created on
    first use over the cached sync driver, then cached; thread-safe.

    ``MemoryDriverManager.reset_cache()`` closes and forgets every cached async driver too.
    """
    _install_process_embedder()
    driver = MemoryDriverManager.driver(name)
    with _lock:
        cached = _cache.get(id(driver))
        if cached is None or cached.driver is not driver or cached._closed:
            cached = _cache[id(driver)] = AsyncMemoryDriver(driver)
        return cached


_embedder_installed = False


def _install_process_embedder() -> None:
    """Make the process-wide embedder a ``ProcessEmbedder`` once (not with
    ``MEMORY_ASYNC_EMBED_IN_PROCESS``, nor when a model is loaded in this process already)."""
    global _embedder_installed
    from config.settings import get_settings

    settings = get_settings()
    if _embedder_installed or settings.async_embed_in_process:
        return
    from app.core.memory.embed_process import ProcessEmbedder
    from app.core.memory.embeddings import install_default_embedder, resolve_backend

    with _lock:
        if not _embedder_installed:
            backend = resolve_backend(settings.embedding_model, settings.embedding_backend)
            install_default_embedder(ProcessEmbedder(
                settings.embedding_model, backend=backend,
                batch_size=settings.embedding_batch_size,
                query_cache_size=settings.query_cache_size), backend=backend)
            _embedder_installed = True


def _forget(instance: AsyncMemoryDriver) -> None:
    with _lock:
        if _cache.get(id(instance.driver)) is instance:
            del _cache[id(instance.driver)]


def _close_wrappers_of(driver: BaseMemoryDriver) -> None:
    """``MemoryDriverManager``'s hook: a sync driver it closes takes its async wrapper along."""
    with _lock:
        wrappers = [cached for cached in _cache.values() if cached.driver is driver]
    for wrapper in wrappers:
        wrapper.close()


MemoryDriverManager.add_close_hook(_close_wrappers_of)
