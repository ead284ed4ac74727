"""The ``pgvector`` driver: PostgreSQL with the pgvector extension, for production scale.

Needs the ``pgvector`` extra (``pip install -e '.[pgvector]'``: psycopg 3 and psycopg_pool) and a
database migrated with ``python migrate.py --database pgvector``; the driver issues no DDL,
except ``reembed``'s swap (see ``pgvector_transfer.py``), which changes the vector columns' size.

How it works:
- One ``psycopg_pool.ConnectionPool`` (``DATABASE_URL``), opened on first use. Every checkout
  checks its connection, so after a server restart or killed backends the next call gets a fresh
  one; a call that fails on the way raises ``BackendUnavailableError``, and so does a pool with
  no free connection after ``MEMORY_PG_POOL_TIMEOUT`` seconds, instead of hanging.
- Vectors are sent in pgvector's binary format (``_BinaryVector``): no type registration is
  needed (the statement's ``::vector`` cast types the parameter, so a pool opened before
  ``migrate`` keeps working after it), and nothing is formatted as text. The text literal it
  replaced cost ~1-2 ms per 384-d vector in Python alone: most of ``store_many``'s database
  side, and of a recall's.
- ``store_many`` is one transaction, pipelined ``INSERT ... ON CONFLICT`` (upsert by key),
  each chunk of embeddings computed while the chunk before is written; the rows are written
  grouped by user, so that ``memory_counts``' commit-time triggers lock the users' counters in
  one order in every batch (no deadlock between two batches for the same users).

Recall, and why it is built this way (profiled with ``python -m bench.pgvector_recall
--explain`` at 1k, 10k, 100k memories of one user and 100 users x 1k; figures in the README):
- Two statements, each its own transaction on the pooled connection switched to autocommit (no
  BEGIN and COMMIT round trips: on a loaded machine each cost 1-6 ms, as much as the search).
  The first (``_candidate_query``) reads the scope's size and counts each query term's rows in
  it (the statistics of ``ranking.KeywordStats``: the user's own rows only, so other users' data
  never moves a ranking), picks the keyword and vector candidates and returns each with its
  importance, times, cosine and the query terms it holds. Ranking then runs in Python,
  ``ranking.py``'s code, the very code the SQLite driver runs (same scores on both drivers, by
  construction; the neighbours of the top hits are read by one more statement when they spread).
  The second statement reads the chosen rows; their accesses are counted by ``pgvector_access``
  and written in batches off the recall's path (~0.5 ms of a ~5 ms recall at 10k memories when
  the recall wrote them itself; the records still show the new counts, and every other verb of
  this process reads them). The statements' text is constant per filter combination and
  candidate depth, so psycopg prepares them after a few calls (parsed once). A recall's
  statements run on their generic plans (``plan_cache_mode = force_generic_plan``), planned once
  per connection instead of on every call (~0.6-1 ms at 10k memories for the candidate
  statement). The setting travels in the pool's check, a round trip every checkout makes anyway,
  which sets the plan choice each checkout asks for (``_check_connection``): a recall with a
  query gets generic plans, any other use the default back (a ``SET`` of its own and a ``RESET``
  after it cost a recall ~0.15 ms each). The candidate statement's generic plan is as good as a
  custom one because the candidate depth is written into the text as each LIMIT: with the LIMITs
  as parameters the generic plan must guess how many rows they keep, and recall took 10.9
  against 6.8 ms on it (10k memories, interleaved); with them written in, 5.8 against 6.8 ms for
  the custom plans (same lists, same scores). Every other estimate it needs is the same either
  way: the scope's size and the terms' counts are computed inside the statement, which no plan
  knows in advance.
- Settings: ``hnsw.ef_search`` = the candidate depth, at least ``MIN_EF_SEARCH`` (64; the
  depth is 50 for top_k <= 12), pgvector 0.8's
  ``hnsw.iterative_scan = strict_order`` (so filtering by user cannot leave the result short)
  are set by ``set_config(..., true)`` inside the statement, before any scan starts (the
  access-count write sets ``synchronous_commit = off`` the same way: bookkeeping, not worth a
  WAL flush).
  Parallel workers and JIT are decided at planning, so they are off for the whole pooled session
  (``_configure_session``): at 100k rows the planner gave the never-run exact branch a parallel
  plan, and starting its two workers alone cost ~23 ms a recall.
- Exact or index: the scope's size decides. For a whole user (no filter beyond the user) it is
  read from ``memory_counts`` (kept by triggers, migration 2026_12_04_000001) less the user's
  expired memories (an index range over those only): constant time. It was counted from the
  (user_id, deleted_at, expires_at) index: ~1.3-1.6 ms at 10k memories and growing with the
  user, and recall's own access-count writes clear the pages' all-visible bits, so that
  "index-only" scan visited the table for a fifth of the rows. A filtered scope is still
  counted. A scope of at most ``exact_scan_max_rows`` rows (the usual case: one user's
  memories in a shared table) is scanned and sorted exactly; a larger one goes through the HNSW
  index, whose graph the 2026_11_29 migration made denser (m 32, ef_construction 128): at
  ef_search 50 its top 10 is the exact top 10 for 98% of the benchmark's queries on 100k
  memories, against 87% with pgvector's defaults (16, 64), which no ef_search up to 160 brought
  above 92%. The graph differs with each build (its levels are drawn at random), and
  bench.pgvector_recall's rebuilt graphs gave 94-98% at ef_search 50; on one graph (400
  queries, 100k memories) the exact top 10 was among the 50 candidates for 97.5% of them at
  ef_search 50 and 98.5% at 64, for ~0.2 ms more: hence ``MIN_EF_SEARCH``.
- Keyword side: each query term's holders in the scope are read as (term, row) pairs
  (``hold``, ``_holders``); they give each term's count (the statistics) and the keyword
  candidates: rows holding a searched term (``KeywordStats.searched``), best idf-weighted
  coverage first, ties to the newest stored. For a whole user the pairs come from
  ``memory_terms`` (user, lexeme, memory, expiry; kept by triggers, migration
  2026_12_06_000001): an index-only range per term. Through the GIN index, which a filtered
  scope still uses, every holder's row is read from the table to test the scope: at 100k
  memories five words in 3-5% of the rows each were ~15k rows on ~7,600 pages, and the
  candidate statement took ~31 ms against ~16 ms from ``memory_terms`` (at 10k, recall 4.46
  against 4.00 ms p50, ``bench.recall_ab``, interleaved).
  One hash aggregate over the pairs (``holders``) gives every holder its coverage and the
  terms it holds, which the candidates then take from it (a second pass over the pairs for
  the candidates' terms cost ~0.25 ms more at 10k). The terms held travel as bit masks
  (``_held_masks``): gathered with ``array_agg``, which takes a memory context per row, the
  aggregate spilled to disk at 100k memories, and the statement took ~27 against ~22 ms
  (interleaved, same rows). An earlier pass read the union of the holders and tested every
  query term against each row's tsvector in a per-row subplan: 5.0 against 4.1 ms for the
  candidate statement at 10k memories, same rows. (The planner's table-wide statistics, used
  before to skip frequent words, made the ranking depend on other users' data and change
  after an ``ANALYZE``.) Unlike SQLite's, this pass reads every holder of a common word too:
  stopping a term's scan at the common share plus one, as SQLite does, made the statement
  ~0.5 ms slower at 10k (its planning and the second pass it needs when every held word is
  common cost more than the rows it saved), so it was left out. At 100k memories the pairs
  and their aggregate are still most of the recall.
- The access-count write (``_ACCESS_WRITE``) stays a HOT update (no index touched) because the
  2026_11_29 migration leaves half of each page free (fillfactor 50): a row is ~1.9 kB, and at
  fillfactor 85 half of these updates found no room on their page and inserted into every index,
  HNSW included (at 10k memories the recall statement took ~34 ms with the write against ~14 ms
  without it on the loaded machine; with fillfactor 50, 99% of the updates were HOT and the
  write ~2 ms).
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import numpy as np

from app.core.database.migrator import migrations_dir
from app.core.memory import ranking
from app.core.memory.base import BaseMemoryDriver, Progress
from app.core.memory.chunking import chunk_text
from app.core.memory.cursors import CURSOR_GONE, decode_cursor, encode_cursor, listing_scope
from app.core.memory.drivers import pgvector_transfer as transfer
from app.core.memory.drivers.pgvector_access import AccessCounts, Pending
from app.core.memory.drivers.pgvector_connection import (
    check_url,
    connection_cause,
    guard_pool_log,
)
from app.core.memory.drivers.support import EmbeddingSupport, claim_user_id
from app.core.memory.embeddings import (
    Embedder,
    identity_check,
    identity_mismatch,
)
from app.core.memory.errors import (
    BackendUnavailableError,
    InvalidInputError,
    MemoryDriverError,
    MissingDependencyError,
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
    RecallFilters,
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
from config.settings import redact_secrets, redact_url

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

#: The schema the driver needs, all of it (every memory read selects ``occurred_at``; recall
#: reads ``memory_counts`` and ``memory_terms``).
REQUIRED_MIGRATION = "2026_12_06_000001_add_memory_terms"
#: The least ``hnsw.ef_search`` of a recall through the HNSW index (see the module docstring).
MIN_EF_SEARCH = 64
#: A memory row as ``_memory_from_row`` reads it (by position: add columns at the end only).
_MEMORY_COLUMNS = (
    "m.pk, m.id, m.user_id, m.agent_id, m.conversation_id, m.namespace, m.key, m.content, "
    "m.tags, m.metadata, m.importance, m.access_count, m.last_accessed_at, m.expires_at, "
    "m.deleted_at, m.created_at, m.updated_at, m.occurred_at"
)
_UPSERT_MEMORY = (
    "INSERT INTO memories AS m (id, user_id, agent_id, conversation_id, namespace, key, content, "
    "tags, metadata, importance, expires_at, created_at, updated_at, occurred_at, embedding) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::text[], %s, %s, %s, %s, %s, %s, %s::vector) "
    "ON CONFLICT (user_id, COALESCE(agent_id, ''), namespace, key) WHERE key IS NOT NULL "
    "DO UPDATE SET conversation_id = EXCLUDED.conversation_id, content = EXCLUDED.content, "
    "tags = EXCLUDED.tags, metadata = EXCLUDED.metadata, importance = EXCLUDED.importance, "
    "expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at, "
    "occurred_at = EXCLUDED.occurred_at, embedding = EXCLUDED.embedding, deleted_at = NULL "
    f"RETURNING {_MEMORY_COLUMNS}"
)


def _translate_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Turn psycopg and pool exceptions escaping a public verb into the contract's errors."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        except MemoryDriverError:
            raise
        except Exception as exc:
            if not type(exc).__module__.startswith(("psycopg", "psycopg_pool")):
                raise
            raise _contract_error(exc, args[0]) from exc
        finally:
            driver = args[0]
            log_if_slow(logger, getattr(driver, "name", "pgvector"), method.__name__, started,
                        getattr(driver, "slow_operation_ms", DEFAULT_SLOW_OPERATION_MS))

    return wrapper


class PgvectorDriver(EmbeddingSupport, BaseMemoryDriver):
    """Memories, knowledge and users in PostgreSQL + pgvector (see the module docstring)."""

    name = "pgvector"
    #: Verbs slower than this (ms) are logged at WARNING; 0: never (``MEMORY_SLOW_OPERATION_MS``).
    slow_operation_ms: int = DEFAULT_SLOW_OPERATION_MS

    def __init__(self, *, url: str | None = None, pool: Any = None,
                 embedder: Embedder | None = None, pool_min_size: int = 1,
                 pool_max_size: int = 10, pool_timeout: float = 5.0,
                 connect_timeout: float = 5.0, exact_scan_max_rows: int = 5_000,
                 retention: timedelta = timedelta(days=30),
                 weights: ranking.FusionWeights = ranking.DEFAULT_WEIGHTS,
                 access_flush_seconds: float = 1.0) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise MissingDependencyError(
                "the pgvector driver needs psycopg and psycopg_pool: "
                "pip install -e '.[pgvector]'"
            ) from exc
        if pool is None and not url:
            raise InvalidInputError("url must be a PostgreSQL URL (or pass pool=)")
        _register_vector_dumper()
        if url:
            check_url(url)  # a string libpq cannot read is refused now, never quoted
            guard_pool_log(url)
        self.url = redact_url(url or "")
        # Kept only to ask the server directly why connecting fails; never printed.
        self._conninfo = url or None
        self._connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        self._pool = pool or ConnectionPool(
            url or "", min_size=pool_min_size, max_size=max(pool_min_size, pool_max_size),
            timeout=pool_timeout, open=False, check=_check_connection,
            configure=_configure_session,
            kwargs={"connect_timeout": max(1, math.ceil(connect_timeout))},
            name="memory-pgvector",
        )
        #: Whether every checkout sets the plan choice its user asks for (this driver's own pool
        #: does, in its check: ``_check_connection``); with a pool given, recall sets its own.
        self._pool_sets_plans = pool is None
        self._embedder = embedder
        self._exact_scan_max_rows = exact_scan_max_rows
        self._retention = retention
        self._weights = weights
        self._lock = threading.Lock()
        self._opened = False
        self._closed = False
        self._schema_checked = False
        self._identity_checked = False
        self._accesses = AccessCounts(access_flush_seconds)
        _drivers.add(self)  # so that interpreter exit writes its pending access counts

    @classmethod
    def from_settings(cls) -> PgvectorDriver:
        """A driver configured from ``DATABASE_URL`` and the ``MEMORY_PG_*`` settings."""
        from config.settings import get_settings

        settings = get_settings()
        driver = cls(
            url=settings.database_url, pool_min_size=settings.pg_pool_min_size,
            pool_max_size=settings.pg_pool_max_size, pool_timeout=settings.pg_pool_timeout,
            connect_timeout=settings.pg_connect_timeout,
            exact_scan_max_rows=settings.pg_exact_scan_max_rows,
            retention=timedelta(days=settings.soft_delete_retention_days),
            access_flush_seconds=settings.pg_access_flush_seconds,
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
        now = _utcnow()
        scope, params = _memory_scope(filters, now)
        with self._connection(own_accesses=False, generic_plans=text is not None) as conn:
            if conn.info.transaction_status:  # not idle: the first call's schema check
                conn.commit()
            # Each statement its own transaction: no BEGIN and COMMIT round trips (on a busy
            # machine each costs as much as the search); its settings are local to it.
            conn.autocommit = True
            try:
                if text is None:
                    # The newest first.
                    ranked = [(row[0], 1.0) for row in conn.execute(
                        f"SELECT m.pk FROM memories m WHERE {scope} "
                        "ORDER BY m.occurred_at DESC, m.created_at DESC, m.pk DESC LIMIT %(limit)s",
                        {**params, "limit": top_k}).fetchall()]
                else:
                    candidates = self._candidate_rows(conn, _MEMORIES, scope, params, text,
                                                      query_vector, top_k,
                                                      whole_user=not filters.narrows)
                    # The neighbours' details come with them, in the same statement.
                    nearby: dict[int, ranking.Candidate] = {}
                    ranked = ranking.rank_candidates(
                        candidates, top_k, self._weights, use_vector=query_vector is not None,
                        window=window_named_by(text, when.reference_time),
                        neighbours_of=lambda hits, distance: _neighbours(
                            conn, hits, distance, now, (scope, params), nearby),
                        details_of=lambda pks: {pk: nearby[pk] for pk in pks if pk in nearby})
                # The accesses are counted by pgvector_access (written off this path); the
                # rows are read with the counts pending, so that the records show the new
                # values.
                around = (_neighbours(conn, [pk for pk, _ in ranked], when.context, now)
                          if when.context else {})
                with self._accesses.reading():
                    rows = conn.execute(
                        f"SELECT {_MEMORY_COLUMNS} FROM memories m WHERE m.pk = ANY(%s)",
                        ([pk for pk, _ in ranked],)).fetchall() if ranked else []
                    earlier = self._accesses.record([row[0] for row in rows], now)
                    context_rows = {row[0]: row for row in conn.execute(
                        f"SELECT {_MEMORY_COLUMNS} FROM memories m WHERE m.pk = ANY(%s)",
                        ([pk for pks in around.values() for pk in pks],)).fetchall()
                    } if around else {}
                    context_pending = self._accesses.pending_of(list(context_rows))
            finally:
                if not conn.closed:  # a broken connection is discarded by the pool anyway
                    conn.autocommit = False
        if rows:
            self._accesses.start(self._write_pending_accesses)
        by_pk = {row[0]: row for row in rows}
        memories: list[Memory] = []
        for pk, score in ranked:
            if pk in by_pk:
                memory = _memory_from_row(by_pk[pk], (earlier[pk] + 1, now))
                memory["score"] = round(score, 6)
                if when.context:
                    memory["context"] = [
                        _memory_from_row(context_rows[near], context_pending.get(near))
                        for near in around.get(pk, []) if near in context_rows]
                memories.append(memory)
        return memories

    @_translate_errors
    def recall_global_knowledge(
        self, query: str, top_k: int = 5, category: str | None = None
    ) -> list[Knowledge]:
        text = check_text(query, "query", max_chars=MAX_QUERY_CHARS)
        top_k = check_top_k(top_k)
        category = check_optional_id(category, "category")
        query_vector = self._embed_query(text)
        scope, params = ("d.category = %(category)s", {"category": category}) if category else (
            "TRUE", {})
        with self._connection(own_accesses=False, generic_plans=True) as conn, conn.pipeline():
            candidates = self._candidate_rows(conn, _KNOWLEDGE, scope, params, text,
                                              query_vector, top_k)
            ranked = ranking.rank_candidates(candidates, top_k, self._weights)
            rows = conn.execute(
                f"SELECT {_KNOWLEDGE.columns} FROM {_KNOWLEDGE.source} WHERE m.pk = ANY(%s)",
                ([pk for pk, _ in ranked],)).fetchall() if ranked else []
        by_pk = {row[0]: row for row in rows}
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
        with self._connection() as conn:
            self._check_written_identity(conn)
            row = conn.execute(_UPSERT_MEMORY, _upsert_params(draft, vectors[0], now)).fetchone()
        return _memory_from_row(row)

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
        now = _utcnow()
        with self._connection() as conn:
            self._check_written_identity(conn)
            # One statement per step, one transaction: readers see the old chunks or the new.
            document = conn.execute(
                "INSERT INTO knowledge_documents (doc_id, category, title, metadata, chunk_count, "
                "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (doc_id) DO UPDATE SET category = EXCLUDED.category, "
                "title = EXCLUDED.title, metadata = EXCLUDED.metadata, "
                "chunk_count = EXCLUDED.chunk_count, updated_at = EXCLUDED.updated_at "
                "RETURNING pk, doc_id, category, title, metadata, chunk_count, created_at, "
                "updated_at",
                (doc_id, draft.category, draft.title, _jsonb(meta), len(chunks), now, now),
            ).fetchone()
            conn.execute("DELETE FROM knowledge_chunks WHERE document_pk = %s", (document[0],))
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO knowledge_chunks (document_pk, chunk_index, content, embedding) "
                    "VALUES (%s, %s, %s, %s::vector)",
                    [(document[0], index, chunk, _vector_param(vector))
                     for index, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True))],
                )
        return _document_from_row(document[1:])

    @_translate_errors
    def delete(self, memory_id: str, user_id: str | None = None) -> bool:
        return self._set_deleted(memory_id, user_id, deleted=True)

    def health_check(self) -> HealthReport:
        started = time.perf_counter()
        checks: dict[str, Any] = {"database": {"url": self.url}}
        status = "ok"
        try:
            self._open_pool()
            with self._pool.connection(timeout=min(self.pool_timeout, 5.0)) as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
                checks["database"].update(status="ok", server_version=version)
                row = conn.execute(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
                checks["pgvector"] = {"status": "ok" if row else "missing",
                                      "version": row[0] if row else None}
                checks["migrations"] = _migration_check(conn)
                checks["embedding"] = identity_check(_stored_identity(conn), self.embedder)
            if checks["migrations"]["status"] == "not_migrated" or not row:
                status = "down"
            elif checks["migrations"]["status"] != "ok" or checks["embedding"]["status"] not in (
                    "ok", "unrecorded"):
                status = "degraded"
        except Exception as exc:  # noqa: BLE001 - health_check reports, it never raises
            status = "down"
            error = exc if isinstance(exc, MemoryDriverError) else _contract_error(exc, self)
            checks["database"].update(status="down", error=str(error))
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
        with self._connection() as conn:
            row = conn.execute(
                f"SELECT {_MEMORY_COLUMNS} FROM memories m WHERE {_BY_ID}"
                " AND (%(deleted)s OR m.deleted_at IS NULL)",
                {"id": memory_id, "user": user_id, "now": _utcnow(), "deleted": include_deleted},
            ).fetchone()
        return _memory_from_row(row) if row else None

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
        assignments = ["updated_at = %(now)s"]
        values: dict[str, Any] = {"id": memory_id, "user": user_id, "now": now}
        for column, value, cast in (
            ("content", changes.content, ""),
            ("tags", changes.tags, "::text[]"),
            ("metadata", None if changes.metadata is None else _jsonb(changes.metadata), ""),
            ("importance", changes.importance, ""),
            ("expires_at", changes.expires_at, ""),
            ("occurred_at", changes.occurred_at, ""),
            ("embedding", None if vector is None else _vector_param(vector), "::vector"),
        ):
            if value is not None:
                assignments.append(f"{column} = %({column})s{cast}")
                values[column] = value
        if changes.clear_expiry:
            assignments.append("expires_at = NULL")
        if changes.is_empty:
            assignments = ["updated_at = m.updated_at"]
        with self._connection() as conn:
            if vector is not None:
                self._check_written_identity(conn)
            row = conn.execute(
                f"UPDATE memories m SET {', '.join(assignments)} "
                f"WHERE {_BY_ID} AND m.deleted_at IS NULL RETURNING {_MEMORY_COLUMNS}",
                values,
            ).fetchone()
        return _memory_from_row(row) if row else None

    @_translate_errors
    def store_many(self, items: Iterable[MemoryInput]) -> list[Memory]:
        now = _utcnow()
        given = prepare_store_many(items, now=now)
        if not given:
            return []
        # Written grouped by user (stable: a key's last write still wins). At the commit,
        # memory_counts' triggers lock each user's counter in the order of the writes, so two
        # batches for the same users cannot lock them in opposite orders (a deadlock).
        order = sorted(range(len(given)), key=lambda i: given[i].user_id)
        drafts = [given[i] for i in order]
        # Chunk i+1 is encoded while chunk i is written, all in one transaction; the first
        # chunk is encoded before a connection is taken from the pool.
        chunks = self._embed_in_chunks([draft.content for draft in drafts])
        vectors: np.ndarray | None = next(chunks)
        rows: list[tuple[Any, ...]] = []
        with self._connection() as conn, conn.cursor() as cursor:
            self._check_written_identity(conn)
            while vectors is not None:
                part = drafts[len(rows):len(rows) + len(vectors)]
                cursor.executemany(
                    _UPSERT_MEMORY,
                    [_upsert_params(draft, vector, now)
                     for draft, vector in zip(part, vectors, strict=True)],
                    returning=True,
                )
                while True:
                    rows.append(cursor.fetchone())
                    if not cursor.nextset():
                        break
                vectors = next(chunks, None)
        written = dict(zip(order, rows, strict=True))
        return [_memory_from_row(written[i]) for i in range(len(given))]

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
        scope, params = _memory_scope(filters, _utcnow(), include_deleted=include_deleted)
        with self._connection() as conn:
            # The cursor names the user's own last memory, not the table's key: look its key up
            # inside this user, so a cursor never reaches another user's rows.
            before = None if after_id is None else _cursor_anchor(conn, after_id, filters.user_id)
            rows = conn.execute(
                f"SELECT {_MEMORY_COLUMNS} FROM memories m WHERE {scope} "
                "AND (%(before)s::bigint IS NULL OR m.pk < %(before)s) "
                "ORDER BY m.pk DESC LIMIT %(limit)s",
                {**params, "before": before, "limit": limit + 1},
            ).fetchall()
        has_more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [_memory_from_row(row) for row in rows],
                "next_cursor": encode_cursor(rows[-1][1], listing) if has_more else None}

    @_translate_errors
    def restore(self, memory_id: str, user_id: str | None = None) -> bool:
        return self._set_deleted(memory_id, user_id, deleted=False)

    @_translate_errors
    def forget_user(self, user_id: str) -> int:
        user_id = check_id(user_id, "user_id")
        with self._connection() as conn:
            erased = conn.execute("DELETE FROM memories WHERE user_id = %s", (user_id,)).rowcount
            conn.execute("DELETE FROM users WHERE user_id = %s", (user_id,))
        return int(erased)

    @_translate_errors
    def purge(self, *, retention: timedelta | None = None) -> int:
        retention = check_retention(retention, self._retention)
        now = _utcnow()
        with self._connection() as conn:
            return int(conn.execute(
                "DELETE FROM memories WHERE (expires_at IS NOT NULL AND expires_at <= %s) "
                "OR (deleted_at IS NOT NULL AND deleted_at <= %s)",
                (now, now - retention),
            ).rowcount)

    @_translate_errors
    def delete_knowledge(self, doc_id: str) -> bool:
        doc_id = check_id(doc_id, "doc_id")
        with self._connection() as conn:
            return conn.execute("DELETE FROM knowledge_documents WHERE doc_id = %s",
                                (doc_id,)).rowcount > 0

    @_translate_errors
    def stats(self, user_id: str | None = None) -> dict[str, Any]:
        user_id = check_optional_id(user_id, "user_id")
        with self._connection() as conn:
            counts = _memory_counts(conn, user_id, _utcnow())
            result: dict[str, Any] = {"driver": self.name, "memories": counts}
            if user_id is None:
                result["users"] = conn.execute(
                    "SELECT COUNT(*) FROM (SELECT user_id FROM memories UNION "
                    "SELECT user_id FROM users) AS known").fetchone()[0]
                documents, chunks = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(chunk_count), 0) FROM knowledge_documents"
                ).fetchone()
                result["knowledge"] = {"documents": documents, "chunks": int(chunks)}
                result["embedding"] = _stored_identity(conn)
                result["database"] = {"url": self.url}
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
        stored_profile = check_json_object(profile, "profile", max_bytes=MAX_PROFILE_BYTES)
        now = _utcnow()

        def insert(candidate: str) -> bool:
            with self._connection() as conn:
                return conn.execute(
                    "INSERT INTO users (user_id, display_name, profile, created_at, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (user_id) DO NOTHING",
                    (candidate, name, _jsonb(stored_profile), now, now),
                ).rowcount > 0

        user = self.get_user(claim_user_id(chosen, insert))
        assert user is not None
        return user

    @_translate_errors
    def get_user(self, user_id: str) -> User | None:
        user_id = check_id(user_id, "user_id")
        with self._connection() as conn:
            row = conn.execute(
                "SELECT display_name, profile, created_at, updated_at FROM users "
                "WHERE user_id = %s", (user_id,)).fetchone()
            counts = _memory_counts(conn, user_id, _utcnow())
            first, last = conn.execute(
                "SELECT MIN(created_at), MAX(created_at) FROM memories WHERE user_id = %s",
                (user_id,)).fetchone()
        if row is not None:
            row = (row[0], row[1], _utc(row[2]), _utc(row[3]))
        return user_record(user_id, row, counts, _utc(first), _utc(last))

    @_translate_errors
    def get_profile(self, user_id: str) -> dict[str, Any]:
        user_id = check_id(user_id, "user_id")
        with self._connection() as conn:
            row = conn.execute("SELECT profile FROM users WHERE user_id = %s",
                               (user_id,)).fetchone()
        return dict(row[0]) if row else {}

    @_translate_errors
    def set_profile(
        self, user_id: str, profile: dict[str, Any], *, merge: bool = False
    ) -> dict[str, Any]:
        user_id = check_id(user_id, "user_id")
        if profile is None:
            raise InvalidInputError("profile must be a dict (got None)")
        new = check_json_object(profile, "profile", max_bytes=MAX_PROFILE_BYTES)
        merge = check_bool(merge, "merge")
        now = _utcnow()
        with self._connection() as conn:
            row = conn.execute("SELECT profile FROM users WHERE user_id = %s FOR UPDATE",
                               (user_id,)).fetchone()
            stored = {**row[0], **new} if merge and row else new
            stored = check_json_object(stored, "profile", max_bytes=MAX_PROFILE_BYTES)
            conn.execute(
                "INSERT INTO users (user_id, profile, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (user_id) DO UPDATE SET "
                "profile = EXCLUDED.profile, updated_at = EXCLUDED.updated_at",
                (user_id, _jsonb(stored), now, now),
            )
        return stored

    # -- moving records ---------------------------------------------------------------------

    @_translate_errors
    def export_records(self, *, user_id: str | None = None,
                       with_embeddings: bool = False) -> Iterator[PortableRecord]:
        user_id = check_optional_id(user_id, "user_id")
        with_embeddings = check_bool(with_embeddings, "with_embeddings")
        with self._connection():
            pass  # the schema check, so that the export's first statement opens its snapshot
        return self._export(user_id, with_embeddings)

    @_translate_errors
    def import_records(self, records: Sequence[PortableRecord], *,
                       vectors_from: dict[str, Any] | None = None) -> list[tuple[int, str]]:
        vectors = self._import_vectors(records, vectors_from)
        refused = []
        with self._connection() as conn:
            self._check_written_identity(conn)
            for index, (record, record_vectors) in enumerate(zip(records, vectors, strict=True)):
                reason = transfer.write_record(conn, record, record_vectors, _vector_literal,
                                               _jsonb)
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
            self._identity_checked = False  # another model may now be recorded

    def close(self) -> None:
        """Write the access counts still pending (best effort), then close the pool."""
        self._accesses.stop()
        with self._lock:
            opened = self._opened and not self._closed
        if opened and self._accesses.has_pending():
            try:
                self._write_pending_accesses()
            except MemoryDriverError as exc:
                logger.warning("closing: the access counts of recent recalls were not written "
                               "(%s)", type(exc).__name__)
        with self._lock:
            opened, self._opened = self._opened, False
            self._closed = True
        if opened:
            self._pool.close()

    # -- private helpers ----------------------------------------------------------------------

    def _open_pool(self) -> None:
        with self._lock:
            if self._closed:
                raise BackendUnavailableError("this PgvectorDriver is closed")
            if not self._opened:
                # One direct attempt first: a certain failure (no such database or role, no
                # server) is reported now with its cause, instead of after the pool's timeout.
                if self._conninfo is not None:
                    cause = connection_cause(self._conninfo, self._connect_timeout)
                    if cause is not None:
                        raise cause
                self._pool.open(wait=False)
                self._opened = True
                logger.info("opened PostgreSQL memory store %s", self.url)  # redacted

    @contextmanager
    def _connection(self, *, own_accesses: bool = True,
                    generic_plans: bool = False) -> Iterator[Any]:
        """A pooled connection inside one transaction (committed on success).

        ``own_accesses`` (every verb but recall): the access counts pending in this process are
        written first, on this connection, so that what the verb reads includes them.
        ``generic_plans`` (a recall with a query): its statements run on generic plans, set by
        the pool's check (``_check_connection``) in the round trip it makes anyway.
        """
        self._open_pool()
        _checkout.generic_plans = generic_plans
        try:
            with self._pool.connection() as conn:
                _checkout.generic_plans = False
                if not self._schema_checked:
                    if _migration_check(conn)["status"] == "not_migrated":
                        raise SchemaNotMigratedError(
                            f"the PostgreSQL database {self.url} is not migrated: run "
                            "`python migrate.py --database pgvector`"
                        )
                    self._schema_checked = True
                if own_accesses and self._accesses.has_pending():
                    self._accesses.write_pending(
                        lambda pending: _write_accesses(conn, pending))
                yield conn
        finally:
            _checkout.generic_plans = False

    @_translate_errors
    def _write_pending_accesses(self) -> None:
        """Write the access counts pending in this process (the access thread, ``close``)."""
        with self._connection():
            pass

    def _check_written_identity(self, conn: Any) -> None:
        """Refuse a vector write unless the recorded model is this driver's (another process may
        have re-embedded the store since this one checked). ``FOR SHARE`` holds a re-embed's swap
        off until this write's transaction ends. Added for issue 15 (faults)."""
        row = conn.execute("SELECT model, dimension FROM embedding_identity WHERE id = 1 "
                           "FOR SHARE").fetchone()
        model, dimension = self.embedder.model_name, self.embedder.dimension
        if row is not None and (row[0], row[1]) != (model, dimension):
            stored = {"model": row[0], "dimension": row[1]}
            raise identity_mismatch(self._identity_location, stored, model, dimension)

    def _set_deleted(self, memory_id: str, user_id: str | None, *, deleted: bool) -> bool:
        """Soft-delete (or restore) one unexpired memory; whether it changed state."""
        memory_id, user_id = check_by_id(memory_id, user_id)
        with self._connection() as conn:
            cursor = conn.execute(
                "UPDATE memories SET deleted_at = CASE WHEN %(deleted)s THEN %(now)s END, "
                "updated_at = %(now)s "
                "WHERE id = %(id)s AND (%(user)s::text IS NULL OR user_id = %(user)s) "
                "AND (deleted_at IS NULL) = %(deleted)s "
                "AND (expires_at IS NULL OR expires_at > %(now)s)",
                {"now": _utcnow(), "id": memory_id, "user": user_id, "deleted": deleted},
            )
        return cursor.rowcount > 0

    def _export(self, user_id: str | None, with_embeddings: bool) -> Iterator[PortableRecord]:
        try:
            with self._connection() as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield from transfer.read_users(conn, user_id)
                yield from transfer.read_memories(conn, user_id, with_embeddings,
                                                  _memory_from_row)
                if user_id is None:
                    yield from transfer.read_documents(conn, with_embeddings)
        except MemoryDriverError:
            raise
        except Exception as exc:
            if not type(exc).__module__.startswith(("psycopg", "psycopg_pool")):
                raise
            raise _contract_error(exc, self) from exc

    def _reembed_begin(self, model: str, dimension: int) -> ReembedStart:
        with self._connection() as conn:
            return transfer.reembed_begin(conn, model, dimension)

    def _reembed_pending(self, corpus: str, after_pk: int, limit: int) -> list[tuple[int, str]]:
        with self._connection() as conn:
            return transfer.reembed_pending(conn, corpus, after_pk, limit)

    def _reembed_stage(self, corpus: str, rows: list[tuple[int, str]],
                       vectors: np.ndarray) -> None:
        with self._connection() as conn:
            transfer.reembed_stage(conn, corpus, rows, [_vector_literal(v) for v in vectors])

    def _reembed_finish(self, model: str, dimension: int,
                        embed: Callable[[list[str]], np.ndarray]
                        ) -> tuple[dict[str, Any] | None, int]:
        with self._connection() as conn:
            return transfer.reembed_finish(
                conn, model, dimension,
                lambda texts: [_vector_literal(vector) for vector in embed(texts)])

    def _record_identity(self, model: str, dimension: int) -> dict[str, Any] | None:
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO embedding_identity (id, model, dimension) VALUES (1, %s, %s) "
                "ON CONFLICT (id) DO NOTHING", (model, dimension))
            return _stored_identity(conn)

    @property
    def _identity_location(self) -> str:
        return self.url

    def _candidate_rows(self, conn: Any, corpus: _Corpus, scope: str, params: dict[str, Any],
                        text: str, query_vector: np.ndarray | None, top_k: int, *,
                        whole_user: bool = False) -> dict[int, ranking.Candidate]:
        """Every candidate with its importance, recency, id, time, cosine and keyword
        coverage (from the scope's own term statistics, ``ranking.KeywordStats``), by pk."""
        terms = ranking.query_terms(text)
        sql, values = _candidate_query(corpus, scope, params, terms, query_vector, top_k,
                                       self._exact_scan_max_rows, whole_user)
        # Generic plans (see the module docstring): this driver's own pool set them in the
        # checkout's check (``_connection(generic_plans=True)``); a pool given is told here.
        if not self._pool_sets_plans:
            conn.execute(_GENERIC_PLANS)
        try:
            rows = conn.execute(sql, values).fetchall()
        finally:
            if not self._pool_sets_plans and not conn.closed:
                conn.execute("RESET plan_cache_mode")
        if not rows:
            return {}
        stats = ranking.KeywordStats(int(rows[0][7]), dict(zip(terms, rows[0][8], strict=True)))
        weights = stats.weights()
        candidates = {}
        for pk, importance, recency, cosine, public_id, occurred, masks, _, _, talk in rows:
            held_terms = _terms_in_masks(terms, masks)
            candidates[pk] = ranking.Candidate(
                pk, importance, recency, cosine, ranking.keyword_coverage(held_terms, weights),
                public_id, occurred, held_terms, talk)
        return candidates

    def explain_recall(self, user_id: str, text: str, query_vector: np.ndarray | None,
                       top_k: int) -> tuple[str, dict[str, Any]]:
        """The candidate statement and its parameters of a hybrid recall of ``user_id`` (for
        ``bench.pgvector_recall --explain``; not part of the contract)."""
        scope, params = _memory_scope(prepare_filters(user_id), _utcnow())
        return _candidate_query(_MEMORIES, scope, params, ranking.query_terms(text),
                                query_vector, top_k, self._exact_scan_max_rows, whole_user=True)


# -- module helpers -------------------------------------------------------------------------

_BY_ID = ("m.id = %(id)s AND (%(user)s::text IS NULL OR m.user_id = %(user)s) "
          "AND (m.expires_at IS NULL OR m.expires_at > %(now)s)")


@dataclass(frozen=True)
class _Corpus:
    """What differs between searching memories and knowledge chunks (constant SQL only)."""

    source: str
    columns: str
    importance: str
    recency: str
    #: A row's id (the last tie-breaker), its time, and whether it belongs to a conversation.
    public_id: str
    occurred: str
    in_conversation: str


_MEMORIES = _Corpus("memories m", _MEMORY_COLUMNS, "m.importance", "m.created_at", "m.id",
                    "m.occurred_at", "m.conversation_id IS NOT NULL")
_KNOWLEDGE = _Corpus(
    "knowledge_chunks m JOIN knowledge_documents d ON d.pk = m.document_pk",
    "m.pk, m.chunk_index, m.content, d.doc_id, d.category, d.title, d.metadata, d.updated_at",
    "0.5", "d.updated_at", "d.doc_id || '#' || m.chunk_index", "d.updated_at", "FALSE",
)

#: Writes access counts (``pgvector_access``): locks the rows in primary-key order (two writes
#: of overlapping rows would otherwise lock them in their join's order and could deadlock), adds
#: each memory's count and keeps its latest access time. Bookkeeping: its transaction commits
#: with ``synchronous_commit`` off, not waiting for a WAL flush.
_ACCESS_WRITE = (
    "UPDATE memories m SET access_count = m.access_count + a.n, "
    "last_accessed_at = GREATEST(COALESCE(m.last_accessed_at, a.at), a.at) "
    "FROM unnest(%(pks)s::bigint[], %(counts)s::int[], %(ats)s::timestamptz[]) AS a (pk, n, at) "
    "WHERE m.pk = a.pk AND m.pk = ANY(ARRAY(SELECT l.pk FROM memories l, "
    "(SELECT set_config('synchronous_commit', 'off', true)) AS settings "
    "WHERE l.pk = ANY(%(pks)s::bigint[]) ORDER BY l.pk FOR UPDATE OF l))"
)


def _write_accesses(conn: Any, pending: Pending) -> None:
    """Add ``pending`` access counts to the memories (those still there) and commit."""
    pks = sorted(pending)
    conn.execute(_ACCESS_WRITE, {"pks": pks, "counts": [pending[pk][0] for pk in pks],
                                 "ats": [pending[pk][1] for pk in pks]})
    conn.commit()


#: Every driver not yet garbage-collected (closing one twice is harmless).
_drivers: weakref.WeakSet[PgvectorDriver] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """At interpreter exit, close the drivers nobody closed: their pending access counts are
    written."""
    for driver in list(_drivers):
        if not driver._closed:
            driver.close()


#: What a recall's statements run with (see the module docstring).
_GENERIC_PLANS = "SET plan_cache_mode = force_generic_plan"

#: The plan choice the checkout under way on this thread asks for (``_connection``), read by
#: the pool's check, which runs in the thread that checks a connection out.
_checkout = threading.local()


def _check_connection(conn: Any) -> None:
    """The pool's check of a connection on every checkout (``check_connection``: one round
    trip, raising if the connection is gone), which also sets the plan choice the checkout's
    user asked for: generic plans for a recall (``_GENERIC_PLANS``), the default for any other
    verb. So a recall needs no round trip of its own for it, and no setting outlives the
    checkout that asked for it."""
    statement = _GENERIC_PLANS if getattr(_checkout, "generic_plans", False) else (
        "RESET plan_cache_mode")
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        conn.execute(statement)
    finally:
        with suppress(Exception):  # a broken connection: the pool discards it
            conn.autocommit = autocommit


def _configure_session(conn: Any) -> None:
    """Settings of every pooled connection: no parallel workers and no JIT (they are decided
    when a statement is planned, so the recall statement cannot set them itself; see the
    module docstring). The driver's statements are all small, indexed ones."""
    conn.autocommit = True
    conn.execute("SET max_parallel_workers_per_gather = 0")
    conn.execute("SET jit = off")
    conn.autocommit = False


def _candidate_query(corpus: _Corpus, scope: str, params: dict[str, Any], terms: list[str],
                     query_vector: np.ndarray | None, top_k: int, exact_max: int,
                     whole_user: bool = False) -> tuple[str, dict[str, Any]]:
    """The candidate statement and its parameters (``whole_user``: the scope is exactly the
    visible memories of ``params["user_id"]``, ``_memory_scope`` without a filter).

    Its rows: (pk, importance, recency, cosine, public id, occurred, the bit masks of the
    ``terms`` the row holds (``_held_masks``; NULL: none), the scope's row count, each term's
    row count in the scope, whether it belongs to a conversation). The keyword side takes the
    rows holding a searched term (``ranking.KeywordStats.searched``, the same rule in SQL) with
    the best idf-weighted coverage, ties to the newest stored.
    """
    depth = ranking.candidate_depth(top_k)
    values = {**params, "terms": terms, "exact_max": exact_max,
              "ef_search": str(max(MIN_EF_SEARCH, depth)), "common": ranking.COMMON_TERM_SHARE}
    parts = [
        # The scope's size (the keyword statistics' N, and what picks exact search or the
        # index). It also applies the statement's settings (see the module docstring): every
        # branch reads "total" before it starts, and pgvector reads its settings when a scan
        # starts.
        f"total AS (SELECT ({_scope_size(corpus, scope, whole_user)})::float8 AS n, "
        "set_config('hnsw.ef_search', %(ef_search)s, true) "
        "|| set_config('hnsw.iterative_scan', 'strict_order', true) AS settings)",
        # Each query term as the stemmed tsquery the GIN index matches and as its lexemes,
        # which memory_terms holds (both empty for a word the english configuration drops: it
        # matches nothing).
        "q AS (SELECT t.i::int AS i, t.word, plainto_tsquery('english', t.word) AS tsq, "
        "tsvector_to_array(to_tsvector('english', t.word)) AS lexemes "
        "FROM unnest(%(terms)s::text[]) WITH ORDINALITY AS t (word, i))",
        # Each term's holders in the scope, as (term, row) pairs. They give the statistics
        # (each term's count) and the keyword candidates, and every candidate's terms.
        f"hold AS MATERIALIZED ({_holders(corpus, scope, whole_user)})",
        "weighted AS (SELECT q.i, q.word, COALESCE(c.n, 0)::float8 AS n, ln(1 + ((SELECT n FROM "
        "total) - COALESCE(c.n, 0) + 0.5) / (COALESCE(c.n, 0) + 0.5)) AS idf FROM q LEFT JOIN "
        "(SELECT i, COUNT(*) AS n FROM hold GROUP BY i) AS c ON c.i = q.i)",
        # ranking.KeywordStats.kept, in SQL: the terms held by at most the common share of the
        # rows, or all of them when none of those is held by any row.
        "rare AS (SELECT i, n, idf FROM weighted WHERE n <= %(common)s * (SELECT n FROM total))",
        "kept AS (SELECT i, n, idf FROM rare WHERE EXISTS (SELECT 1 FROM rare WHERE n > 0) "
        "UNION ALL SELECT i, n, idf FROM weighted WHERE NOT EXISTS "
        "(SELECT 1 FROM rare WHERE n > 0))",
        # Each term's idf by its index, NULL for a term not kept: the pairs read it by
        # subscript (joined with "kept" instead, 14.9 against 13.7 ms at 100k, interleaved).
        "idfs AS (SELECT ARRAY(SELECT k.idf FROM q LEFT JOIN kept k ON k.i = q.i "
        "ORDER BY q.i) AS idf)",
        # Every holder once, with the query terms it holds and its idf-weighted coverage of
        # the kept ones (NULL: it holds none of those). One pass over the pairs serves both
        # the keyword candidates and every candidate's terms.
        "holders AS MATERIALIZED (SELECT h.pk, sum((SELECT idf FROM idfs)[h.i]) AS coverage, "
        f"{_held_masks(terms)} AS held FROM hold h GROUP BY h.pk)",
        # Candidates: rows holding a kept term, the best coverage first (the division by the
        # kept terms' total idf changes no order), ties to the newest stored.
        "keyword AS (SELECT pk FROM holders WHERE coverage IS NOT NULL "
        f"ORDER BY coverage DESC, pk DESC LIMIT {depth})",
    ]
    union = "SELECT pk FROM keyword"
    cosine = "0.0::float8"
    if query_vector is not None:
        values["vector"] = _vector_param(query_vector)
        parts += [
            # "+ 0" makes the sort key unindexable: an exact scan of the scoped rows.
            f"exact AS (SELECT m.pk FROM {corpus.source} WHERE "
            "(SELECT n <= %(exact_max)s FROM total) "
            f"AND {scope} ORDER BY (m.embedding <=> %(vector)s::vector) + 0 LIMIT {depth})",
            f"indexed AS (SELECT m.pk FROM {corpus.source} WHERE "
            "(SELECT n > %(exact_max)s FROM total) "
            f"AND {scope} ORDER BY m.embedding <=> %(vector)s::vector LIMIT {depth})",
        ]
        union += " UNION SELECT pk FROM exact UNION SELECT pk FROM indexed"
        cosine = "1 - (m.embedding <=> %(vector)s::vector)"
    sql = (
        f"WITH {', '.join(parts)}, candidates AS MATERIALIZED ({union}) "
        f"SELECT m.pk, {corpus.importance}::float8, "
        f"EXTRACT(EPOCH FROM {corpus.recency})::float8, {cosine}, {corpus.public_id}, "
        f"EXTRACT(EPOCH FROM {corpus.occurred})::float8, "
        "h.held, "
        "(SELECT n FROM total), ARRAY(SELECT w.n FROM weighted w ORDER BY w.i), "
        f"{corpus.in_conversation} FROM candidates c JOIN {corpus.source} ON m.pk = c.pk "
        # The query terms each candidate holds (ranking.py reads them for every candidate).
        "LEFT JOIN holders h ON h.pk = m.pk"
    )
    return sql, values


def _holders(corpus: _Corpus, scope: str, whole_user: bool) -> str:
    """SQL for the (term index, row pk) pairs of ``q``'s terms held by rows of ``scope``.

    A whole user's visible memories: from ``memory_terms`` (migration 2026_12_06_000001), an
    index-only range per term, a term of several lexemes ("user_name") held where each of
    them is; the table itself is not read (see the module docstring). Any other scope: one bitmap
    scan of the GIN index per term, whose rows are read to test the scope."""
    if whole_user:
        return ("SELECT q.i, t.pk FROM q CROSS JOIN LATERAL (SELECT t.pk FROM memory_terms t "
                "WHERE t.user_id = %(user_id)s AND t.lexeme = q.lexemes[1] "
                "AND (t.expires_at IS NULL OR t.expires_at > %(now)s) "
                # A subplan under OR, run only for a term of several lexemes (as an anti-join
                # it cost every pair a scan of the others, ~0.1 ms at 10k).
                "AND (cardinality(q.lexemes) < 2 OR NOT EXISTS (SELECT 1 FROM "
                "unnest(q.lexemes[2:]) AS o (lexeme) WHERE NOT EXISTS (SELECT 1 FROM "
                "memory_terms u WHERE u.user_id = %(user_id)s AND u.lexeme = o.lexeme "
                "AND u.pk = t.pk)))) AS t")
    return (f"SELECT q.i, h.pk FROM q CROSS JOIN LATERAL (SELECT m.pk FROM {corpus.source} "
            f"WHERE numnode(q.tsq) > 0 AND m.content_tsv @@ q.tsq AND {scope}) AS h")


#: Query terms per bit mask of the terms a row holds (bigint bits, the sign bit left alone).
_TERMS_PER_MASK = 63


def _held_masks(terms: list[str]) -> str:
    """SQL for the query terms a holder holds (over ``hold h``'s pairs, grouped by row): an
    array of bigint bit masks, bit ``b`` of mask ``j`` for term ``j * 63 + b + 1``.

    A bit mask, not ``array_agg(h.i)``: its state is one fixed-size value per row, while each
    ``array_agg`` state takes a memory context of its own, and at 100k memories (5,000
    holders) the aggregate spilled to disk and took ~8 ms of a ~26 ms statement."""
    masks = []
    for first in range(1, len(terms) + 1, _TERMS_PER_MASK):
        last = first + _TERMS_PER_MASK - 1
        masks.append(f"bit_or(CASE WHEN h.i BETWEEN {first} AND {last} "
                     f"THEN 1::bigint << (h.i - {first}) ELSE 0 END)")
    return f"ARRAY[{', '.join(masks)}]::bigint[]"  # typed: a query may have no terms


def _terms_in_masks(terms: list[str], masks: Sequence[int] | None) -> frozenset[str]:
    """The terms whose bits ``masks`` (``_held_masks``' array, None for no holder) has set."""
    if masks is None:
        return frozenset()
    return frozenset(term for i, term in enumerate(terms)
                     if masks[i // _TERMS_PER_MASK] >> (i % _TERMS_PER_MASK) & 1)


def _scope_size(corpus: _Corpus, scope: str, whole_user: bool) -> str:
    """SQL for how many rows ``scope`` holds. A whole user's visible memories: the user's count
    of memories not deleted (``memory_counts``, kept by triggers) less those expired by
    ``%(now)s``, an index range over the expired ones only; any other scope is counted."""
    if whole_user:
        return ("COALESCE((SELECT c.live FROM memory_counts c WHERE c.user_id = %(user_id)s), 0) "
                "- (SELECT COUNT(*) FROM memories x WHERE x.user_id = %(user_id)s "
                "AND x.deleted_at IS NULL AND x.expires_at <= %(now)s)")
    return f"SELECT COUNT(*) FROM {corpus.source} WHERE {scope}"


def _neighbours(conn: Any, hits: list[int], count: int, now: datetime,
                scope: tuple[str, dict[str, Any]] | None = None,
                details: dict[int, ranking.Candidate] | None = None) -> dict[int, list[int]]:
    """For each memory of ``hits``, the ``count`` visible memories before and after it in its
    conversation (same user and conversation, by ``occurred_at`` then storage order), in that
    order. A memory without a conversation has none. With ``scope`` (a WHERE clause over ``m``
    and its parameters), the neighbours within it are put in ``details`` as unscored
    candidates, read by the same statement."""
    if not hits:
        return {}
    same = ("m.user_id = h.user_id AND m.conversation_id = h.conversation_id "
            "AND m.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > %(now)s)")
    where, params = scope or ("TRUE", {})
    # The count is written in (0..20, a handful of statements): a recall runs this on generic
    # plans, which would have to guess how many rows a parameter LIMIT keeps.
    rows = conn.execute(
        "SELECT h.pk, n.pk, n.importance, EXTRACT(EPOCH FROM n.created_at)::float8, n.id, "
        "EXTRACT(EPOCH FROM n.occurred_at)::float8, n.in_scope "
        "FROM memories h CROSS JOIN LATERAL ("
        f"(SELECT m.pk, m.importance, m.created_at, m.id, m.occurred_at, ({where}) AS in_scope "
        f"FROM memories m WHERE {same} AND (m.occurred_at, m.pk) < (h.occurred_at, h.pk) "
        f"ORDER BY m.occurred_at DESC, m.pk DESC LIMIT {int(count)}) UNION ALL "
        f"(SELECT m.pk, m.importance, m.created_at, m.id, m.occurred_at, ({where}) AS in_scope "
        f"FROM memories m WHERE {same} AND (m.occurred_at, m.pk) > (h.occurred_at, h.pk) "
        f"ORDER BY m.occurred_at, m.pk LIMIT {int(count)})) AS n "
        "WHERE h.pk = ANY(%(hits)s) ORDER BY h.pk, n.occurred_at, n.pk",
        {**params, "hits": hits, "now": now}).fetchall()
    around: dict[int, list[int]] = {hit: [] for hit in hits}
    for hit, pk, importance, recency, public_id, occurred, in_scope in rows:
        around[hit].append(pk)
        if details is not None and in_scope:
            details[pk] = ranking.Candidate(pk, importance, recency, memory_id=public_id,
                                            occurred_at=occurred, in_conversation=True)
    return around


def _memory_scope(filters: RecallFilters, now: datetime, *,
                  include_deleted: bool = False) -> tuple[str, dict[str, Any]]:
    """The WHERE clause (alias ``m``, named parameters) of a user's visible memories."""
    clauses = ["m.user_id = %(user_id)s", "(m.expires_at IS NULL OR m.expires_at > %(now)s)"]
    params: dict[str, Any] = {"user_id": filters.user_id, "now": now}
    if not include_deleted:
        clauses.append("m.deleted_at IS NULL")
    for column, value in (("agent_id", filters.agent_id),
                          ("conversation_id", filters.conversation_id),
                          ("namespace", filters.namespace)):
        if value is not None:
            clauses.append(f"m.{column} = %({column})s")
            params[column] = value
    if filters.min_importance is not None:
        clauses.append("m.importance >= %(min_importance)s")
        params["min_importance"] = filters.min_importance
    if filters.start is not None:
        clauses.append("m.occurred_at >= %(start)s")
        params["start"] = filters.start
    if filters.end is not None:
        clauses.append("m.occurred_at <= %(end)s")
        params["end"] = filters.end
    if filters.tags:
        clauses.append("m.tags @> %(tags)s::text[]")
        params["tags"] = filters.tags
    if filters.exclude_tags:
        clauses.append("NOT (m.tags && %(exclude_tags)s::text[])")
        params["exclude_tags"] = filters.exclude_tags
    return " AND ".join(clauses), params


def _upsert_params(draft: MemoryDraft, vector: np.ndarray, now: datetime) -> tuple[Any, ...]:
    return (uuid.uuid4().hex, draft.user_id, draft.agent_id, draft.conversation_id,
            draft.namespace, draft.key, draft.content, draft.tags, _jsonb(draft.metadata),
            draft.importance, draft.expires_at, now, now,
            # occurred_at defaults to the time of this store (an upsert's too: a new fact).
            draft.occurred_at or now, _vector_param(vector))


def _migration_check(conn: Any) -> dict[str, Any]:
    files = sorted(path.stem for path in migrations_dir("pgvector").glob("*.py")
                   if not path.name.startswith("_"))
    exists = conn.execute("SELECT to_regclass('migrations') IS NOT NULL").fetchone()[0]
    ran = {row[0] for row in conn.execute("SELECT migration FROM migrations")} if exists else set()
    pending = [name for name in files if name not in ran]
    if REQUIRED_MIGRATION not in ran:
        return {"status": "not_migrated", "pending": pending,
                "hint": "run `python migrate.py --database pgvector`"}
    return {"status": "pending" if pending else "ok", "pending": pending}


def _stored_identity(conn: Any) -> dict[str, Any] | None:
    row = conn.execute("SELECT model, dimension FROM embedding_identity WHERE id = 1").fetchone()
    return None if row is None else {"model": row[0], "dimension": row[1]}


def _memory_counts(conn: Any, user_id: str | None, now: datetime) -> dict[str, int]:
    visible, deleted, expired = conn.execute(
        "SELECT "
        "COUNT(*) FILTER (WHERE deleted_at IS NULL AND (expires_at IS NULL OR expires_at > %(n)s)),"
        " COUNT(*) FILTER (WHERE deleted_at IS NOT NULL "
        "AND (expires_at IS NULL OR expires_at > %(n)s)),"
        " COUNT(*) FILTER (WHERE expires_at IS NOT NULL AND expires_at <= %(n)s) "
        "FROM memories WHERE (%(u)s::text IS NULL OR user_id = %(u)s)",
        {"n": now, "u": user_id},
    ).fetchone()
    return {"visible": visible, "deleted": deleted, "expired": expired}


class _BinaryVector:
    """A vector parameter in pgvector's binary format (what ``vector_recv`` reads: dimension and
    a zero as big-endian int16, then big-endian float32 values).

    Formatting 384 floats as text costs ~1 ms in Python (and parsing them again on the server),
    which made the literal most of ``store_many``'s database time; this costs microseconds and
    is exact. It needs no type registration: sent with no type, the parameter takes the type of
    its ``::vector`` cast, which every statement that passes one has.
    """

    __slots__ = ("payload",)

    def __init__(self, vector: np.ndarray) -> None:
        values = np.asarray(vector, dtype=">f4").ravel()
        self.payload = struct.pack(">HH", values.size, 0) + values.tobytes()


_dumper_registered = False


def _register_vector_dumper() -> None:
    """Teach psycopg (process-wide, for ``_BinaryVector`` only) to send it in binary."""
    global _dumper_registered
    if _dumper_registered:
        return
    import psycopg
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class VectorDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: Any) -> bytes:
            payload: bytes = obj.payload
            return payload

    psycopg.adapters.register_dumper(_BinaryVector, VectorDumper)
    _dumper_registered = True


def _vector_param(vector: np.ndarray) -> _BinaryVector:
    return _BinaryVector(vector)


def _vector_literal(vector: np.ndarray) -> str:
    # float32 -> Python float is exact, and repr round-trips, so nothing is lost on the way.
    return str(np.asarray(vector, dtype=np.float32).tolist())


def _jsonb(value: dict[str, Any]) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _cursor_anchor(conn: Any, memory_id: str, user_id: str) -> int:
    """The key of ``user_id``'s memory ``memory_id`` a cursor continues after.

    Raises ``InvalidInputError`` naming ``cursor`` when that memory is gone (purged or erased
    between two pages): the listing cannot continue at a known place and starts over.
    """
    row = conn.execute("SELECT pk FROM memories WHERE id = %s AND user_id = %s",
                       (memory_id, user_id)).fetchone()
    if row is None:
        raise InvalidInputError(CURSOR_GONE)
    return int(row[0])


def _memory_from_row(row: tuple[Any, ...],
                     unwritten: tuple[int, datetime] | None = None) -> Memory:
    """The record of a row of ``_MEMORY_COLUMNS``, with ``unwritten``: the accesses this
    process counted and has not written yet and the last one's time (``pgvector_access``)."""
    count, last = unwritten or (0, None)
    return {
        "id": row[1],
        "user_id": row[2],
        "agent_id": row[3],
        "conversation_id": row[4],
        "namespace": row[5],
        "key": row[6],
        "content": row[7],
        "tags": list(row[8]),
        "metadata": dict(row[9]),
        "importance": float(row[10]),
        "access_count": row[11] + count,
        "last_accessed_at": last or _utc(row[12]),
        "expires_at": _utc(row[13]),
        "deleted_at": _utc(row[14]),
        "created_at": row[15].astimezone(UTC),
        "updated_at": row[16].astimezone(UTC),
        "occurred_at": row[17].astimezone(UTC),
    }


def _knowledge_from_row(row: tuple[Any, ...], score: float) -> Knowledge:
    return {
        "id": f"{row[3]}#{row[1]}",
        "doc_id": row[3],
        "category": row[4],
        "title": row[5],
        "content": row[2],
        "chunk_index": row[1],
        "metadata": dict(row[6]),
        "created_at": row[7].astimezone(UTC),
        "score": round(score, 6),
    }


def _document_from_row(row: tuple[Any, ...]) -> KnowledgeDocument:
    return {
        "doc_id": row[0],
        "category": row[1],
        "title": row[2],
        "metadata": dict(row[3]),
        "chunk_count": row[4],
        "created_at": row[5].astimezone(UTC),
        "updated_at": row[6].astimezone(UTC),
    }


def _contract_error(exc: Exception, driver: Any) -> MemoryDriverError:
    kind = type(exc).__name__
    conninfo = getattr(driver, "_conninfo", None)
    message = redact_secrets(str(exc), conninfo) if conninfo else str(exc)
    if kind == "PoolTimeout":
        # Ask the server directly: a connection that fails has a cause worth more than a wait.
        cause = (connection_cause(conninfo, driver._connect_timeout) if conninfo else None)
        if cause is not None:
            return cause
        return BackendUnavailableError(
            f"no PostgreSQL connection could be had within {driver.pool_timeout}s: every "
            f"pooled connection is busy ({message})")
    if kind in ("UndefinedTable", "UndefinedColumn", "UndefinedObject", "UndefinedFunction"):
        return SchemaNotMigratedError(f"the PostgreSQL schema is missing or outdated ({message}): "
                                      "run `python migrate.py --database pgvector`")
    return BackendUnavailableError(f"PostgreSQL failed ({kind}): {message}")
