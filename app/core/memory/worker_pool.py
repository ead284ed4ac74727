"""``WorkerPool``: a fixed set of threads that gives each call to the worker that was idle last.

Why not ``ThreadPoolExecutor``: its idle threads all wait on one queue, so consecutive calls of
one caller (an agent awaiting each recall before the next) go to the workers in turn. For the
SQLite driver each worker thread has its own connection, and SQLite empties a connection's
whole page cache once another connection has written (a recall writes access counts), so in
turn every recall started cold; the CPU's caches of the last call's thread were cold too.
Measured over HTTP (``bench.service``, 10k memories, one caller): the service added 2.1-2.6 ms
to an in-process recall while two workers took turns, 1.2-1.5 ms with a single worker, and
1.3 ms with this pool of two. Here the worker that finished last takes the next call (a stack
of idle workers), so one caller keeps one thread and its connection, while concurrent callers
still get every worker (4 callers: 0.89x the in-process calls/s, as before).

The pool's threads start with it (a burst of first calls never waits for thread starts on the
event loop, see ``aio.py``). Calls queue in the order submitted once every worker is busy. A
call still queued can be cancelled (``Future.cancel``) and then never runs; ``shutdown`` lets
the calls under way finish, and with ``cancel_futures`` cancels the queued ones.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Future[Any], Callable[[], Any]]


class _Worker:
    """One thread, and the call handed to it while it was idle (``None``: none yet)."""

    def __init__(self) -> None:
        self.call: _Call | None = None
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None


class WorkerPool(Executor):
    """``workers`` threads named ``name_prefix_N``; see the module docstring."""

    def __init__(self, workers: int, name_prefix: str) -> None:
        if workers < 1:
            raise ValueError("a worker pool needs at least one worker")
        self._lock = threading.Lock()
        self._queued: deque[_Call] = deque()
        self._idle: list[_Worker] = []  # a stack: the last to become idle is on top
        self._closed = False
        self._workers = [_Worker() for _ in range(workers)]
        for number, worker in enumerate(self._workers):
            worker.thread = threading.Thread(target=self._serve, args=(worker,), daemon=True,
                                             name=f"{name_prefix}_{number}")
            worker.thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        call: _Call = (future, lambda: fn(*args, **kwargs))
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a worker pool that was shut down")
            if not self._idle:
                self._queued.append(call)
                return future
            worker = self._idle.pop()
        with worker.wake:
            worker.call = call
            worker.wake.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            cancelled = [future for future, _ in self._queued] if cancel_futures else []
            if cancel_futures:
                self._queued.clear()
        for worker in self._workers:
            with worker.wake:
                if cancel_futures and worker.call is not None:
                    cancelled.append(worker.call[0])  # handed over, not started yet
                worker.wake.notify()
        for future in cancelled:
            future.cancel()
        if wait:
            for worker in self._workers:
                if worker.thread is not None and worker.thread is not threading.current_thread():
                    worker.thread.join()

    def _serve(self, worker: _Worker) -> None:
        call = self._become_idle(worker) or self._handed(worker)
        while call is not None:
            future, run = call
            if not future.set_running_or_notify_cancel():  # cancelled before it started
                call = self._become_idle(worker) or self._handed(worker)
                continue
            try:
                result = run()
            except BaseException as exc:  # noqa: BLE001 - the caller gets it, as from any pool
                # Idle (or holding the next queued call) before the caller learns the outcome,
                # so that the caller's next call finds this worker on top of the stack.
                call = self._become_idle(worker)
                future.set_exception(exc)
                del exc  # no reference cycle through the traceback
            else:
                call = self._become_idle(worker)
                future.set_result(result)
                del result
            call = call or self._handed(worker)

    def _become_idle(self, worker: _Worker) -> _Call | None:
        """The oldest queued call for ``worker``; if there is none, ``worker`` goes on top of the
        idle stack (``submit`` hands it the next call) and ``None`` is returned."""
        with self._lock:
            if self._queued:
                return self._queued.popleft()
            self._idle.append(worker)
            return None

    def _handed(self, worker: _Worker) -> _Call | None:
        """Wait, idle, for the call ``submit`` hands ``worker``; ``None`` once the pool is shut
        down (a call handed over before that still runs, unless it was cancelled)."""
        with worker.wake:
            while worker.call is None:
                if self._closed:
                    return None
                worker.wake.wait()
            call, worker.call = worker.call, None
        return call
