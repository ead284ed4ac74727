"""The async API beyond the contract (which ``tests/contract/test_async_contract.py`` runs through
it): the signatures, the cache and its life cycle, bounded workers, cancellation mid-batch on
SQLite and PostgreSQL, the export iterator, and the model kept out of the event loop's process."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.memory import (
    AsyncMemoryDriver,
    BackendUnavailableError,
    BaseMemoryDriver,
    InvalidInputError,
    MemoryDriverManager,
    get_async_memory_driver,
    get_memory_driver,
)
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from app.core.memory.records import MemoryInput
from config.settings import reset_settings
from tests.conftest import PROJECT_ROOT

SYNC_ONLY = {"close", "__enter__", "__exit__"}


def contract_verbs() -> list[str]:
    return [name for name, member in inspect.getmembers(BaseMemoryDriver, inspect.isfunction)
            if not name.startswith("_") and name not in SYNC_ONLY]


#: Threads alive when the running test started: other suites' servers may run for the whole
#: session with async drivers (and worker threads) of their own, so the checks below count only
#: the threads a test started.
_earlier_threads: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def note_earlier_threads() -> None:
    _earlier_threads.clear()
    _earlier_threads.update(threading.enumerate())


def worker_threads(prefix: str = "memory-") -> list[threading.Thread]:
    return [thread for thread in threading.enumerate()
            if thread.name.startswith(prefix) and thread not in _earlier_threads]


@pytest.fixture
def in_process_model(monkeypatch: pytest.MonkeyPatch,
                     embedder: SentenceTransformerEmbedder) -> SentenceTransformerEmbedder:
    """The test run's loaded model stays the process-wide one (no embedding child here)."""
    monkeypatch.setenv("MEMORY_ASYNC_EMBED_IN_PROCESS", "true")
    reset_settings()
    embedder.embed_query("loaded")
    return embedder


# -- the interface ------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", contract_verbs())
def test_every_verb_is_a_coroutine_with_the_sync_signature(verb: str) -> None:
    sync, async_ = getattr(BaseMemoryDriver, verb), getattr(AsyncMemoryDriver, verb)
    assert inspect.iscoroutinefunction(async_) or inspect.isasyncgenfunction(async_)
    sync_signature, async_signature = inspect.signature(sync), inspect.signature(async_)
    assert list(async_signature.parameters.values()) == list(sync_signature.parameters.values())
    if verb != "export_records":  # Iterator[...] there, AsyncIterator[...] here
        assert async_signature.return_annotation == sync_signature.return_annotation


def test_is_exported_from_the_package() -> None:
    import app.core.memory as package

    assert {"AsyncMemoryDriver", "get_async_memory_driver"} <= set(package.__all__)


# -- cache and life cycle -----------------------------------------------------------------------

def test_cached_per_name_and_released_by_reset_cache(in_process_model: Any,
                                                    sqlite_path: Path) -> None:
    first = get_async_memory_driver()
    assert get_async_memory_driver("sqlite") is first
    assert first.driver is get_memory_driver("sqlite")

    async def use() -> None:
        await asyncio.gather(*(first.recall("alice") for _ in range(20)))

    asyncio.run(use())
    assert worker_threads()
    MemoryDriverManager.reset_cache()
    assert worker_threads() == []  # the executor went with the sync driver: no leaked threads
    with pytest.raises(BackendUnavailableError, match="closed"):
        asyncio.run(first.recall("alice"))
    second = get_async_memory_driver()
    assert second is not first
    assert asyncio.run(second.recall("alice")) == []


def test_the_cached_driver_serves_one_event_loop_after_another(in_process_model: Any,
                                                               sqlite_path: Path) -> None:
    memory = get_async_memory_driver()
    stored = asyncio.run(memory.store("alice", "Works the night shift"))
    assert asyncio.run(memory.get(stored["id"], "alice")) == stored


def test_async_with_closes_and_the_next_call_opens_a_fresh_driver(in_process_model: Any,
                                                                  sqlite_path: Path) -> None:
    async def scenario() -> tuple[AsyncMemoryDriver, list[Any]]:
        async with get_async_memory_driver() as memory:
            await memory.store("alice", "Likes green tea")
        with pytest.raises(BackendUnavailableError, match="closed"):
            await memory.recall("alice")
        await memory.aclose()  # idempotent
        again = get_async_memory_driver()
        return again, await again.recall("alice")

    again, recalled = asyncio.run(scenario())
    assert [memory["content"] for memory in recalled] == ["Likes green tea"]
    assert again.driver is get_memory_driver()  # the sync cache forgot the closed one too
    assert worker_threads("memory-") != []


def test_workers_are_bounded_by_settings(monkeypatch: pytest.MonkeyPatch,
                                         in_process_model: Any, sqlite_path: Path) -> None:
    monkeypatch.setenv("MEMORY_ASYNC_WORKERS", "2")
    monkeypatch.setenv("MEMORY_PG_POOL_MAX_SIZE", "1")
    reset_settings()
    memory = get_async_memory_driver()
    # Started with the driver, not by the first burst of calls (which would block the loop).
    assert len(worker_threads("memory-sqlite")) == 2

    async def many() -> None:
        await memory.store_many([{"user_id": "alice", "content": f"note {i}"} for i in range(20)])
        await asyncio.gather(*(memory.recall("alice", query=f"note {i}") for i in range(40)))

    asyncio.run(many())
    assert memory.max_workers == 2
    assert len(worker_threads("memory-sqlite")) == 2
    from app.core.memory.aio import default_workers

    assert default_workers("pgvector") == 1  # never more workers than pooled connections


def test_unset_workers_follow_the_cores_per_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite's recall holds the interpreter lock: more threads than cores only queue for it (and
    # the loop behind them); pgvector's threads wait for the server half the time.
    from app.core.memory import aio

    monkeypatch.delenv("MEMORY_ASYNC_WORKERS", raising=False)
    monkeypatch.setenv("MEMORY_PG_POOL_MAX_SIZE", "10")
    monkeypatch.setattr(aio.os, "cpu_count", lambda: 3)
    reset_settings()
    assert (aio.default_workers("sqlite"), aio.default_workers("pgvector"),
            aio.default_workers("automem")) == (3, 6, aio.OTHER_WORKERS)
    monkeypatch.setenv("MEMORY_PG_POOL_MAX_SIZE", "4")
    reset_settings()
    assert aio.default_workers("pgvector") == 4  # still never more than pooled connections
    monkeypatch.setenv("MEMORY_ASYNC_WORKERS", "5")
    reset_settings()
    assert aio.default_workers("sqlite") == 5


def test_bad_input_fails_fast_on_the_loop_without_waiting_for_a_worker(
        sqlite_path: Path, embedder: SentenceTransformerEmbedder) -> None:
    memory = AsyncMemoryDriver(SqliteDriver(path=sqlite_path, embedder=embedder), max_workers=1)
    bad_calls = [
        (lambda: memory.recall("alice", top_k=0), "top_k"),
        (lambda: memory.store("alice", "x", importance=2), "importance"),
        (lambda: memory.store_many([{"user_id": "alice", "content": "fine"},
                                    {"user_id": "alice"}]), r"items\[1\]"),
        (lambda: memory.get("a b"), "memory_id"),
    ]

    async def scenario() -> None:
        busy = asyncio.create_task(memory.store_many(
            [{"user_id": "busy", "content": f"note {i}"} for i in range(200)]))
        await asyncio.sleep(0.01)
        for call, argument in bad_calls:
            with pytest.raises(InvalidInputError, match=argument):
                await call()
            assert not busy.done()  # refused while the only worker was still busy
        await busy

    try:
        asyncio.run(scenario())
        assert asyncio.run(memory.stats("alice"))["memories"]["visible"] == 0
    finally:
        memory.close()


# -- cancellation: all or nothing, and nothing more after the cancel is delivered ---------------

def cancel_mid_batch(make_driver: Callable[[], BaseMemoryDriver]) -> list[tuple[float, int]]:
    """Cancel a 100-memory store_many at points spread over its run time; for each, how many
    of its memories exist when the cancellation reaches the caller, checked again later. The
    first (share -1) is cancelled while waiting for the only worker, busy with another batch."""
    items = 100
    outcomes: list[tuple[float, int]] = []

    def batch(user: str) -> list[MemoryInput]:
        return [{"user_id": user, "content": f"item {i} of {user}"} for i in range(items)]

    observer = make_driver()  # counts on a connection of its own, not behind the worker

    def visible(user: str) -> int:
        return int(observer.stats(user)["memories"]["visible"])

    async def scenario() -> None:
        memory = AsyncMemoryDriver(make_driver(), max_workers=1)
        try:
            await memory.store_many(batch("warm-up"))  # the first batch also opens things
            began = time.perf_counter()
            await memory.store_many(batch("timing"))
            duration = time.perf_counter() - began
            busy = asyncio.create_task(memory.store_many(batch("busy") * 3))
            queued = asyncio.create_task(memory.store_many(batch("queued")))
            await asyncio.sleep(0.01)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            await busy
            outcomes.append((-1, visible("queued")))
            for step, share in enumerate((0.0, 0.2, 0.4, 0.6, 0.8)):
                user = f"cancelled-{step}"
                task = asyncio.create_task(memory.store_many(batch(user)))
                await asyncio.sleep(share * duration)
                task.cancel()
                try:
                    await task
                    continue  # it had finished before the cancel: not a case of this test
                except asyncio.CancelledError:
                    pass
                at_cancel = visible(user)
                await asyncio.sleep(0.5)
                assert visible(user) == at_cancel, (
                    f"the batch cancelled at {share:.0%} kept writing after the cancellation")
                outcomes.append((share, at_cancel))
        finally:
            await memory.aclose()

    try:
        asyncio.run(scenario())
    finally:
        observer.close()
    return outcomes


def test_a_cancelled_store_many_leaves_all_or_nothing_on_sqlite(
        sqlite_path: Path, embedder: SentenceTransformerEmbedder) -> None:
    outcomes = cancel_mid_batch(lambda: SqliteDriver(path=sqlite_path, embedder=embedder))
    assert all(count in (0, 100) for _, count in outcomes), outcomes
    assert outcomes[0] == (-1, 0)  # cancelled before a worker took it: it never ran
    assert any(count == 100 for _, count in outcomes[1:]), outcomes  # cancelled mid-way


def test_a_cancelled_store_many_leaves_all_or_nothing_on_pgvector(
        empty_pg: str, embedder: SentenceTransformerEmbedder) -> None:
    outcomes = cancel_mid_batch(lambda: PgvectorDriver(url=empty_pg, embedder=embedder,
                                                       pool_max_size=2))
    assert all(count in (0, 100) for _, count in outcomes), outcomes
    assert outcomes[0] == (-1, 0)
    assert any(count == 100 for _, count in outcomes[1:]), outcomes


# -- the optional verbs -------------------------------------------------------------------------

@pytest.fixture
def sqlite_async(sqlite_path: Path,
                 embedder: SentenceTransformerEmbedder) -> Iterator[AsyncMemoryDriver]:
    memory = AsyncMemoryDriver(SqliteDriver(path=sqlite_path, embedder=embedder), max_workers=2)
    yield memory
    memory.close()


def test_export_records_is_an_async_iterator_of_the_sync_export(
        sqlite_async: AsyncMemoryDriver) -> None:
    sqlite_async.driver.store_many([{"user_id": "alice", "content": f"note {i}"}
                                    for i in range(600)])

    async def export(limit: int | None) -> list[Any]:
        records = []
        async for record in sqlite_async.export_records(user_id="alice"):
            records.append(record)
            if limit is not None and len(records) == limit:
                break
        return records

    expected = list(sqlite_async.driver.export_records(user_id="alice"))
    assert asyncio.run(export(None)) == expected
    assert asyncio.run(export(3)) == expected[:3]  # leaving early ends the producer ...
    assert asyncio.run(sqlite_async.stats("alice"))["memories"]["visible"] == 600  # ... freely


def test_reembed_reports_progress_on_the_event_loop(sqlite_async: AsyncMemoryDriver,
                                                    embedder: SentenceTransformerEmbedder) -> None:
    sqlite_async.driver.store_many([{"user_id": "alice", "content": f"note {i}"}
                                    for i in range(10)])
    seen: list[tuple[int, int, bool]] = []

    async def run() -> Any:
        loop_thread = threading.get_ident()
        report = await sqlite_async.reembed(
            embedder, batch_size=4,
            progress=lambda done, total: seen.append(
                (done, total, threading.get_ident() == loop_thread)))
        await asyncio.sleep(0)  # let the last progress callback run
        return report

    asyncio.run(run())
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(on_loop for _, _, on_loop in seen)


# -- the model stays out of the event loop's process --------------------------------------------

def test_the_async_api_embeds_in_a_child_process_restarted_after_a_crash(tmp_path: Path,
                                                 embedder: SentenceTransformerEmbedder) -> None:
    from tests.conftest import migrate_sqlite

    path = migrate_sqlite(tmp_path / "child.sqlite3")
    program = textwrap.dedent("""
        import asyncio, json, os, signal, sys, threading, time
        from app.core.memory import BackendUnavailableError, get_async_memory_driver

        def kill_the_child_while_it_loads(embedder):
            failures = []

            def embed():
                try:
                    embedder.embed_documents(["killed before it answers"])
                except BackendUnavailableError as exc:
                    failures.append(str(exc))

            caller = threading.Thread(target=embed)
            caller.start()
            while embedder.child_pid is None:
                time.sleep(0.01)
            os.kill(embedder.child_pid, signal.SIGKILL)
            caller.join()
            return failures

        async def main():
            memory = get_async_memory_driver()
            failures = kill_the_child_while_it_loads(memory.driver.embedder)
            assert failures and "ended unexpectedly" in failures[0], failures
            # the next call starts a new child
            await memory.store_many([{"user_id": "alice", "content": text} for text in
                                     ["Is allergic to peanuts", "Prefers dark mode"]])
            hits = await asyncio.gather(*(memory.recall("alice", query=query, top_k=1)
                                          for query in ["food allergy", "ui theme"] * 10))
            vector = memory.driver.embedder.embed_query("food allergy")
            niceness = (os.getpriority(os.PRIO_PROCESS, memory.driver.embedder.child_pid)
                        - os.getpriority(os.PRIO_PROCESS, 0))
            await memory.aclose()
            return [hit[0]["content"] for hit in hits[:2]], vector.tolist(), niceness

        best, vector, niceness = asyncio.run(main())
        print(json.dumps({"torch": "torch" in sys.modules, "best": best, "vector": vector,
                          "niceness": niceness}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=300, env={**_environment(), "MEMORY_SQLITE_PATH": str(path)},
    )
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] is False  # the model never loaded in the event loop's process
    from app.core.memory.embed_process import CHILD_NICENESS

    # The encoder yields the CPU to the event loop's process (19 is the lowest priority).
    assert result["niceness"] == min(CHILD_NICENESS, 19 - os.getpriority(os.PRIO_PROCESS, 0))
    assert result["best"] == ["Is allergic to peanuts", "Prefers dark mode"]
    np.testing.assert_allclose(result["vector"], embedder.embed_query("food allergy"),
                               atol=1e-5)


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment.pop("MEMORY_ASYNC_EMBED_IN_PROCESS", None)
    environment["MEMORY_DRIVER"] = "sqlite"
    return environment


def test_calls_queued_when_the_driver_closes_raise_backend_unavailable(
        sqlite_path: Path, embedder: SentenceTransformerEmbedder) -> None:
    memory = AsyncMemoryDriver(SqliteDriver(path=sqlite_path, embedder=embedder), max_workers=1)

    async def scenario() -> None:
        busy = asyncio.create_task(memory.store_many(
            [{"user_id": "busy", "content": f"note {i}"} for i in range(100)]))
        queued = asyncio.create_task(memory.recall("alice"))
        await asyncio.sleep(0.01)
        await memory.aclose()  # waits for the call under way, drops the queued one
        assert len(await busy) == 100
        with pytest.raises(BackendUnavailableError, match="closed"):
            await queued

    asyncio.run(scenario())
