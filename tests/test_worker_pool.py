"""``WorkerPool``: the worker idle last takes the next call; otherwise an executor like any."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest

from app.core.memory.worker_pool import WorkerPool


@pytest.fixture
def pool():
    pool = WorkerPool(3, "test-pool")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def test_a_caller_that_waits_for_each_call_keeps_one_thread(pool: WorkerPool):
    """The reason the pool exists (ThreadPoolExecutor hands such calls to its idle threads in
    turn, so a SQLite connection per thread started each call with an emptied cache)."""
    threads = {pool.submit(threading.get_ident).result() for _ in range(50)}
    assert len(threads) == 1


def test_concurrent_calls_get_every_worker(pool: WorkerPool):
    together = threading.Barrier(3, timeout=10)  # broken unless three calls run at once
    names = [pool.submit(lambda: (together.wait(), threading.current_thread().name)[1])
             for _ in range(3)]
    assert sorted(future.result(timeout=10) for future in names) == [
        "test-pool_0", "test-pool_1", "test-pool_2"]


def test_calls_beyond_the_workers_queue_and_run_in_the_order_given():
    pool = WorkerPool(1, "test-pool")
    gate = threading.Event()
    busy = pool.submit(gate.wait)
    ran: list[int] = []
    queued = [pool.submit(ran.append, number) for number in range(20)]
    time.sleep(0.05)
    assert ran == []  # the one worker is busy
    gate.set()
    for future in [busy, *queued]:
        future.result(timeout=10)
    assert ran == list(range(20))
    pool.shutdown()


def test_a_queued_call_cancelled_never_runs(pool: WorkerPool):
    gate = threading.Event()
    busy = [pool.submit(gate.wait) for _ in range(3)]
    ran: list[str] = []
    queued = pool.submit(ran.append, "should not run")
    assert queued.cancel()
    gate.set()
    for future in busy:
        future.result(timeout=10)
    pool.submit(ran.append, "after").result(timeout=10)
    assert ran == ["after"]
    with pytest.raises(CancelledError):
        queued.result()


def test_an_exception_reaches_the_caller_and_the_worker_serves_on(pool: WorkerPool):
    def fail() -> None:
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        pool.submit(fail).result(timeout=10)
    assert pool.submit(lambda: 41 + 1).result(timeout=10) == 42


def test_shutdown_finishes_the_calls_under_way_and_cancels_the_queued_ones():
    pool = WorkerPool(1, "test-pool")
    started, gate = threading.Event(), threading.Event()

    def running() -> str:
        started.set()
        gate.wait(10)
        return "finished"

    under_way = pool.submit(running)
    queued = pool.submit(lambda: "ran")
    assert started.wait(10)
    stopper = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True})
    stopper.start()
    time.sleep(0.05)
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert under_way.result() == "finished"
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None)
