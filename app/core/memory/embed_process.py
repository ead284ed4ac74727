"""``ProcessEmbedder``: the embedding model in a child process, so it never holds this one's GIL.

Why: importing sentence-transformers and torch (the first embedding) holds the interpreter lock
for stretches of 0.2-0.5 s at a time (C extensions initialising), and a thread cannot change
that: an event loop in the same process stalls for as long (measured in ``bench/aio.py``). In a
child process the import, the load and every encode run beside the loop; this process only
sends texts and receives vectors over a private socket (a few microseconds of its GIL each).

Concurrent callers are batched: while one batch is being encoded, the texts of every caller that
arrives meanwhile are gathered, and the next batch encodes them together (100 concurrent recalls
cost a few encodes, not 100). The child is ``python -m app.core.memory.embed_process`` started on
first use (not ``multiprocessing``, which would import the application's ``__main__`` again); it
ends when this process closes the socket or exits. If it dies, the calls waiting on it raise
``BackendUnavailableError`` and the next call starts a new one. POSIX only (``pass_fds``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from app.core.memory.embeddings import SentenceTransformerEmbedder, build_embedder
from app.core.memory.errors import BackendUnavailableError, MemoryDriverError

#: Most texts one batch gathers from waiting callers (a store_many sends its own texts whole).
MAX_GATHERED_TEXTS = 256


class _Request:
    __slots__ = ("texts", "vectors", "error", "done")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.vectors: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False


class ProcessEmbedder(SentenceTransformerEmbedder):
    """An embedder whose model runs in a child process, on the configured backend (thread-safe).

    It reuses ``SentenceTransformerEmbedder``'s batching and query cache; the child builds the
    real embedder with ``embeddings.build_embedder``.

    Same model, same vectors, same query cache; ``is_loaded`` tells whether the child has the
    model up. ``close()`` ends the child (a later call starts a new one).
    """

    def __init__(self, model_name: str, *, backend: str, batch_size: int = 64,
                 query_cache_size: int = 1_024) -> None:
        super().__init__(model_name, batch_size=batch_size, query_cache_size=query_cache_size)
        #: The resolved backend the child runs (``onnx-int8``, ``onnx`` or ``torch``), shown by
        #: health checks.
        self.backend = backend
        self._dimension: int | None = None
        self._condition = threading.Condition()
        self._pending: list[_Request] = []
        self._busy = False
        self._child: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self._dimension = int(self.embed_documents(["dimension probe"]).shape[1])
        return self._dimension

    @property
    def is_loaded(self) -> bool:
        return self._dimension is not None

    @property
    def child_pid(self) -> int | None:
        """The child process's id while one is running (for operators and tests)."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        request = _Request(list(texts))
        with self._condition:
            self._pending.append(request)
        while True:
            with self._condition:
                while self._busy and not request.done:
                    self._condition.wait()
                if request.done:
                    break
                self._busy = True  # this caller encodes the next batch, for everyone waiting
            self._lead_one_batch()
        if request.error is not None:
            raise request.error
        assert request.vectors is not None
        return request.vectors

    def close(self) -> None:
        """End the child process (idempotent)."""
        with self._condition:
            self._stop_child()

    # -- one batch: gathered from the waiting callers, encoded in the child ----------------------

    def _lead_one_batch(self) -> None:
        with self._condition:
            batch: list[_Request] = []
            gathered = 0
            while self._pending and (not batch or gathered + len(self._pending[0].texts)
                                     <= MAX_GATHERED_TEXTS):
                request = self._pending.pop(0)
                batch.append(request)
                gathered += len(request.texts)
        try:
            vectors = self._encode([text for request in batch for text in request.texts])
            start = 0
            for request in batch:
                request.vectors = vectors[start:start + len(request.texts)]
                start += len(request.texts)
            if self._dimension is None:
                self._dimension = int(vectors.shape[1])
        except BaseException as exc:
            for request in batch:
                request.error = exc
        finally:
            with self._condition:
                for request in batch:
                    request.done = True
                self._busy = False
                self._condition.notify_all()

    def _encode(self, texts: list[str]) -> np.ndarray:
        connection = self._connected()
        try:
            connection.send(texts)
            status, value = connection.recv()
        except (OSError, EOFError) as exc:
            with self._condition:
                self._stop_child()
            raise BackendUnavailableError(
                "the embedding process ended unexpectedly; the next call starts it again"
            ) from exc
        if status == "error":
            raise value
        return np.asarray(value, dtype=np.float32)

    def _connected(self) -> Connection:
        if self._connection is not None and self._child is not None \
                and self._child.poll() is None:
            return self._connection
        with self._condition:
            self._stop_child()
            parent_end, child_end = socket.socketpair()
            try:
                self._child = subprocess.Popen(
                    [sys.executable, "-m", "app.core.memory.embed_process",
                     str(child_end.fileno()), self.model_name, self.backend],
                    pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, env=_child_environment(),
                )
            except OSError as exc:
                parent_end.close()
                raise BackendUnavailableError(
                    f"could not start the embedding process: {exc}") from exc
            finally:
                child_end.close()
            self._connection = Connection(parent_end.detach())
            return self._connection

    def _stop_child(self) -> None:
        connection, self._connection = self._connection, None
        child, self._child = self._child, None
        if connection is not None:
            connection.close()  # the child reads EOF and exits
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _child_environment() -> dict[str, str]:
    # The child must import this very package (a worktree or an editable install alike).
    environment = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    paths = [root, *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environment


def serve(fd: int, model_name: str, backend: str) -> None:
    """The child's loop: texts in, vectors (or the exception) out, until the socket closes.

    The model runs on ``backend`` with the settings the child inherits from the parent's
    environment (batch size, threads), so the onnx backend keeps torch out of the child too."""
    connection = Connection(fd)
    _lower_priority()
    embedder = build_embedder(model_name, backend, query_cache_size=0)
    while True:
        try:
            texts = connection.recv()
        except (EOFError, OSError):
            return
        reply: tuple[str, Any]
        try:
            reply = ("ok", embedder.embed_documents(texts))
        except MemoryDriverError as exc:
            reply = ("error", exc)
        except Exception as exc:  # the parent re-raises it; keep it picklable
            reply = ("error", MemoryDriverError(f"embedding failed: {type(exc).__name__}: {exc}"))
        try:
            connection.send(reply)
        except (EOFError, OSError):
            return


def _lower_priority() -> None:
    """Run the model at a lower CPU priority (``CHILD_NICENESS``) than the parent process.

    Encoding is throughput work that keeps a core busy; the parent's event loop is latency
    work that needs a core for a few microseconds at a time. At the same priority the loop
    waited in the run queue behind the encoder on a busy machine (measured in ``bench.aio``
    from ``/proc/thread-self/schedstat``: nearly all of the loop's lateness was run-queue wait,
    not the GIL). Only this child is affected, never the host program's own threads."""
    with contextlib.suppress(OSError):  # not permitted here: the parent's priority, then
        os.nice(CHILD_NICENESS)


#: How much lower (``nice`` increment) the child's CPU priority is than its parent's.
CHILD_NICENESS = 10


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], sys.argv[3])
