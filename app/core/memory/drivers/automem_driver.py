"""The ``automem`` driver: the contract over the AutoMem memory service's HTTP API.

Needs the ``automem`` extra (``pip install -e '.[automem]'``: httpx) and a running AutoMem
(``AUTOMEM_URL`` or ``AUTOMEM_ENDPOINT``, token ``AUTOMEM_API_TOKEN`` or ``AUTOMEM_API_KEY``, sent
as a Bearer token). The service owns its storage and its embeddings: nothing is migrated and no
model is loaded here. The API, and what the real server does that a client must survive, is
``shared/AUTOMEM_API.md``. The mapping of records onto memories is ``automem_mapping``; the
retrying HTTP call is ``automem_http``.

**Where the driver keeps its state, and when it writes it.** The server's enrichment worker
snapshots a new memory's ``tags`` and ``metadata`` and writes them back about 0.2 s later, undoing
any change made in between. So:

- Everything about a memory that never changes (user, agent, conversation, namespace, key,
  created time) and its first tags and metadata are written by the store itself, which the
  snapshot then contains.
- State that changes later lives where enrichment never writes: soft deletion in ``t_valid`` (a
  date after year 9000 that encodes the deletion time), expiry in ``t_invalid``, content,
  importance and ``occurred_at`` (the server's ``timestamp``) in their fields. ``delete``,
  ``restore`` and expiry therefore hold from the moment they return.
- Time: ``occurred_at`` is the server's ``timestamp``; the store time (``created_at``) is in the
  metadata (``automem_mapping``). The server's default ``state_mode=current`` hides a memory
  whose ``timestamp`` lies in the future, which a planned event's ``occurred_at`` does, so recall
  asks for ``state_mode=history`` and drops deleted and expired memories here, as it checks
  every other filter; a page the server filled with such memories is completed from the
  listing like any page the checks shortened.
- Changes that must go into ``tags`` or ``metadata`` (``update`` of tags, metadata or anything
  else, since ``updated_at`` is in the metadata; an upsert by key) wait until the memory's
  enrichment window has passed (``AUTOMEM_ENRICHMENT_WINDOW``, default 0.5 s after the server
  stored it) before they are written. A call made within that window of a store is slower by the
  rest of the window, and then holds. Access counts do not wait: the flusher leaves a memory's
  count pending until its window has passed (see **Access counts** below).
- User records are never patched: ``set_profile`` stores a new record and deletes the old ones,
  and readers take the newest.

The windows left: if the server's enrichment queue has a backlog, a job can start later than
the window, and a tags/metadata change (not deletion, restore, expiry, content or importance) that
lands during that job's own ~0.2 s can still be undone. The driver cannot see the queue; raise
``AUTOMEM_ENRICHMENT_WINDOW`` for a server that is often backlogged. And the batch endpoint takes
no ``t_invalid``: a memory stored with an expiry gets it from a second request in the same call,
so another reader can see an already-expired memory for that one round trip.

**How the rest of the contract maps.**

- **Stores are searchable when they return**: every memory is created with ``POST /memory/batch``
  (one item for ``store``), which embeds before it answers; ``POST /memory`` embeds in the
  background, and a content change while that job is queued would keep the old text's vector.
- **Filters run on the server, exactly** (``automem_mapping``): hashed ``ml:`` tags make the
  server's case-insensitive, prefix-matching tag filters exact, caller tags are kept apart from
  the driver's, and ``min_importance`` is pushed down as importance buckets. Every result is still
  checked here against the exact user and every filter, so a server-side widening can never hand
  one user another's memory.
- **Recall** is ``GET /recall`` (``tag_mode=all``, ``tag_match=exact``, at most 100 results); the
  server ranks, scores clipped to 0..1. No query lists newest first; when the server's page was
  full and filtering here left fewer than ``top_k`` (or ``top_k`` is above 100), the user's
  memories are listed in full instead. With a query, results beyond the server's ranked page come
  from that listing, ranked after it by the words they share with the query. ``use_vector=False``
  keeps only results that contain a word of the query.
- **Access counts** go in the metadata, but a recall sends no request for them: it records its
  results in a pending table (``automem_access``) and returns them with their new counts. A
  daemon thread writes each memory's accumulated delta every ``AUTOMEM_ACCESS_FLUSH_SECONDS``
  (default 1 s) with one read and one ``PATCH`` per memory, however many recalls hit it, after
  its enrichment window; a memory gone meanwhile is dropped, an unreachable service retried at
  the next flush, and nothing of it ever reaches a recall. ``close()`` stops the thread and
  flushes. This driver's ``get``, ``list_memories`` and ``recall`` add the pending counts, so a
  caller sees its own at once; other processes see them after at most the flush interval (a
  count still pending when the process dies is lost). The flusher and this driver's ``update``
  and upserts never write the same memory's metadata at the same time.
- **store_many** sends batches sized to the read timeout from the measured time per item
  (``AUTOMEM_BATCH_SIZE`` at most). Everything one call creates carries one ``ml:op:`` tag: if any
  request fails, that tag is deleted (waiting, after a timeout, for a batch the server may still
  be storing) and what the call replaced is patched back, then the error is raised.
- **Long content is never changed silently**: knowledge is split into chunks within the server's
  summarising limit (``AUTOMEM_CONTENT_SOFT_LIMIT``, 500); a memory longer than that is read back
  after it is written, put back if the server replaced it, and if it cannot be kept, undone with
  ``BackendUnavailableError``.
- **health_check** makes a real read (``/health`` can say healthy while every call fails).
- **Limits**: content over the server's 2,000 characters is ``InvalidInputError`` for memories.
- **Records of the driver before this mapping** (plain ``user:<id>`` tags, deletion in the
  metadata) are invisible until ``upgrade_legacy_records()`` re-maps them, once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from app.core.memory import ranking
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.chunking import chunk_text
from app.core.memory.cursors import CURSOR_RULE, decode_cursor, encode_cursor, listing_scope
from app.core.memory.drivers import automem_mapping as mapping
from app.core.memory.drivers.automem_access import Access, AccessLog
from app.core.memory.drivers.automem_http import AutomemHttp, OutcomeUnknownError
from app.core.memory.drivers.automem_mapping import (
    KNOWLEDGE_TAG,
    LAYER,
    MEMORY_TAG,
    USER_TAG,
    clip,
    layer_of,
    memory_from_server,
    parse_time,
    visible,
)
from app.core.memory.drivers.support import claim_user_id
from app.core.memory.errors import (
    BackendUnavailableError,
    InvalidInputError,
    MissingDependencyError,
)
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
from app.core.memory.time_phrases import window_named_by
from app.core.memory.validation import (
    DEFAULT_NAMESPACE,
    MAX_PAGE_SIZE,
    MAX_PROFILE_BYTES,
    MAX_QUERY_CHARS,
    MemoryChanges,
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

log = logging.getLogger(__name__)

SERVER_CONTENT_LIMIT = 2_000
BATCH_LIMIT = 500
LIST_PAGE = 200
RECALL_LIMIT = 100
MAX_CONNECTIONS = 10
#: Share of the read timeout one batch may take by the measured time per item.
BATCH_TIME_SHARE = 0.5
_OURS = ("ml:", "memory-layer:", "user:", "conversation:")


class AutomemDriver(BaseMemoryDriver):
    """The contract over AutoMem's HTTP API (see the module docstring for every mapping)."""

    name = "automem"

    def __init__(self, *, url: str | None = None, token: str = "", client: Any = None,
                 connect_timeout: float = 5.0, read_timeout: float = 25.0, max_tries: int = 3,
                 backoff_seconds: float = 0.5, retention: timedelta = timedelta(days=30),
                 enrichment_window: float = 0.5, batch_size: int = 100,
                 batch_item_seconds: float = 0.06, content_soft_limit: int = 500,
                 access_flush_seconds: float = 1.0) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise MissingDependencyError(
                "the automem driver needs httpx: pip install -e '.[automem]'") from exc
        if client is None and not url:
            raise InvalidInputError("url must be the AutoMem service's URL (or pass client=)")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = client or httpx.Client(
            base_url=url or "", headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS))
        self._http = AutomemHttp(client, httpx, max_tries=max_tries, backoff=backoff_seconds)
        self._retention = retention
        self._read_timeout = read_timeout
        self._enrichment_window = max(0.0, enrichment_window)
        self._batch_size = max(1, min(BATCH_LIMIT, batch_size))
        self._item_seconds = max(1e-6, batch_item_seconds)
        self._soft_limit = max(1, min(SERVER_CONTENT_LIMIT, content_soft_limit))
        self._access = AccessLog(self._write_access, access_flush_seconds)
        self._busy: set[str] = set()  # memories whose metadata a read-modify-write holds
        self._busy_changed = threading.Condition()

    @classmethod
    def from_settings(cls) -> AutomemDriver:
        """A driver configured from the ``AUTOMEM_*`` settings (see ``config/settings.py``)."""
        from config.settings import get_settings

        settings = get_settings()
        return cls(url=settings.automem_url, token=settings.automem_api_token,
                   connect_timeout=settings.automem_connect_timeout,
                   read_timeout=settings.automem_read_timeout,
                   max_tries=settings.automem_max_tries,
                   backoff_seconds=settings.automem_backoff_seconds,
                   retention=timedelta(days=settings.soft_delete_retention_days),
                   enrichment_window=settings.automem_enrichment_window,
                   batch_size=settings.automem_batch_size,
                   content_soft_limit=settings.automem_content_soft_limit,
                   access_flush_seconds=settings.automem_access_flush_seconds)

    # -- the six verbs of the original design ---------------------------------------------------

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
                                   context=context, now=datetime.now(UTC))
        filters = prepare_filters(
            user_id, agent_id=agent_id, conversation_id=conversation_id, namespace=namespace,
            tags=tags, exclude_tags=exclude_tags, min_importance=min_importance,
            start=when.start, end=when.end,
        )
        top_k = check_top_k(top_k)
        use_vector = check_bool(use_vector, "use_vector")
        text = check_query(query)
        terms = set(ranking.query_terms(text)) if text and not use_vector else set()
        if text and not use_vector and not terms:
            return []  # keyword search with no word to match
        limit = min(RECALL_LIMIT, max(2 * top_k, 20))
        # state_mode=history: "current" would hide memories whose occurred_at (the server's
        # timestamp) lies in the future; deletion and expiry are checked here (``visible``).
        params: list[tuple[str, Any]] = [("limit", limit), ("tag_mode", "all"),
                                         ("tag_match", "exact"), ("state_mode", "history")]
        params += [("tags", tag) for tag in mapping.filter_tags(filters)]
        params += [("exclude_tags", mapping.caller_tag(tag)) for tag in filters.exclude_tags]
        params.append(("query", text) if text else ("sort", "time_desc"))
        params += [(name, moment.isoformat()) for name, moment in
                   (("start", filters.start), ("end", filters.end)) if moment is not None]
        window = window_named_by(text, when.reference_time) if text else None
        read_started = time.monotonic()
        body = self._http.request("GET", "/recall", params=params)
        results = [r for r in _list(body.get("results")) if isinstance(r, dict)]
        now = datetime.now(UTC)
        found: list[Memory] = []
        server_of: dict[str, dict[str, Any]] = {}
        for result in results:
            server = result.get("memory")
            if not isinstance(server, dict):
                continue
            memory = memory_from_server(server, result.get("id") or server.get("id"))
            if (memory is None or memory["id"] in server_of or not visible(memory, filters, now)
                    or not _in_period(memory, filters)):
                continue
            if terms and not terms & set(ranking.query_terms(memory["content"])):
                continue
            memory["score"] = 1.0 if not text else ranking.with_time(
                clip(result.get("final_score", result.get("score"))),
                window is not None and window.holds(memory["occurred_at"]))
            found.append(memory)
            server_of[memory["id"]] = server
        found.sort(key=_by_score if text else _latest_first, reverse=True)
        # The server cut its answer at ``limit`` before the checks above: if that may have left
        # memories out, list the user's memories in full (the server cannot page a recall).
        cut = len(results) >= limit or top_k > RECALL_LIMIT
        if len(found) < top_k and cut:
            found = self._complete(found, server_of, filters, text, terms, top_k, now)
        found = found[:top_k]
        self._access.record([memory["id"] for memory in found], now)
        for memory in found:
            self._overlay(memory, server_of[memory["id"]], read_started)
        if when.context:
            self._attach_context(found, when.context, now)
        return found

    def _attach_context(self, hits: list[Memory], count: int, now: datetime) -> None:
        """Give each hit its ``context`` (see the contract): the server has no notion of
        neighbours, so the user's memories are listed once and ordered here."""
        conversations = {hit["conversation_id"] for hit in hits if hit["conversation_id"]}
        by_conversation: dict[str, list[Memory]] = {c: [] for c in conversations}
        if conversations:
            for memory in self._scan(RecallFilters(user_id=hits[0]["user_id"]), now):
                if memory["conversation_id"] in by_conversation:
                    by_conversation[memory["conversation_id"]].append(memory)
        for talk in by_conversation.values():
            talk.sort(key=lambda m: (m["occurred_at"], mapping.micros(m), m["id"]))
        for hit in hits:
            talk = by_conversation.get(hit["conversation_id"] or "", [])
            at = next((i for i, m in enumerate(talk) if m["id"] == hit["id"]), None)
            hit["context"] = [] if at is None else (
                talk[max(0, at - count):at] + talk[at + 1:at + 1 + count])

    def recall_global_knowledge(
        self, query: str, top_k: int = 5, category: str | None = None
    ) -> list[Knowledge]:
        text = check_text(query, "query", max_chars=MAX_QUERY_CHARS)
        top_k = check_top_k(top_k)
        category = check_optional_id(category, "category")
        tags = [KNOWLEDGE_TAG] + ([mapping.exact_tag("category", category)] if category else [])
        params = [("query", text), ("limit", min(RECALL_LIMIT, max(2 * top_k, 20))),
                  ("tag_mode", "all"), ("tag_match", "exact"), *[("tags", t) for t in tags]]
        found = []
        body = self._http.request("GET", "/recall", params=params)
        for result in _list(body.get("results")):
            server = result.get("memory") if isinstance(result, dict) else None
            layer = layer_of(server if isinstance(server, dict) else None)
            if layer.get("kind") != "knowledge" or (category and layer.get("category") != category):
                continue
            assert isinstance(server, dict)
            found.append(mapping.knowledge_from_server(
                server, layer, clip(result.get("final_score", result.get("score")))))
        found.sort(key=lambda k: k["score"], reverse=True)
        return found[:top_k]

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
        now = datetime.now(UTC)
        draft = prepare_store(
            user_id, content, conversation_id, tags, metadata, agent_id=agent_id,
            namespace=namespace, key=key, importance=importance, ttl=ttl, expires_at=expires_at,
            occurred_at=occurred_at, now=now,
        )
        _check_server_limit(draft.content, "content")
        return self._store_drafts([draft], now)[0]

    def store_global_knowledge(
        self,
        content: str,
        category: str,
        title: str | None = None,
        doc_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KnowledgeDocument:
        draft = prepare_knowledge(content, category, title, doc_id, metadata)
        # Chunks stay within the server's summarising limit, so none is replaced by a summary.
        chunks = [piece for chunk in chunk_text(draft.content)
                  for piece in mapping.split_text(chunk, self._soft_limit)]
        old = self._list_tagged(mapping.exact_tag("doc", draft.doc_id), kind="knowledge",
                                doc_id=draft.doc_id)
        now = datetime.now(UTC)
        created: str = min((str(layer_of(m)["document_created_at"]) for m in old
                            if layer_of(m).get("document_created_at")), default=now.isoformat())
        generation = uuid.uuid4().hex
        items = [{
            "content": chunk, "importance": 0.5, "timestamp": now.isoformat(),
            "tags": [KNOWLEDGE_TAG, mapping.exact_tag("category", draft.category),
                     mapping.exact_tag("doc", draft.doc_id), mapping.operation_tag(generation)],
            "metadata": {LAYER: {
                "kind": "knowledge", "doc_id": draft.doc_id, "category": draft.category,
                "title": draft.title, "chunk_index": index, "chunk_count": len(chunks),
                "generation": generation, "document_metadata": draft.metadata,
                "document_created_at": created, "updated_at": now.isoformat()}},
        } for index, chunk in enumerate(chunks)]
        self._create_all(items, generation)
        for memory in old:  # the new chunks are in: only now do the old ones go
            self._delete_id(memory["id"])
        return {"doc_id": draft.doc_id, "category": draft.category, "title": draft.title,
                "metadata": draft.metadata, "chunk_count": len(chunks),
                "created_at": parse_time(created) or now, "updated_at": now}

    def delete(self, memory_id: str, user_id: str | None = None) -> bool:
        memory_id, user_id = check_by_id(memory_id, user_id)
        server = self._visible_server_memory(memory_id, user_id)
        if server is None:
            return False
        # t_valid, not tags or metadata: enrichment cannot write it back.
        self._patch(memory_id, t_valid=mapping.deleted_marker(datetime.now(UTC)))
        return True

    def health_check(self) -> HealthReport:
        started = time.perf_counter()
        checks: dict[str, Any] = {}
        status = "ok"
        client = self._http.client
        try:
            body = client.get("/health").json()
            if not isinstance(body, dict):
                raise ValueError("not an object")
            service = body.get("status")
            checks["service"] = {key: body.get(key) for key in
                                 ("status", "falkordb", "qdrant", "memory_count")}
            if service != "healthy":
                status = "degraded" if service == "degraded" else "down"
            # /health can say healthy while every call fails: only a real read tells.
            probe = client.get("/memory/by-tag", params=[("tags", "ml:health"), ("limit", 1)])
            if probe.status_code == 401:
                checks["auth"] = {"status": "unauthorized"}
                status = "down"
            else:
                checks["auth"] = {"status": "ok"}
                answer = _json_object(probe)
                readable = probe.status_code < 300 and answer is not None
                checks["read"] = {"status": "ok" if readable else "failed",
                                  "http_status": probe.status_code}
                if not readable:
                    status = "down"
        except Exception as exc:  # noqa: BLE001 - health_check reports, it never raises
            status = "down"
            checks["service"] = {"status": "down", "error": type(exc).__name__}
        return {"driver": self.name, "status": status, "checks": checks,  # type: ignore[typeddict-item]
                "latency_ms": round((time.perf_counter() - started) * 1000, 3)}

    # -- added verbs -------------------------------------------------------------------------

    def get(
        self, memory_id: str, user_id: str | None = None, *, include_deleted: bool = False
    ) -> Memory | None:
        memory_id, user_id = check_by_id(memory_id, user_id)
        include_deleted = check_bool(include_deleted, "include_deleted")
        read_started = time.monotonic()
        server = self._visible_server_memory(memory_id, user_id, include_deleted=include_deleted)
        if server is None:
            return None
        memory = memory_from_server(server, memory_id)
        if memory is not None:
            self._overlay(memory, server, read_started)
        return memory

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
        now = datetime.now(UTC)
        changes = prepare_changes(content=content, tags=tags, metadata=metadata,
                                  importance=importance, ttl=ttl, expires_at=expires_at,
                                  clear_expiry=clear_expiry, occurred_at=occurred_at, now=now)
        if changes.content is not None:
            _check_server_limit(changes.content, "content")
        with self._holding(memory_id):
            if not self._apply_changes(memory_id, user_id, changes, now):
                return None
        return self.get(memory_id, user_id)

    def _apply_changes(self, memory_id: str, user_id: str | None, changes: MemoryChanges,
                       now: datetime) -> bool:
        """``update``'s read-modify-write; False if the memory is not there."""
        server = self._visible_server_memory(memory_id, user_id)
        if server is None:
            return False
        memory = memory_from_server(server, memory_id)
        assert memory is not None
        patch: dict[str, Any] = {}
        if changes.content is not None:
            patch["content"] = changes.content
        if changes.importance is not None:
            patch["importance"] = changes.importance
        if changes.expires_at is not None or changes.clear_expiry:
            patch["t_invalid"] = changes.expires_at.isoformat() if changes.expires_at else None
        if changes.occurred_at is not None:
            patch["timestamp"] = changes.occurred_at.isoformat()
        new_tags = changes.tags if changes.tags is not None else memory["tags"]
        new_importance = (changes.importance if changes.importance is not None
                          else memory["importance"])
        patch["tags"] = _server_extras(server) + mapping.memory_tags(
            memory["user_id"], memory["agent_id"], memory["conversation_id"],
            memory["namespace"], memory["key"], new_tags, new_importance)
        metadata_now = dict(server.get("metadata") or {})
        layer = dict(layer_of(server))
        layer.update(tags=new_tags, updated_at=now.isoformat())
        metadata_now[LAYER] = layer
        if changes.metadata is not None:
            metadata_now["data"] = changes.metadata
        patch["metadata"] = metadata_now
        self._settle(server)
        self._patch(memory_id, **patch)
        if changes.content is not None:
            self._keep_content(memory_id, changes.content, undo=False)
        return True

    def store_many(self, items: Iterable[MemoryInput]) -> list[Memory]:
        now = datetime.now(UTC)
        drafts = prepare_store_many(items, now=now)
        for index, draft in enumerate(drafts):
            _check_server_limit(draft.content, f"items[{index}].content")
        return self._store_drafts(drafts, now)

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
        position = decode_cursor(cursor, listing)
        # The position is the stored time (microseconds) of the page's last memory: the caller's
        # own data, nothing global about the server.
        if position is not None and not (position.isascii() and position.isdigit()):
            raise InvalidInputError(f"cursor must be {CURSOR_RULE}")
        before = None if position is None else int(position)
        memories = self._scan(filters, datetime.now(UTC), include_deleted=include_deleted)
        if before is not None:
            memories = [m for m in memories if mapping.micros(m) < before]
        page = memories[:limit]
        return {"items": page,
                "next_cursor": encode_cursor(str(mapping.micros(page[-1])), listing)
                if len(memories) > limit else None}

    def restore(self, memory_id: str, user_id: str | None = None) -> bool:
        memory_id, user_id = check_by_id(memory_id, user_id)
        server = self._visible_server_memory(memory_id, user_id, include_deleted=True)
        if server is None or mapping.deleted_at_of(server) is None:
            return False
        self._patch(memory_id, t_valid=None)
        return True

    def forget_user(self, user_id: str) -> int:
        user_id = check_id(user_id, "user_id")
        mine = self._list_tagged(mapping.user_tag(user_id), user_id=user_id)
        erased = 0
        for server in mine:
            self._delete_id(server["id"])
            erased += layer_of(server).get("kind") == "memory"
        return erased

    def purge(self, *, retention: timedelta | None = None) -> int:
        retention = check_retention(retention, self._retention)
        now = datetime.now(UTC)
        gone = 0
        for server in self._list_tagged(MEMORY_TAG, kind="memory"):
            expires, deleted = mapping.expires_at_of(server), mapping.deleted_at_of(server)
            if (expires and expires <= now) or (deleted and deleted <= now - retention):
                self._delete_id(server["id"])
                gone += 1
        return gone

    def delete_knowledge(self, doc_id: str) -> bool:
        doc_id = check_id(doc_id, "doc_id")
        chunks = self._list_tagged(mapping.exact_tag("doc", doc_id), kind="knowledge",
                                   doc_id=doc_id)
        for server in chunks:
            self._delete_id(server["id"])
        return bool(chunks)

    def stats(self, user_id: str | None = None) -> dict[str, Any]:
        user_id = check_optional_id(user_id, "user_id")
        now = datetime.now(UTC)
        if user_id is not None:
            servers = self._list_tagged(mapping.user_tag(user_id), kind="memory",
                                        user_id=user_id)
        else:
            servers = self._list_tagged(MEMORY_TAG, kind="memory")
        result: dict[str, Any] = {"driver": self.name, "memories": mapping.counts(servers, now)}
        if user_id is None:
            users = {layer_of(s).get("user_id") for s in servers}
            users |= {layer_of(s).get("user_id") for s in self._list_tagged(USER_TAG,
                                                                             kind="user")}
            chunks = self._list_tagged(KNOWLEDGE_TAG, kind="knowledge")
            result["users"] = len(users)
            result["knowledge"] = {"documents": len({layer_of(c).get("doc_id") for c in chunks}),
                                   "chunks": len(chunks)}
            result["embedding"] = None  # the service embeds on its side
        else:
            result["user_id"] = user_id
        return result

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

        def insert(candidate: str) -> bool:
            if self._user_records(candidate):
                return False
            self._write_user(candidate, name, stored_profile, [])
            return True

        user = self.get_user(claim_user_id(chosen, insert))
        assert user is not None
        return user

    def get_user(self, user_id: str) -> User | None:
        user_id = check_id(user_id, "user_id")
        records = self._user_records(user_id)
        servers = self._list_tagged(mapping.user_tag(user_id), kind="memory", user_id=user_id)
        created = [parse_time(layer_of(s).get("created_at")) or parse_time(s.get("timestamp"))
                   for s in servers]
        row = None
        if records:
            layer = layer_of(records[0])
            row = (layer.get("display_name"), layer.get("profile") or {},
                   parse_time(layer.get("created_at")), parse_time(layer.get("updated_at")))
        return user_record(user_id, row, mapping.counts(servers, datetime.now(UTC)),
                           min(filter(None, created), default=None),
                           max(filter(None, created), default=None))

    def get_profile(self, user_id: str) -> dict[str, Any]:
        user_id = check_id(user_id, "user_id")
        records = self._user_records(user_id)
        return dict(layer_of(records[0]).get("profile") or {}) if records else {}

    def set_profile(
        self, user_id: str, profile: dict[str, Any], *, merge: bool = False
    ) -> dict[str, Any]:
        user_id = check_id(user_id, "user_id")
        if profile is None:
            raise InvalidInputError("profile must be a dict (got None)")
        new = check_json_object(profile, "profile", max_bytes=MAX_PROFILE_BYTES)
        merge = check_bool(merge, "merge")
        records = self._user_records(user_id)
        current = layer_of(records[0]) if records else {}
        old = current.get("profile") or {}
        stored = check_json_object({**old, **new} if merge else new, "profile",
                                   max_bytes=MAX_PROFILE_BYTES)
        self._write_user(user_id, current.get("display_name"), stored, records)
        return stored

    def upgrade_legacy_records(self) -> int:
        """Re-map records written by the driver before issue 14 (an AutoMem-only operator call).

        That driver filtered on plain tags (``user:<id>``, ``namespace:<ns>``, caller tags as
        given) and kept deletion and expiry in the metadata; this one finds nothing of it. Each
        such memory, knowledge chunk and user record gets the hashed tags, its deletion moved to
        ``t_valid`` and its expiry to ``t_invalid``. Idempotent; returns how many were changed.
        """
        changed = 0
        for tag in (MEMORY_TAG, KNOWLEDGE_TAG, USER_TAG):
            for server in self._list_tagged(tag):
                fields = mapping.legacy_upgrade(server)
                if fields:
                    self._patch(server["id"], not_found=None, **fields)
                    changed += 1
        return changed

    def flush_access_counts(self) -> int:
        """Write the pending access counts now (an AutoMem-only call; the flusher thread does it
        every ``access_flush_seconds``). How many memories were written; never raises."""
        return self._access.flush()

    def close(self) -> None:
        """Stop the access-count flusher, write what it still holds, then close the client."""
        self._access.close()
        self._http.close()

    # -- private helpers ----------------------------------------------------------------------

    def _patch(self, memory_id: str, *, not_found: Any = "raise", **fields: Any) -> Any:
        return self._http.request("PATCH", f"/memory/{memory_id}", body=fields,
                                  not_found=not_found)

    def _delete_id(self, memory_id: str) -> None:
        self._http.request("DELETE", f"/memory/{memory_id}", not_found=None)

    def _server_memory(self, memory_id: str) -> dict[str, Any] | None:
        if not _is_server_id(memory_id):
            return None  # the server answers 400 for ids that are not UUIDs: none of ours
        body = self._http.request("GET", f"/memory/{memory_id}", not_found=None)
        server = body.get("memory") if body is not None else None
        if not isinstance(server, dict):
            return None
        server.setdefault("id", memory_id)
        return server

    def _visible_server_memory(self, memory_id: str, user_id: str | None, *,
                               include_deleted: bool = False) -> dict[str, Any] | None:
        server = self._server_memory(memory_id)
        if server is None:
            return None
        memory = memory_from_server(server, memory_id)
        if memory is None or (user_id is not None and memory["user_id"] != user_id):
            return None
        if not visible(memory, RecallFilters(user_id=memory["user_id"]), datetime.now(UTC),
                       include_deleted=include_deleted):
            return None
        return server

    def _settle(self, server: dict[str, Any]) -> None:
        """Wait until enrichment can no longer write back ``server``'s tags and metadata.

        The window runs from when the server stored the memory: the later of the driver's
        ``created_at`` and the server's own ``updated_at`` (set at the store, never sent by this
        driver), so a slow batch does not shorten it.
        """
        wait = self._unsettled_for(server)
        if wait > 0:
            time.sleep(wait)

    def _unsettled_for(self, server: dict[str, Any]) -> float:
        """Seconds left of ``server``'s enrichment window (0 once it has passed)."""
        layer = layer_of(server)
        stored = max(filter(None, [parse_time(layer.get("created_at")),
                                   parse_time(server.get("updated_at"))]),
                     default=None)
        if stored is None:
            return 0.0
        wait = (stored - datetime.now(UTC)).total_seconds() + self._enrichment_window
        return max(0.0, min(wait, self._enrichment_window))

    @contextmanager
    def _holding(self, memory_id: str) -> Iterator[None]:
        """Hold ``memory_id``'s metadata for one read-modify-write: the access flusher and
        ``update``/upserts of this driver would otherwise write back each other's old copy."""
        with self._busy_changed:
            while memory_id in self._busy:
                self._busy_changed.wait()
            self._busy.add(memory_id)
        try:
            yield
        finally:
            with self._busy_changed:
                self._busy.discard(memory_id)
                self._busy_changed.notify_all()

    def _overlay(self, memory: Memory, server: dict[str, Any], read_started: float) -> None:
        """Add this driver's accesses the server does not have yet to ``memory``."""
        self._access.overlay(memory, layer_of(server).get("access_flush"),  # type: ignore[arg-type]
                             read_started)

    def _write_access(self, memory_id: str, access: Access, final: bool) -> bool | None:
        """Add ``access`` to the memory's stored count (see ``automem_access.Writer``)."""
        with self._holding(memory_id):
            server = self._server_memory(memory_id)
            if server is None:
                return None  # deleted since the recall: nothing to count
            if self._unsettled_for(server) > 0:
                if not final:
                    return False  # enrichment could undo it: the next flush writes it
                self._settle(server)
            metadata = dict(server.get("metadata") or {})
            layer = dict(layer_of(server))
            last = access.last
            previous = parse_time(layer.get("last_accessed_at"))
            if previous is not None and previous > last:
                last = previous
            layer.update(access_count=int(layer.get("access_count") or 0) + access.count,
                         last_accessed_at=last.isoformat(), access_flush=access.token)
            metadata[LAYER] = layer
            answer = self._patch(memory_id, metadata=metadata, last_accessed=last.isoformat(),
                                 not_found=None)
            return None if answer is None else True

    def _store_drafts(self, drafts: list[MemoryDraft], now: datetime) -> list[Memory]:
        """Store checked drafts in input order, all or nothing (see the module docstring)."""
        if not drafts:
            return []
        operation = uuid.uuid4().hex
        results: list[Memory | None] = [None] * len(drafts)
        replaced: list[dict[str, Any]] = []
        created: list[str] = []
        try:
            # Keys that exist are patched in place; the rest is created in batches, where the
            # last item of equal new keys is the one created.
            fresh: list[int] = []
            last_of: dict[tuple[str, str | None, str, str], int] = {}
            for index, draft in enumerate(drafts):
                if draft.key is None:
                    fresh.append(index)
                    continue
                identity = (draft.user_id, draft.agent_id, draft.namespace, draft.key)
                if identity in last_of:
                    fresh[fresh.index(last_of[identity])] = index
                    last_of[identity] = index
                    continue
                existing = self._find_key(draft)
                if existing is None:
                    last_of[identity] = index
                    fresh.append(index)
                else:
                    replaced.append(existing)
                    results[index] = self._upsert(existing, draft, now)
            # Distinct store times keep "newest first" exact within a batch (and the
            # timestamps of items without occurred_at, which get their store time).
            payload = [mapping.server_item(drafts[i], now + timedelta(microseconds=n),
                                           operation=operation) for n, i in enumerate(fresh)]
            ids = self._create(payload, created)
            for position, (index, memory_id) in enumerate(zip(fresh, ids, strict=True)):
                draft = drafts[index]
                if draft.expires_at is not None:  # the batch endpoint takes no t_invalid
                    self._patch(memory_id, t_invalid=draft.expires_at.isoformat())
                if len(draft.content) > self._soft_limit:
                    self._keep_content(memory_id, draft.content, undo=True)
                expiry = draft.expires_at.isoformat() if draft.expires_at else None
                results[index] = memory_from_server(
                    {**payload[position], "id": memory_id, "t_invalid": expiry}, memory_id)
            for index, draft in enumerate(drafts):  # earlier items of an equal new key
                if results[index] is None and draft.key is not None:
                    identity = (draft.user_id, draft.agent_id, draft.namespace, draft.key)
                    results[index] = results[last_of[identity]]
        except Exception as exc:
            in_flight = exc.in_flight if isinstance(exc, OutcomeUnknownError) else 0
            undone = self._undo(operation, len(created) + in_flight, replaced)
            _raise_undone(exc, undone)
        return [memory for memory in results if memory is not None]

    def _create_all(self, items: list[dict[str, Any]], operation: str) -> list[str]:
        """``_create``, undone (by the items' ``ml:op:`` tag) if it fails."""
        created: list[str] = []
        try:
            return self._create(items, created)
        except Exception as exc:
            in_flight = exc.in_flight if isinstance(exc, OutcomeUnknownError) else 0
            _raise_undone(exc, self._undo_operation(operation, len(created) + in_flight))

    def _upsert(self, existing: dict[str, Any], draft: MemoryDraft, now: datetime) -> Memory:
        """Replace the memory ``existing`` in place with ``draft`` (same id and created_at)."""
        layer = layer_of(existing)
        created = parse_time(layer.get("created_at")) or now
        item = mapping.server_item(draft, now, created_at=created)
        with self._holding(existing["id"]):
            self._settle(existing)
            # Read the count again: the access flusher may have written it since the lookup.
            counted = layer_of(self._server_memory(existing["id"]) or existing)
            item["metadata"][LAYER].update(access_count=counted.get("access_count", 0),
                                           last_accessed_at=counted.get("last_accessed_at"))
            self._patch(existing["id"], content=item["content"],
                        tags=_server_extras(existing) + item["tags"],
                        importance=item["importance"], metadata=item["metadata"],
                        t_invalid=draft.expires_at.isoformat() if draft.expires_at else None,
                        t_valid=None, timestamp=item["timestamp"])
        if len(draft.content) > self._soft_limit:
            self._keep_content(existing["id"], draft.content, undo=False)
        read_started = time.monotonic()
        stored = self._server_memory(existing["id"]) or {**item, "id": existing["id"]}
        memory = memory_from_server(stored, existing["id"])
        assert memory is not None
        self._overlay(memory, stored, read_started)
        return memory

    def _keep_content(self, memory_id: str, content: str, *, undo: bool) -> None:
        """Make sure the server kept ``content`` as written (it may summarise long content)."""
        for attempt in range(2):
            server = self._server_memory(memory_id)
            if server is None or server.get("content") == content:
                return
            if attempt == 0:  # put it back once; a PATCH is not summarised
                self._patch(memory_id, content=content)
        if not undo:
            raise BackendUnavailableError(
                "AutoMem replaced the content with a summary and kept it; the memory holds the "
                "summary (raise the server's MEMORY_CONTENT_SOFT_LIMIT, or store shorter content)")
        raise BackendUnavailableError(
            "AutoMem replaced the content with a summary and kept it, so nothing was stored "
            "(raise the server's MEMORY_CONTENT_SOFT_LIMIT, or store shorter content)")

    def _create(self, items: list[dict[str, Any]], created: list[str]) -> list[str]:
        """Create ``items`` in batches sized to the read timeout, appending ids to ``created``.

        A batch that ends without a usable answer raises ``OutcomeUnknownError`` whose
        ``in_flight`` says how many memories the server may still store; the caller undoes.
        """
        start = 0
        while start < len(items):
            size = max(1, min(self._batch_size,
                              int(self._read_timeout * BATCH_TIME_SHARE / self._item_seconds)))
            chunk = items[start:start + size]
            started = time.monotonic()
            try:
                answer = self._http.request("POST", "/memory/batch", body={"memories": chunk},
                                            creates=True)
            except OutcomeUnknownError as exc:
                exc.in_flight = len(chunk)
                # Slower than measured: the next call sizes its batches from this one.
                self._item_seconds = max(self._item_seconds, self._read_timeout / len(chunk))
                raise
            elapsed = time.monotonic() - started
            self._item_seconds = max(1e-6, (self._item_seconds + elapsed / len(chunk)) / 2)
            new = answer.get("memory_ids")
            if (not isinstance(new, list) or len(new) != len(chunk)
                    or not all(isinstance(i, str) and _is_server_id(i) for i in new)):
                error = OutcomeUnknownError("AutoMem answered a batch store without its ids")
                error.in_flight = len(chunk)
                raise error
            created += new
            start += size
        return created

    def _undo_operation(self, operation: str, expected: int) -> bool:
        """Delete what one call created (by its ``ml:op:`` tag). After a timeout the server may
        still be storing a batch: keep deleting until ``expected`` memories went, or until two
        read timeouts have passed. Whether everything went."""
        if expected <= 0:
            return True
        deadline = time.monotonic() + 2 * self._read_timeout
        gone = 0
        while True:
            try:
                answer = self._http.request("DELETE", "/memory/by-tag",
                                            params=[("tags", mapping.operation_tag(operation))])
                gone += int(answer.get("deleted_count") or 0)
            except BackendUnavailableError:
                log.warning("AutoMem: undoing a failed store could not reach the service")
            if gone >= expected:
                return True
            if time.monotonic() >= deadline:
                log.warning("AutoMem: %d memories of a failed store may remain, tagged %s",
                            expected - gone, mapping.operation_tag(operation))
                return False
            time.sleep(min(0.25, self._read_timeout / 10))

    def _undo(self, operation: str, expected: int, replaced: list[dict[str, Any]]) -> bool:
        undone = self._undo_operation(operation, expected)
        for previous in replaced:
            self._patch(previous["id"], content=previous["content"], tags=previous["tags"],
                        importance=previous["importance"], metadata=previous["metadata"],
                        t_invalid=previous.get("t_invalid"), t_valid=previous.get("t_valid"),
                        **({"timestamp": previous["timestamp"]} if previous.get("timestamp")
                           else {}), not_found=None)
        return undone

    def _find_key(self, draft: MemoryDraft) -> dict[str, Any] | None:
        assert draft.key is not None
        tag = mapping.key_tag(draft.user_id, draft.agent_id, draft.namespace, draft.key)
        for server in self._list_tagged(tag, kind="memory", user_id=draft.user_id):
            layer = layer_of(server)
            if (layer.get("key") == draft.key and layer.get("agent_id") == draft.agent_id
                    and layer.get("namespace") == draft.namespace):
                return server
        return None

    def _list_tagged(self, tag: str, *, kind: str | None = None, user_id: str | None = None,
                     doc_id: str | None = None) -> list[dict[str, Any]]:
        """Every memory carrying ``tag`` whose metadata matches exactly (kind, user, document)."""
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            body = self._http.request("GET", "/memory/by-tag", params=[
                ("tags", tag), ("limit", LIST_PAGE), ("offset", offset)])
            for server in _list(body.get("memories")):
                if not isinstance(server, dict):
                    continue
                layer = layer_of(server)
                if ((kind is None or layer.get("kind") == kind)
                        and (user_id is None or layer.get("user_id") == user_id)
                        and (doc_id is None or layer.get("doc_id") == doc_id)
                        and server.get("id")):
                    found.append(server)
            if not body.get("has_more"):
                return found
            offset += LIST_PAGE

    def _scan(self, filters: RecallFilters, now: datetime, *,
              include_deleted: bool = False) -> list[Memory]:
        """Every memory of ``filters``, newest first, read by listing (not ranked)."""
        read_started = time.monotonic()
        memories = []
        for server in self._list_tagged(mapping.user_tag(filters.user_id), kind="memory",
                                        user_id=filters.user_id):
            memory = memory_from_server(server, server.get("id"))
            if memory is not None and visible(memory, filters, now,
                                              include_deleted=include_deleted):
                self._overlay(memory, server, read_started)
                memories.append(memory)
        memories.sort(key=mapping.micros, reverse=True)
        return memories

    def _complete(self, found: list[Memory], server_of: dict[str, dict[str, Any]],
                  filters: RecallFilters, text: str | None, terms: set[str], top_k: int,
                  now: datetime) -> list[Memory]:
        """``found`` filled up to ``top_k`` from a full listing (see ``recall``)."""
        servers = {s["id"]: s for s in self._list_tagged(mapping.user_tag(filters.user_id),
                                                         kind="memory", user_id=filters.user_id)}
        listed = [m for m in (memory_from_server(s, i) for i, s in servers.items())
                  if m is not None and visible(m, filters, now) and _in_period(m, filters)]
        if not text:
            listed.sort(key=_latest_first, reverse=True)
            for memory in listed:
                memory["score"] = 1.0
                server_of[memory["id"]] = servers[memory["id"]]
            return listed
        words = set(ranking.query_terms(text))
        floor = min((m["score"] for m in found), default=1.0)
        extra = []
        for memory in listed:
            if memory["id"] in server_of:
                continue
            shared = words & set(ranking.query_terms(memory["content"]))
            if terms and not shared:
                continue
            memory["score"] = min(floor, round(len(shared) / max(1, len(words)), 6))
            extra.append(memory)
            server_of[memory["id"]] = servers[memory["id"]]
        extra.sort(key=lambda m: (m["score"], m["created_at"]), reverse=True)
        return found + extra

    def _user_records(self, user_id: str) -> list[dict[str, Any]]:
        """The user's records, newest first (``set_profile`` replaces rather than patches)."""
        records = self._list_tagged(mapping.user_tag(user_id), kind="user", user_id=user_id)
        records.sort(key=lambda r: (str(layer_of(r).get("updated_at") or ""), str(r["id"])),
                     reverse=True)
        return records

    def _write_user(self, user_id: str, name: str | None, profile: dict[str, Any],
                    records: list[dict[str, Any]]) -> None:
        """Store the user's record anew, then delete the older ones: enrichment may undo a
        PATCH of a fresh record's metadata, but never what the store itself wrote."""
        now = datetime.now(UTC).isoformat()
        created = layer_of(records[0]).get("created_at") if records else now
        operation = uuid.uuid4().hex
        metadata = {LAYER: {"kind": "user", "user_id": user_id, "display_name": name,
                            "profile": profile, "created_at": created, "updated_at": now}}
        self._create_all([{"content": f"User record {user_id}", "importance": 0.5,
                       "tags": [USER_TAG, f"user:{user_id}", mapping.user_tag(user_id),
                                mapping.operation_tag(operation)],
                       "metadata": metadata}], operation)
        for record in records:
            self._delete_id(record["id"])


# -- module helpers -------------------------------------------------------------------------


def _raise_undone(exc: Exception, undone: bool) -> NoReturn:
    """Re-raise the failure of a store whose writes were undone, saying whether they all were."""
    if isinstance(exc, OutcomeUnknownError):
        if undone:
            raise BackendUnavailableError(
                f"{exc}; everything the call stored was deleted again") from exc
        raise BackendUnavailableError(
            f"{exc}; some memories of the call may remain (they carry one ml:op: tag)") from exc
    raise exc


def _server_extras(server: dict[str, Any]) -> list[str]:
    """The tags the server added (``entity:...``), kept when the driver rewrites its own."""
    return [tag for tag in server.get("tags") or []
            if isinstance(tag, str) and not tag.startswith(_OURS)]


def _by_score(memory: Memory) -> tuple[float, datetime, int, str]:
    """Recall's order (``ranking.order``'s): score, then what occurred last, then the newest
    stored, then the larger id."""
    return memory["score"], *_latest_first(memory)


def _latest_first(memory: Memory) -> tuple[datetime, int, str]:
    """A recall without a query: what occurred last first, then the newest stored."""
    return memory["occurred_at"], mapping.micros(memory), memory["id"]


def _in_period(memory: Memory, filters: RecallFilters) -> bool:
    """Whether ``memory`` occurred within recall's ``start``..``end`` (checked here too: the
    server's own filter is on its timestamp, which older records used for created_at)."""
    return ((filters.start is None or memory["occurred_at"] >= filters.start)
            and (filters.end is None or memory["occurred_at"] <= filters.end))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _json_object(response: Any) -> dict[str, Any] | None:
    try:
        decoded = response.json()
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def _is_server_id(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _check_server_limit(content: str, name: str) -> None:
    if len(content) > SERVER_CONTENT_LIMIT:
        raise InvalidInputError(f"{name} must be at most {SERVER_CONTENT_LIMIT} characters with "
                                "the automem driver (the AutoMem service's limit)")
