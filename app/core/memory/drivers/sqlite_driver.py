"""The ``sqlite`` driver: the embedded default, one SQLite file, nothing to set up.

Needs only the standard library's sqlite3 (with FTS5, as CPython ships it) and numpy; embeddings
come from ``embeddings.py``. The schema comes from ``database/migrations/sqlite`` (``python
migrate.py``); the driver issues no DDL and raises ``SchemaNotMigratedError`` on an unmigrated file.

How it works:
- WAL, ``busy_timeout`` and foreign keys on every connection; one connection per thread; every
  write is one ``BEGIN IMMEDIATE`` transaction, every search one read transaction (one snapshot).
- Reads go through memory mapping (``mmap_bytes``, 1 GiB by default; 0 turns it off): a recall
  at 10k memories reads ~2,000 rows (each query term's holders, then the candidates), more
  than a connection's 2 MB page cache holds, and SQLite empties a connection's whole cache
  when another connection has written (the service's worker threads, each with its own
  connection, take turns writing access counts). Mapped, the pages come from the operating
  system's cache without a ``read()`` call each: recall p50 at 10k memories 5.3 -> 3.4 ms on
  one thread, 5.6 -> 4.4 ms with two threads taking turns (interleaved, same file).
- Connections and faults (see ``_connection``): a thread's connection is closed when the thread
  ends; one that met a schema error is discarded (the next call opens a new one); the file is
  never created by the driver, and a file deleted or replaced under it is noticed on every call.
  Writers of one process queue on a lock, then wait for other processes' writers, all within
  ``busy_timeout_ms`` (the write budget); a recall's access-count write never fails the recall.
- Keywords: FTS5 with bm25 over memory content (``porter unicode61`` tokenizer).
- Vectors: float32 blobs in the rows, and in memory one matrix per user (``vector_cache.py``),
  synced before each search from per-user sequence numbers that triggers maintain, so a recall
  reads only rows written since the last one, even when another process wrote them. Search is an
  exact cosine scan of that matrix.
- Recall fuses both (``ranking.py``). Embedding happens outside the write transaction, so a slow
  model never holds the database's write lock.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np

from app.core.database.migrator import migrations_dir
from app.core.database.sqlite_connection import MEMORY_DATABASE, open_sqlite
from app.core.memory import ranking
from app.core.memory.base import BaseMemoryDriver, Progress
from app.core.memory.chunking import chunk_text
from app.core.memory.cursors import CURSOR_GONE, decode_cursor, encode_cursor, listing_scope
from app.core.memory.drivers import sqlite_search as search
from app.core.memory.drivers import sqlite_transfer as transfer
from app.core.memory.drivers.sqlite_values import from_epoch, to_epoch, vector_blob
from app.core.memory.drivers.support import EmbeddingSupport, claim_user_id
from app.core.memory.drivers.vector_cache import VectorCache
from app.core.memory.embeddings import (
    Embedder,
    identity_check,
    identity_mismatch,
)
from app.core.memory.errors import (
    BackendUnavailableError,
    InvalidInputError,
    MemoryDriverError,
    SchemaNotMigratedError,
)
from app.core.memory.portable import PortableRecord
from app.core.memory.records import (
    HealthReport,
    Knowledge,
    KnowledgeDocument,
    Memory,
    MemoryInput,
    MemoryPage,
    User,
    user_record,
)
from app.core.memory.reembed import ReembedReport, ReembedStart, run_reembed
from app.core.memory.slowlog import DEFAULT_SLOW_OPERATION_MS, log_if_slow
from app.core.memory.time_phrases import window_named_by
from app.core.memory.validation import (
    DEFAULT_NAMESPACE,
    MAX_PAGE_SIZE,
    MAX_PROFILE_BYTES,
    MAX_QUERY_CHARS,
    MemoryDraft,
    check_bool,
    check_by_id,
    check_display_name,
    check_id,
    check_json_object,
    check_optional_id,
    check_positive_int,
    check_query,
    check_retention,
    check_text,
    check_top_k,
    prepare_changes,
    prepare_filters,
    prepare_knowledge,
    prepare_recall_time,
    prepare_store,
    prepare_store_many,
)

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

#: The schema the driver needs, all of it (every memory read selects ``occurred_at``).
REQUIRED_MIGRATION = "2026_12_04_000001_add_memory_counts"
_MEMORY_COLUMNS = (
    "m.pk, m.id, m.user_id, m.agent_id, m.conversation_id, m.namespace, m.key, m.content, "
    "m.tags, m.metadata, m.importance, m.access_count, m.last_accessed_at, m.expires_at, "
    "m.deleted_at, m.created_at, m.updated_at, m.occurred_at"
)


#: How long a recall's access-count write waits for the write lock before it is deferred.
ACCESS_WRITE_WAIT_MS = 50
#: How much of the file each connection reads through memory mapping (``MEMORY_SQLITE_MMAP_BYTES``;
#: see the module docstring).
DEFAULT_MMAP_BYTES = 1 << 30
#: Deferred access counts kept at most (memory ids); beyond it the oldest are dropped.
MAX_PENDING_ACCESS = 10_000


def _translate_errors(
    method: Callable[Concatenate[SqliteDriver, P], R],
) -> Callable[Concatenate[SqliteDriver, P], R]:
    """Turn sqlite3 exceptions escaping a public verb into the contract's errors.

    A connection that failed for any reason but lock contention is discarded: after a schema
    change under it (``migrate.py fresh``) an SQLite connection can keep failing with "no such
    table" for good, while a new one works.
    """

    @functools.wraps(method)
    def wrapper(self: SqliteDriver, *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if not _is_lock_contention(exc):
                self._discard_connection()
            raise _contract_error(exc) from exc
        finally:
            log_if_slow(logger, self.name, method.__name__, started, self.slow_operation_ms)

    return wrapper


class _ThreadConnection:
    """One thread's connection, closed when that thread ends.

    Only the thread's ``threading.local`` slot holds it strongly (the driver's registry holds it
    weakly, for ``close()``); CPython frees a thread's local slots when the thread finishes, and
    ``__del__`` then closes the connection, so short-lived threads leave no open files behind.
    """

    __slots__ = ("__weakref__", "busy_timeout_ms", "connection", "file")

    def __init__(self, connection: sqlite3.Connection, file: tuple[int, int],
                 busy_timeout_ms: int) -> None:
        self.connection = connection
        #: (device, inode) of the database file this connection opened.
        self.file = file
        self.busy_timeout_ms = busy_timeout_ms

    def close(self) -> None:
        # Closing twice, or a connection already broken: nothing left to release.
        with suppress(sqlite3.Error):
            self.connection.close()

    def __del__(self) -> None:
        # Also runs at interpreter shutdown, when module globals (sqlite3, suppress) may be gone.
        try:  # noqa: SIM105
            self.connection.close()
        except Exception:  # noqa: BLE001, S110 - nothing to report to at that point
            pass


class _WriteLockTimeout(BackendUnavailableError):
    """The write lock stayed taken for the whole budget (nothing was written)."""


class SqliteDriver(EmbeddingSupport, BaseMemoryDriver):
    """Memories, knowledge and users in one SQLite file (see the module docstring)."""

    name = "sqlite"
    #: Verbs slower than this (ms) are logged at WARNING; 0: never (``MEMORY_SLOW_OPERATION_MS``).
    slow_operation_ms: int = DEFAULT_SLOW_OPERATION_MS

    def __init__(self, *, path: str | Path, embedder: Embedder | None = None,
                 busy_timeout_ms: int = 5_000, retention: timedelta = timedelta(days=30),
                 vector_cache_max_vectors: int = 2_000_000, vector_cache_max_bytes: int = 0,
                 weights: ranking.FusionWeights = ranking.DEFAULT_WEIGHTS,
                 mmap_bytes: int = DEFAULT_MMAP_BYTES) -> None:
        if str(path) == MEMORY_DATABASE:
            raise InvalidInputError(
                "path must be a file: each thread opens its own connection, and ':memory:' would "
                "give each one a separate, empty database"
            )
        self.path = Path(path).expanduser()
        self._embedder = embedder
        self._busy_timeout_ms = busy_timeout_ms
        self._mmap_bytes = mmap_bytes
        self._retention = retention
        self._vector_cache_max = vector_cache_max_vectors
        self._vector_cache_max_bytes = vector_cache_max_bytes
        self._weights = weights
        self._vectors: VectorCache | None = None
        self._local = threading.local()
        self._open: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        # Threads of this process queue here instead of in SQLite's sleep-and-retry busy loop.
        self._write_lock = threading.RLock()
        self._pending_access: dict[str, tuple[int, float]] = {}
        self._access_lock = threading.Lock()
        self._closed = False
        self._announced = False  # the first connection is logged at INFO, later ones at DEBUG
        self._schema_checked = False
        self._identity_checked = False

    @classmethod
    def from_settings(cls) -> SqliteDriver:
        """A driver configured from ``MEMORY_SQLITE_PATH`` and the other settings."""
        from config.settings import get_settings

        settings = get_settings()
        driver = cls(
            path=settings.sqlite_path,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            mmap_bytes=settings.sqlite_mmap_bytes,
            retention=timedelta(days=settings.soft_delete_retention_days),
            vector_cache_max_vectors=settings.vector_cache_max_vectors,
            vector_cache_max_bytes=settings.vector_cache_max_bytes,
        )
        driver.slow_operation_ms = settings.slow_operation_ms
        return driver

    # -- the six verbs of the original design ---------------------------------------------------

    @_translate_errors
    def recall(
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
        when = prepare_recall_time(start=start, end=end, reference_time=reference_time,
                                   context=context, now=_utcnow())
        filters = prepare_filters(
            user_id, agent_id=agent_id, conversation_id=conversation_id, namespace=namespace,
            tags=tags, exclude_tags=exclude_tags, min_importance=min_importance,
            start=when.start, end=when.end,
        )
        top_k = check_top_k(top_k)
        use_vector = check_bool(use_vector, "use_vector")
        text = check_query(query)
        query_vector = self._embed_query(text) if text is not None and use_vector else None
        now = time.time()
        scope = search.memory_scope(filters, now)
        with self._read() as conn:
            if text is None:
                rows = conn.execute(
                    f"SELECT {_MEMORY_COLUMNS} FROM memories m WHERE {scope.sql} "
                    "ORDER BY m.occurred_at DESC, m.created_at DESC, m.pk DESC LIMIT ?",
                    (*scope.params, top_k),
                ).fetchall()
                ranked = [(row["pk"], 1.0) for row in rows]
            else:
                candidates = self._candidates(conn, search.MEMORIES, scope, text, query_vector,
                                              f"memory:{filters.user_id}", top_k,
                                              (filters.user_id,))
                ranked = ranking.rank_candidates(
                    candidates, top_k, self._weights, use_vector=query_vector is not None,
                    window=window_named_by(text, when.reference_time),
                    neighbours_of=lambda hits, distance: search.neighbours(
                        conn, hits, distance, now),
                    details_of=lambda pks: search.eligible_details(
                        conn, search.MEMORIES, scope, pks))
                rows = self._memory_rows(conn, [pk for pk, _ in ranked])
            around = (search.neighbours(conn, [pk for pk, _ in ranked], when.context, now)
                      if when.context else {})
            context_rows = {row["pk"]: row for row in self._memory_rows(
                conn, sorted({pk for pks in around.values() for pk in pks}))}
        memories = _ordered_memories(rows, dict(ranked))
        self._record_access(memories, now)
        if when.context:
            for memory, (pk, _) in zip(memories, ranked, strict=True):
                memory["context"] = [_memory_from_row(context_rows[near])
                                     for near in around.get(pk, []) if near in context_rows]
        return memories

    @_translate_errors
    def recall_global_knowledge(
        self, query: str, top_k: int = 5, category: str | None = None
    ) -> list[Knowledge]:
        text = check_text(query, "query", max_chars=MAX_QUERY_CHARS)
        top_k = check_top_k(top_k)
        category = check_optional_id(category, "category")
        query_vector = self._embed_query(text)
        scope = search.knowledge_scope(category)
        with self._read() as conn:
            candidates = self._candidates(conn, search.KNOWLEDGE, scope, text, query_vector,
                                          "knowledge", top_k, ())
            ranked = ranking.rank_candidates(candidates, top_k, self._weights)
            rows = conn.execute(
                "SELECT m.pk, m.chunk_index, m.content, d.doc_id, d.category, d.title, "
                "d.metadata, d.updated_at FROM knowledge_chunks m "
                "JOIN knowledge_documents d ON d.pk = m.document_pk "
                "WHERE m.pk IN (SELECT value FROM json_each(?))",
                (json.dumps([pk for pk, _ in ranked]),),
            ).fetchall()
        by_pk = {row["pk"]: row for row in rows}
        return [_knowledge_from_row(by_pk[pk], score) for pk, score in ranked if pk in by_pk]

    @_translate_errors
    def store(
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
        now = _utcnow()
        draft = prepare_store(
            user_id, content, conversation_id, tags, metadata, agent_id=agent_id,
            namespace=namespace, key=key, importance=importance, ttl=ttl, expires_at=expires_at,
            occurred_at=occurred_at, now=now,
        )
        vectors = self._embed_documents([draft.content])
        with self._write(vectors=True) as conn:
            pk = self._write_memory(conn, draft, vectors[0], now.timestamp())
            rows = self._memory_rows(conn, [pk])
        return _memory_from_row(rows[0])

    @_translate_errors
    def store_global_knowledge(
        self,
        content: str,
        category: str,
        title: str | None = None,
        doc_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KnowledgeDocument:
        draft = prepare_knowledge(content, category, title, doc_id, metadata)
        doc_id, meta = draft.doc_id, draft.metadata
        chunks = chunk_text(draft.content)
        vectors = self._embed_documents(chunks)
        now = time.time()
        with self._write(vectors=True) as conn:
            existing = conn.execute(
                "SELECT pk FROM knowledge_documents WHERE doc_id = ?", (doc_id,)
            ).fetchone()
            if existing is None:
                document_pk = conn.execute(
                    "INSERT INTO knowledge_documents (doc_id, category, title, metadata, "
                    "chunk_count, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (doc_id, draft.category, draft.title, json.dumps(meta), len(chunks), now, now),
                ).lastrowid
            else:
                document_pk = existing["pk"]
                conn.execute("DELETE FROM knowledge_chunks WHERE document_pk = ?", (document_pk,))
                conn.execute(
                    "UPDATE knowledge_documents SET category = ?, title = ?, metadata = ?, "
                    "chunk_count = ?, updated_at = ? WHERE pk = ?",
                    (draft.category, draft.title, json.dumps(meta), len(chunks), now, document_pk),
                )
            conn.executemany(
                "INSERT INTO knowledge_chunks (document_pk, chunk_index, content, embedding) "
                "VALUES (?, ?, ?, ?)",
                [(document_pk, index, chunk, vector_blob(vector))
                 for index, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True))],
            )
            row = conn.execute("SELECT * FROM knowledge_documents WHERE pk = ?",
                               (document_pk,)).fetchone()
        return _document_from_row(row)

    @_translate_errors
    def delete(self, memory_id: str, user_id: str | None = None) -> bool:
        return self._set_deleted(memory_id, user_id, deleted=True)

    def health_check(self) -> HealthReport:
        started = time.perf_counter()
        checks: dict[str, Any] = {"database": {"path": str(self.path)}}
        status = "ok"
        try:
            if not self.path.exists():
                raise SchemaNotMigratedError(
                    f"database file {self.path} does not exist; run `python migrate.py`"
                )
            conn = self._connection()
            conn.execute("SELECT 1").fetchone()
            checks["database"]["status"] = "ok"
            checks["migrations"] = self._migration_check(conn)
            checks["embedding"] = identity_check(_stored_identity(conn), self.embedder)
            if checks["migrations"]["status"] != "ok" or checks["embedding"]["status"] not in (
                "ok", "unrecorded"
            ):
                status = "degraded"
            if checks["migrations"]["status"] == "not_migrated":
                status = "down"
        except (sqlite3.Error, MemoryDriverError, OSError) as exc:
            status = "down"
            checks["database"].update(status="down", error=str(exc))
        latency = round((time.perf_counter() - started) * 1000, 3)
        return {"driver": self.name, "status": status, "checks": checks,  # type: ignore[typeddict-item]
                "latency_ms": latency}

    # -- added verbs -------------------------------------------------------------------------

    @_translate_errors
    def get(
        self, memory_id: str, user_id: str | None = None, *, include_deleted: bool = False
    ) -> Memory | None:
        memory_id, user_id = check_by_id(memory_id, user_id)
        include_deleted = check_bool(include_deleted, "include_deleted")
        with self._read() as conn:
            pk = self._visible_pk(conn, memory_id, user_id, time.time(),
                                  include_deleted=include_deleted)
            rows = self._memory_rows(conn, [pk] if pk is not None else [])
        return _memory_from_row(rows[0]) if rows else None

    @_translate_errors
    def update(
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
        memory_id, user_id = check_by_id(memory_id, user_id)
        now = _utcnow()
        changes = prepare_changes(content=content, tags=tags, metadata=metadata,
                                  importance=importance, ttl=ttl, expires_at=expires_at,
                                  clear_expiry=clear_expiry, occurred_at=occurred_at, now=now)
        vector = self._embed_documents([changes.content])[0] if changes.content else None
        assignments: list[str] = ["updated_at = ?"]
        params: list[Any] = [now.timestamp()]
        for column, value in (("content", changes.content),
                              ("tags", None if changes.tags is None else json.dumps(changes.tags)),
                              ("metadata", None if changes.metadata is None
                               else json.dumps(changes.metadata)),
                              ("importance", changes.importance),
                              ("expires_at", changes.expires_at and changes.expires_at.timestamp()),
                              ("occurred_at", to_epoch(changes.occurred_at)),
                              ("embedding", None if vector is None else vector_blob(vector))):
            if value is not None:
                assignments.append(f"{column} = ?")
                params.append(value)
        if changes.clear_expiry:
            assignments.append("expires_at = NULL")
        with self._write(vectors=vector is not None) as conn:
            pk = self._visible_pk(conn, memory_id, user_id, now.timestamp())
            if pk is None:
                return None
            if not changes.is_empty:
                conn.execute(f"UPDATE memories SET {', '.join(assignments)} WHERE pk = ?",
                             (*params, pk))
            rows = self._memory_rows(conn, [pk])
        return _memory_from_row(rows[0])

    @_translate_errors
    def store_many(self, items: Iterable[MemoryInput]) -> list[Memory]:
        now = _utcnow()
        drafts = prepare_store_many(items, now=now)
        if not drafts:
            return []
        vectors = self._embed_documents([draft.content for draft in drafts])
        with self._write(vectors=True) as conn:
            pks = [self._write_memory(conn, draft, vector, now.timestamp())
                   for draft, vector in zip(drafts, vectors, strict=True)]
            rows = {row["pk"]: row for row in self._memory_rows(conn, pks)}
        return [_memory_from_row(rows[pk]) for pk in pks]

    @_translate_errors
    def list_memories(
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
        filters = prepare_filters(user_id, agent_id=agent_id, conversation_id=conversation_id,
                                  namespace=namespace, tags=tags)
        include_deleted = check_bool(include_deleted, "include_deleted")
        limit = check_positive_int(limit, "limit", maximum=MAX_PAGE_SIZE)
        listing = listing_scope(filters, include_deleted=include_deleted)
        after_id = decode_cursor(cursor, listing)
        scope = search.memory_scope(filters, time.time(), include_deleted=include_deleted)
        with self._read() as conn:
            # The cursor names the user's own last memory, not the table's key: look its key up
            # inside this user, so a cursor never reaches another user's rows.
            before = None if after_id is None else _cursor_anchor(conn, after_id, filters.user_id)
            rows = conn.execute(
                f"SELECT {_MEMORY_COLUMNS} FROM memories m WHERE {scope.sql} "
                "AND (? IS NULL OR m.pk < ?) ORDER BY m.pk DESC LIMIT ?",
                (*scope.params, before, before, limit + 1),
            ).fetchall()
        has_more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [_memory_from_row(row) for row in rows],
                "next_cursor": encode_cursor(rows[-1]["id"], listing) if has_more else None}

    @_translate_errors
    def restore(self, memory_id: str, user_id: str | None = None) -> bool:
        return self._set_deleted(memory_id, user_id, deleted=False)

    @_translate_errors
    def forget_user(self, user_id: str) -> int:
        user_id = check_id(user_id, "user_id")
        space = f"memory:{user_id}"
        with self._write() as conn:
            erased = conn.execute("DELETE FROM memories WHERE user_id = ?", (user_id,)).rowcount
            conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM vector_spaces WHERE space = ?", (space,))
        if self._vectors is not None:
            self._vectors.drop(space)
        return erased

    @_translate_errors
    def purge(self, *, retention: timedelta | None = None) -> int:
        retention = check_retention(retention, self._retention)
        now = time.time()
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM memories WHERE (expires_at IS NOT NULL AND expires_at <= ?) "
                "OR (deleted_at IS NOT NULL AND deleted_at <= ?)",
                (now, now - retention.total_seconds()),
            ).rowcount

    @_translate_errors
    def delete_knowledge(self, doc_id: str) -> bool:
        doc_id = check_id(doc_id, "doc_id")
        with self._write() as conn:
            row = conn.execute("SELECT pk FROM knowledge_documents WHERE doc_id = ?",
                               (doc_id,)).fetchone()
            if row is None:
                return False
            # Chunks first, explicitly, so that their delete triggers keep FTS and vectors exact.
            conn.execute("DELETE FROM knowledge_chunks WHERE document_pk = ?", (row["pk"],))
            conn.execute("DELETE FROM knowledge_documents WHERE pk = ?", (row["pk"],))
        return True

    @_translate_errors
    def stats(self, user_id: str | None = None) -> dict[str, Any]:
        user_id = check_optional_id(user_id, "user_id")
        with self._read() as conn:
            counts = _memory_counts(conn, user_id, time.time())
            result: dict[str, Any] = {"driver": self.name, "memories": counts}
            if user_id is None:
                result["users"] = conn.execute(
                    "SELECT COUNT(*) FROM (SELECT user_id FROM memories UNION "
                    "SELECT user_id FROM users)"
                ).fetchone()[0]
                documents, chunks = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(chunk_count), 0) FROM knowledge_documents"
                ).fetchone()
                result["knowledge"] = {"documents": documents, "chunks": chunks}
                result["embedding"] = _stored_identity(conn)
                result["database"] = {"path": str(self.path),
                                      "size_bytes": _file_size(self.path)}
            else:
                result["user_id"] = user_id
        return result

    @_translate_errors
    def create_user(
        self,
        user_id: str | None = None,
        *,
        display_name: str | None = None,
        profile: dict[str, Any] | None = None,
    ) -> User:
        chosen = check_optional_id(user_id, "user_id")
        name = check_display_name(display_name)
        profile_json = json.dumps(check_json_object(profile, "profile",
                                                    max_bytes=MAX_PROFILE_BYTES))
        now = time.time()

        def insert(candidate: str) -> bool:
            with self._write() as conn:
                return conn.execute(
                    "INSERT INTO users (user_id, display_name, profile, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id) DO NOTHING",
                    (candidate, name, profile_json, now, now),
                ).rowcount > 0

        user = self.get_user(claim_user_id(chosen, insert))
        assert user is not None
        return user

    @_translate_errors
    def get_user(self, user_id: str) -> User | None:
        user_id = check_id(user_id, "user_id")
        with self._read() as conn:
            row = conn.execute(
                "SELECT display_name, profile, created_at, updated_at FROM users "
                "WHERE user_id = ?", (user_id,)).fetchone()
            counts = _memory_counts(conn, user_id, time.time())
            first, last = conn.execute(
                "SELECT MIN(created_at), MAX(created_at) FROM memories WHERE user_id = ?",
                (user_id,),
            ).fetchone()
        if row is not None:
            row = (row[0], json.loads(row[1]), from_epoch(row[2]), from_epoch(row[3]))
        return user_record(user_id, row, counts, from_epoch(first), from_epoch(last))

    @_translate_errors
    def get_profile(self, user_id: str) -> dict[str, Any]:
        user_id = check_id(user_id, "user_id")
        with self._read() as conn:
            row = conn.execute("SELECT profile FROM users WHERE user_id = ?",
                               (user_id,)).fetchone()
        return json.loads(row["profile"]) if row else {}

    @_translate_errors
    def set_profile(
        self, user_id: str, profile: dict[str, Any], *, merge: bool = False
    ) -> dict[str, Any]:
        user_id = check_id(user_id, "user_id")
        if profile is None:
            raise InvalidInputError("profile must be a dict (got None)")
        new = check_json_object(profile, "profile", max_bytes=MAX_PROFILE_BYTES)
        merge = check_bool(merge, "merge")
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT profile FROM users WHERE user_id = ?",
                               (user_id,)).fetchone()
            stored = {**json.loads(row["profile"]), **new} if merge and row else new
            stored = check_json_object(stored, "profile", max_bytes=MAX_PROFILE_BYTES)
            conn.execute(
                "INSERT INTO users (user_id, profile, created_at, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET profile = excluded.profile, "
                "updated_at = excluded.updated_at",
                (user_id, json.dumps(stored), now, now),
            )
        return stored

    # -- moving records ---------------------------------------------------------------------

    @_translate_errors
    def export_records(self, *, user_id: str | None = None,
                       with_embeddings: bool = False) -> Iterator[PortableRecord]:
        user_id = check_optional_id(user_id, "user_id")
        with_embeddings = check_bool(with_embeddings, "with_embeddings")
        self._schema_ready()
        return self._export(user_id, with_embeddings)

    @_translate_errors
    def import_records(self, records: Sequence[PortableRecord], *,
                       vectors_from: dict[str, Any] | None = None) -> list[tuple[int, str]]:
        vectors = self._import_vectors(records, vectors_from)
        refused = []
        with self._write(vectors=True) as conn:
            for index, (record, record_vectors) in enumerate(zip(records, vectors, strict=True)):
                reason = transfer.write_record(conn, record, record_vectors)
                if reason is not None:
                    refused.append((index, reason))
        return refused

    @_translate_errors
    def reembed(self, embedder: Embedder | None = None, *, batch_size: int = 64,
                progress: Progress | None = None) -> ReembedReport:
        try:
            return run_reembed(self, embedder or self.embedder, batch_size=batch_size,
                               progress=progress)
        finally:
            # Vectors of another model may now be in place: reload them, check the model again.
            self._vectors = None
            self._identity_checked = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            holders = list(self._open)
            self._open.clear()
        for holder in holders:
            holder.close()
        self._vectors = None

    # -- private helpers ----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection to the file now at ``self.path``.

        Every call checks (one ``stat``) that the file still exists and is the one this thread's
        connection opened: a deleted file is ``SchemaNotMigratedError`` (never a new, empty
        database, never a write acknowledged into an unlinked file); a replaced one (a restored
        backup) gets a new connection.
        """
        if self._closed:
            raise BackendUnavailableError("this SqliteDriver is closed")
        file = self._file_identity()
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        if holder is not None and holder.file != file:
            self._discard_connection()
            holder = None
        if holder is None:
            try:
                connection = open_sqlite(self.path, busy_timeout_ms=self._busy_timeout_ms,
                                         create=False, mmap_bytes=self._mmap_bytes)
            except sqlite3.OperationalError as exc:
                if not self.path.exists():
                    raise self._missing_file_error() from exc
                raise
            connection.row_factory = sqlite3.Row
            holder = _ThreadConnection(connection, file, self._busy_timeout_ms)
            with self._lock:
                if self._closed:
                    holder.close()
                    raise BackendUnavailableError("this SqliteDriver is closed")
                self._open.add(holder)
            self._local.holder = holder
            announced, self._announced = self._announced, True
            logger.log(logging.DEBUG if announced else logging.INFO,
                       "opened SQLite memory store %s", self.path.resolve())
        return holder.connection

    def _file_identity(self) -> tuple[int, int]:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._discard_connection()
            raise self._missing_file_error() from None
        return stat.st_dev, stat.st_ino

    def _missing_file_error(self) -> SchemaNotMigratedError:
        return SchemaNotMigratedError(
            f"the SQLite database file {self.path} does not exist (deleted, or never created); "
            "the driver does not create one: run `python migrate.py`"
        )

    def _discard_connection(self) -> None:
        """Close this thread's connection; the next call opens a new one and checks the schema."""
        holder: _ThreadConnection | None = self._local.__dict__.pop("holder", None)
        if holder is not None:
            with self._lock:
                self._open.discard(holder)
            holder.close()
        self._schema_checked = False

    def _schema_ready(self) -> sqlite3.Connection:
        conn = self._connection()
        if not self._schema_checked:
            try:
                ran = conn.execute("SELECT 1 FROM migrations WHERE migration = ?",
                                   (REQUIRED_MIGRATION,)).fetchone()
            except sqlite3.OperationalError:
                ran = None
            if ran is None:
                self._discard_connection()
                raise SchemaNotMigratedError(
                    f"the SQLite database {self.path} is not migrated: run `python migrate.py`"
                )
            self._schema_checked = True
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._schema_ready()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    @contextmanager
    def _write(self, *, wait_ms: int | None = None,
               vectors: bool = False) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction, committed if the block succeeds.

        ``vectors``: the block writes vectors, so the store's recorded embedding identity is
        read first (one primary-key lookup) and must be this driver's model; another process may
        have re-embedded the store with another model since this one checked
        (``EmbeddingMismatchError``, nothing written).

        Waits at most ``wait_ms`` (default: the write budget, ``busy_timeout_ms``) in all for the
        write lock: first behind this process's other writers, then behind other processes'
        (SQLite's busy handler, given what is left). Past it: ``_WriteLockTimeout``, a
        ``BackendUnavailableError`` naming the budget, with nothing written.
        """
        budget_ms = self._busy_timeout_ms if wait_ms is None else wait_ms
        started = time.monotonic()
        if not self._write_lock.acquire(timeout=budget_ms / 1000):
            raise self._lock_timeout(budget_ms)
        try:
            conn = self._schema_ready()
            holder: _ThreadConnection = self._local.holder
            left_ms = max(0, budget_ms - int((time.monotonic() - started) * 1000))
            if holder.busy_timeout_ms != left_ms:
                conn.execute(f"PRAGMA busy_timeout = {left_ms}")
                holder.busy_timeout_ms = left_ms
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _is_lock_contention(exc):
                    raise self._lock_timeout(budget_ms) from exc
                raise
            try:
                if vectors:
                    self._check_written_identity(conn)
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # Never leave the transaction open: the connection would fail every later call.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if self._file_identity() != holder.file:
                raise BackendUnavailableError(
                    f"the SQLite database file {self.path} was replaced during the write, "
                    "which went to the old file: repeat it"
                )
        finally:
            self._write_lock.release()

    def _check_written_identity(self, conn: sqlite3.Connection) -> None:
        stored = _stored_identity(conn)
        model, dimension = self.embedder.model_name, self.embedder.dimension
        if stored is not None and stored != {"model": model, "dimension": dimension}:
            raise identity_mismatch(str(self.path), stored, model, dimension)

    def _lock_timeout(self, budget_ms: int) -> _WriteLockTimeout:
        return _WriteLockTimeout(
            f"the SQLite database {self.path} stayed locked by other writers for the whole write "
            f"budget of {budget_ms} ms (busy_timeout_ms, MEMORY_SQLITE_BUSY_TIMEOUT_MS); nothing "
            "was written: try again, or raise the budget"
        )

    def _vector_cache(self) -> VectorCache:
        if self._vectors is None:
            self._vectors = VectorCache(self.embedder.dimension, self._vector_cache_max,
                                        max_bytes=self._vector_cache_max_bytes)
        return self._vectors

    def _set_deleted(self, memory_id: str, user_id: str | None, *, deleted: bool) -> bool:
        """Soft-delete (or restore) one unexpired memory; whether it changed state."""
        memory_id, user_id = check_by_id(memory_id, user_id)
        now = time.time()
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE memories SET deleted_at = CASE WHEN ?1 THEN ?2 END, updated_at = ?2 "
                "WHERE id = ?3 AND (?4 IS NULL OR user_id = ?4) AND (deleted_at IS NULL) = ?1 "
                "AND (expires_at IS NULL OR expires_at > ?2)",
                (deleted, now, memory_id, user_id),
            )
        return cursor.rowcount > 0

    def _export(self, user_id: str | None, with_embeddings: bool) -> Iterator[PortableRecord]:
        try:
            with self._read() as conn:
                yield from transfer.read_users(conn, user_id)
                yield from transfer.read_memories(conn, user_id, with_embeddings,
                                                  _memory_from_row)
                if user_id is None:
                    yield from transfer.read_documents(conn, with_embeddings)
        except sqlite3.Error as exc:
            raise _contract_error(exc) from exc

    def _reembed_begin(self, model: str, dimension: int) -> ReembedStart:
        with self._write() as conn:
            return transfer.reembed_begin(conn, model, dimension)

    def _reembed_pending(self, corpus: str, after_pk: int, limit: int) -> list[tuple[int, str]]:
        with self._read() as conn:
            return transfer.reembed_pending(conn, corpus, after_pk, limit)

    def _reembed_stage(self, corpus: str, rows: list[tuple[int, str]],
                       vectors: np.ndarray) -> None:
        with self._write() as conn:
            transfer.reembed_stage(conn, corpus, rows, vectors)

    def _reembed_finish(self, model: str, dimension: int,
                        embed: Callable[[list[str]], np.ndarray]
                        ) -> tuple[dict[str, Any] | None, int]:
        # BEGIN IMMEDIATE holds other writers off until the swap commits.
        with self._write() as conn:
            return transfer.reembed_finish(conn, model, dimension, embed)

    def _record_identity(self, model: str, dimension: int) -> dict[str, Any] | None:
        with self._read() as conn:
            stored = _stored_identity(conn)
        if stored is not None:
            return stored  # the common case needs no write lock, so recall never waits for one
        with self._write() as conn:
            conn.execute(
                "INSERT INTO embedding_identity (id, model, dimension, recorded_at) "
                "VALUES (1, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (model, dimension, time.time()),
            )
            return _stored_identity(conn)

    @property
    def _identity_location(self) -> str:
        return str(self.path)

    def _candidates(self, conn: sqlite3.Connection, corpus: search.Corpus, scope: search.Scope,
                    text: str, query_vector: np.ndarray | None, space_name: str, top_k: int,
                    space_params: tuple[Any, ...]) -> dict[int, ranking.Candidate]:
        """The keyword and vector candidates of a recall, each with both scores."""
        depth = ranking.candidate_depth(top_k)
        matches = search.keyword_matches(conn, corpus, scope, text)
        found = search.keyword_candidates(conn, corpus, scope, matches, depth)
        if query_vector is not None:
            space = self._vector_cache().space(space_name)
            owner = "AND user_id = ? " if space_params else ""
            rows_sql = (f"SELECT pk, embedding FROM {corpus.table} WHERE 1 = 1 {owner}"
                        "AND vec_seq > ?")
            with space.lock:
                search.sync_space(conn, corpus, space, space_name, rows_sql, space_params)
            nearest = search.vector_candidates(conn, corpus, scope, space, query_vector, depth)
            # Keyword-only finds get their true cosine too, so fusion compares like with like.
            with space.lock:
                cosines = space.similarities_of([pk for pk in found if pk not in nearest],
                                                query_vector)
            for pk, candidate in found.items():
                candidate.cosine = cosines.get(pk, 0.0)
            found = {**found, **nearest}
        weights = matches.stats.weights()
        for pk, candidate in found.items():
            candidate.terms = matches.terms_of(pk)
            candidate.keyword = ranking.keyword_coverage(candidate.terms, weights)
        return found

    def _memory_rows(self, conn: sqlite3.Connection, pks: list[int]) -> list[sqlite3.Row]:
        if not pks:
            return []
        return conn.execute(
            f"SELECT {_MEMORY_COLUMNS} FROM json_each(?) AS wanted "
            "CROSS JOIN memories m ON m.pk = wanted.value",
            (json.dumps(pks),),
        ).fetchall()

    def _visible_pk(self, conn: sqlite3.Connection, memory_id: str, user_id: str | None,
                    now: float, *, include_deleted: bool = False) -> int | None:
        row = conn.execute(
            "SELECT pk FROM memories WHERE id = ? AND (? IS NULL OR user_id = ?) "
            "AND (expires_at IS NULL OR expires_at > ?) AND (? OR deleted_at IS NULL)",
            (memory_id, user_id, user_id, now, include_deleted),
        ).fetchone()
        return None if row is None else int(row["pk"])

    def _write_memory(self, conn: sqlite3.Connection, draft: MemoryDraft, vector: np.ndarray,
                      now: float) -> int:
        """Insert ``draft``, or replace the memory with its key in place; returns the pk."""
        # occurred_at defaults to the time of this store (an upsert's too: new content, new fact).
        occurred = now if draft.occurred_at is None else draft.occurred_at.timestamp()
        values = (draft.conversation_id, draft.content, json.dumps(draft.tags),
                  json.dumps(draft.metadata), draft.importance,
                  draft.expires_at and draft.expires_at.timestamp(), occurred, now,
                  vector_blob(vector))
        if draft.key is not None:
            existing = conn.execute(
                "SELECT pk FROM memories WHERE user_id = ? AND COALESCE(agent_id, '') = ? "
                "AND namespace = ? AND key = ?",
                (draft.user_id, draft.agent_id or "", draft.namespace, draft.key),
            ).fetchone()
            if existing is not None:
                conn.execute(
                    "UPDATE memories SET conversation_id = ?, content = ?, tags = ?, "
                    "metadata = ?, importance = ?, expires_at = ?, occurred_at = ?, "
                    "updated_at = ?, embedding = ?, deleted_at = NULL WHERE pk = ?",
                    (*values, existing["pk"]),
                )
                return int(existing["pk"])
        cursor = conn.execute(
            "INSERT INTO memories (conversation_id, content, tags, metadata, importance, "
            "expires_at, occurred_at, updated_at, embedding, id, user_id, agent_id, namespace, "
            "key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, uuid.uuid4().hex, draft.user_id, draft.agent_id, draft.namespace,
             draft.key, now),
        )
        return int(cursor.lastrowid or 0)

    def _record_access(self, memories: list[Memory], now: float) -> None:
        """Count an access to each of ``memories`` (and in the records returned).

        Best effort by design: the counts are bookkeeping, and a recall must not fail or stall
        because writers hold the lock. The write waits ``ACCESS_WRITE_WAIT_MS`` at most; if it
        cannot get the lock, the counts are kept in this process and written with the next
        recall's (at most ``MAX_PENDING_ACCESS`` memories are kept; a process that ends first
        loses them).
        """
        if not memories:
            return
        with self._access_lock:
            batch, self._pending_access = self._pending_access, {}
        for memory in memories:
            count, _ = batch.pop(memory["id"], (0, now))
            batch[memory["id"]] = (count + 1, now)
        try:
            with self._write(wait_ms=min(ACCESS_WRITE_WAIT_MS, self._busy_timeout_ms)) as conn:
                conn.executemany(
                    "UPDATE memories SET access_count = access_count + ?, "
                    "last_accessed_at = MAX(COALESCE(last_accessed_at, 0), ?) WHERE id = ?",
                    [(count, at, memory_id) for memory_id, (count, at) in batch.items()],
                )
        except _WriteLockTimeout:
            with self._access_lock:
                for memory_id, (count, at) in self._pending_access.items():
                    earlier, _ = batch.pop(memory_id, (0, at))
                    batch[memory_id] = (earlier + count, at)
                while len(batch) > MAX_PENDING_ACCESS:
                    del batch[next(iter(batch))]
                self._pending_access = batch
        accessed = from_epoch(now)
        for memory in memories:
            memory["access_count"] += 1
            memory["last_accessed_at"] = accessed

    def _migration_check(self, conn: sqlite3.Connection) -> dict[str, Any]:
        files = sorted(path.stem for path in migrations_dir("sqlite").glob("*.py")
                       if not path.name.startswith("_"))
        try:
            ran = {row[0] for row in conn.execute("SELECT migration FROM migrations")}
        except sqlite3.OperationalError:
            ran = set()
        pending = [name for name in files if name not in ran]
        if REQUIRED_MIGRATION not in ran:
            return {"status": "not_migrated", "pending": pending,
                    "hint": "run `python migrate.py`"}
        return {"status": "pending" if pending else "ok", "pending": pending}


# -- module helpers -------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def _stored_identity(conn: sqlite3.Connection) -> dict[str, Any] | None:
    row = conn.execute("SELECT model, dimension FROM embedding_identity WHERE id = 1").fetchone()
    return None if row is None else {"model": row[0], "dimension": row[1]}


def _memory_counts(conn: sqlite3.Connection, user_id: str | None, now: float) -> dict[str, int]:
    visible, deleted, expired = conn.execute(
        "SELECT "
        "COALESCE(SUM(deleted_at IS NULL AND (expires_at IS NULL OR expires_at > ?1)), 0), "
        "COALESCE(SUM(deleted_at IS NOT NULL AND (expires_at IS NULL OR expires_at > ?1)), 0), "
        "COALESCE(SUM(expires_at IS NOT NULL AND expires_at <= ?1), 0) "
        "FROM memories WHERE (?2 IS NULL OR user_id = ?2)",
        (now, user_id),
    ).fetchone()
    return {"visible": visible, "deleted": deleted, "expired": expired}


def _cursor_anchor(conn: sqlite3.Connection, memory_id: str, user_id: str) -> int:
    """The key of ``user_id``'s memory ``memory_id`` a cursor continues after.

    Raises ``InvalidInputError`` naming ``cursor`` when that memory is gone (purged or erased
    between two pages): the listing cannot continue at a known place and starts over.
    """
    row = conn.execute("SELECT pk FROM memories WHERE id = ? AND user_id = ?",
                       (memory_id, user_id)).fetchone()
    if row is None:
        raise InvalidInputError(CURSOR_GONE)
    return int(row["pk"])


def _memory_from_row(row: sqlite3.Row) -> Memory:
    return {
        "id": row["id"],
        "user_id": row["user_id"],
        "agent_id": row["agent_id"],
        "conversation_id": row["conversation_id"],
        "namespace": row["namespace"],
        "key": row["key"],
        "content": row["content"],
        "tags": json.loads(row["tags"]),
        "metadata": json.loads(row["metadata"]),
        "importance": row["importance"],
        "access_count": row["access_count"],
        "last_accessed_at": from_epoch(row["last_accessed_at"]),
        "expires_at": from_epoch(row["expires_at"]),
        "deleted_at": from_epoch(row["deleted_at"]),
        "created_at": from_epoch(row["created_at"]),
        "updated_at": from_epoch(row["updated_at"]),
        "occurred_at": from_epoch(row["occurred_at"]),
    }


def _ordered_memories(rows: list[sqlite3.Row], scores: dict[int, float]) -> list[Memory]:
    by_pk = {row["pk"]: row for row in rows}
    memories = []
    for pk, score in scores.items():
        if pk in by_pk:
            memory = _memory_from_row(by_pk[pk])
            memory["score"] = round(score, 6)
            memories.append(memory)
    return memories


def _knowledge_from_row(row: sqlite3.Row, score: float) -> Knowledge:
    return {
        "id": f"{row['doc_id']}#{row['chunk_index']}",
        "doc_id": row["doc_id"],
        "category": row["category"],
        "title": row["title"],
        "content": row["content"],
        "chunk_index": row["chunk_index"],
        "metadata": json.loads(row["metadata"]),
        "created_at": from_epoch(row["updated_at"]),
        "score": round(score, 6),
    }


def _document_from_row(row: sqlite3.Row) -> KnowledgeDocument:
    return {
        "doc_id": row["doc_id"],
        "category": row["category"],
        "title": row["title"],
        "metadata": json.loads(row["metadata"]),
        "chunk_count": row["chunk_count"],
        "created_at": from_epoch(row["created_at"]),
        "updated_at": from_epoch(row["updated_at"]),
    }


def _is_lock_contention(exc: sqlite3.Error) -> bool:
    message = str(exc)
    return "locked" in message or "busy" in message


def _contract_error(exc: sqlite3.Error) -> MemoryDriverError:
    message = str(exc)
    if "no such table" in message or "no such column" in message:
        return SchemaNotMigratedError(f"the SQLite schema is missing or outdated ({message}): "
                                      "run `python migrate.py`")
    if "locked" in message or "busy" in message:
        return BackendUnavailableError(f"the SQLite database stayed locked by another writer "
                                       f"past busy_timeout ({message})")
    return BackendUnavailableError(f"SQLite error: {message}")
