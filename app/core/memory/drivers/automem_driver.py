"""The ``automem`` driver: the contract over the AutoMem memory service's HTTP API.

Needs the ``automem`` extra (``pip install -e '.[automem]'``: httpx) and a running AutoMem
(``AUTOMEM_URL`` or ``AUTOMEM_ENDPOINT``, token ``AUTOMEM_API_TOKEN`` or ``AUTOMEM_API_KEY``, sent
as a Bearer token). The service owns its storage and its embeddings: nothing is migrated and no
model is loaded here. The API is ``shared/AUTOMEM_API.md``; how the contract maps onto it:

- **Scopes are tags.** Each memory carries ``user:<id>``, ``namespace:<ns>`` and, when given,
  ``agent:<id>``, ``conversation:<id>``, ``key:<key>``, plus ``memory-layer:memory``; the caller's
  tags are added as they are. The driver's own fields (ids, the caller's tags and metadata, expiry,
  deletion, access counts) live in ``metadata["memory_layer"]``, the caller's metadata in
  ``metadata["data"]``. Server-appended tags and metadata keys are tolerated and not shown.
- **Tenancy is enforced here too.** The server matches tags case-insensitively and may widen a
  recall, so every result is checked again against the exact ``user_id`` (and every other filter)
  in its metadata before it is returned, changed or deleted.
- **Recall** is ``GET /recall`` with the scope tags (repeated ``tags``, ``tag_mode=all``,
  ``tag_match=exact``) and ``exclude_tags``; the server ranks (its scores, clipped to 0..1).
  ``use_vector=False`` keeps only results that contain a word of the query. No query lists newest
  first (``sort=time_desc``). Access counts are written back with one ``PATCH`` per result.
- **TTL** is ``t_invalid`` (the server's ``state_mode=current`` hides what expired) and is checked
  here as well. **Soft delete** adds the tag ``memory-layer:deleted`` (excluded from recalls) and
  ``deleted_at``; ``restore`` removes both; ``purge`` hard-deletes.
- **Upsert by key** finds the memory through its ``key:`` tag and patches it in place.
- **store_many** sends ``POST /memory/batch`` in chunks of at most 500 (memories with an expiry or a
  key go one by one, as the batch endpoint takes no ``t_invalid``); if any request fails, what the
  call created is deleted again and what it replaced is patched back, then the error is raised.
- **Knowledge** chunks are memories tagged ``memory-layer:knowledge``, ``category:<c>`` and
  ``document:<doc_id>``; re-ingest stores the new chunks first, then deletes the old ones.
- **Users** are one record memory each, tagged ``memory-layer:user``.
- **Limits**: content over the server's 2,000 characters is ``InvalidInputError`` for memories and
  split into smaller chunks for knowledge.
- **Errors**: connection errors, timeouts, 5xx and unreadable bodies are retried
  (``AUTOMEM_MAX_TRIES`` tries, waits of ``AUTOMEM_BACKOFF_SECONDS`` x 2^n) and end in
  ``BackendUnavailableError``; a request that creates something is not retried after a timeout or
  an unreadable answer, since it may have been carried out. 400 is ``InvalidInputError`` with the
  server's message; 404 on a by-id call is "not found".
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from app.core.memory import ranking
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.chunking import chunk_text
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
from app.core.memory.validation import (
    DEFAULT_NAMESPACE,
    MAX_PAGE_SIZE,
    MAX_PROFILE_BYTES,
    MAX_QUERY_CHARS,
    MemoryDraft,
    RecallFilters,
    check_bool,
    check_by_id,
    check_cursor,
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
    prepare_store,
    prepare_store_many,
)

SERVER_CONTENT_LIMIT = 2_000
BATCH_LIMIT = 500
LIST_PAGE = 200
RECALL_LIMIT = 100
MEMORY_TAG, KNOWLEDGE_TAG, USER_TAG = ("memory-layer:memory", "memory-layer:knowledge",
                                       "memory-layer:user")
DELETED_TAG = "memory-layer:deleted"
LAYER = "memory_layer"
_SERVER_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class AutomemDriver(BaseMemoryDriver):
    """The contract over AutoMem's HTTP API (see the module docstring for every mapping)."""

    name = "automem"

    def __init__(self, *, url: str | None = None, token: str = "", client: Any = None,
                 connect_timeout: float = 5.0, read_timeout: float = 25.0, max_tries: int = 3,
                 backoff_seconds: float = 0.5,
                 retention: timedelta = timedelta(days=30)) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise MissingDependencyError(
                "the automem driver needs httpx: pip install -e '.[automem]'") from exc
        if client is None and not url:
            raise InvalidInputError("url must be the AutoMem service's URL (or pass client=)")
        self._httpx = httpx
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = client or httpx.Client(
            base_url=url or "", headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout))
        self._closed = False
        self._max_tries = max(1, max_tries)
        self._backoff = backoff_seconds
        self._retention = retention

    @classmethod
    def from_settings(cls) -> AutomemDriver:
        """A driver configured from ``AUTOMEM_URL``, ``AUTOMEM_API_TOKEN`` and the timeouts."""
        from config.settings import get_settings

        settings = get_settings()
        return cls(url=settings.automem_url, token=settings.automem_api_token,
                   connect_timeout=settings.automem_connect_timeout,
                   read_timeout=settings.automem_read_timeout,
                   max_tries=settings.automem_max_tries,
                   backoff_seconds=settings.automem_backoff_seconds,
                   retention=timedelta(days=settings.soft_delete_retention_days))

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
    ) -> list[Memory]:
        filters = prepare_filters(
            user_id, agent_id=agent_id, conversation_id=conversation_id, namespace=namespace,
            tags=tags, exclude_tags=exclude_tags, min_importance=min_importance,
        )
        top_k = check_top_k(top_k)
        use_vector = check_bool(use_vector, "use_vector")
        text = check_query(query)
        scope = [MEMORY_TAG, *_scope_tags(filters), *filters.tags]
        params: list[tuple[str, Any]] = [("limit", min(RECALL_LIMIT, max(2 * top_k, 20))),
                                         ("tag_mode", "all"), ("tag_match", "exact")]
        params += [("tags", tag) for tag in scope]
        params += [("exclude_tags", tag) for tag in [DELETED_TAG, *filters.exclude_tags]]
        params.append(("query", text) if text else ("sort", "time_desc"))
        body = self._request("GET", "/recall", params=params)
        now = datetime.now(UTC)
        terms = set(ranking.query_terms(text)) if text and not use_vector else set()
        if text and not use_vector and not terms:
            return []  # keyword search with no word to match
        found: list[Memory] = []
        metadata_of: dict[str, dict[str, Any]] = {}
        for result in body.get("results") or []:
            server = result.get("memory") or {}
            memory = _memory_from_server(server, result.get("id"))
            if memory is None or not _visible(memory, filters, now):
                continue
            if terms and not terms & set(ranking.query_terms(memory["content"])):
                continue
            memory["score"] = 1.0 if not text else _clip(result.get("final_score",
                                                                     result.get("score")))
            found.append(memory)
            metadata_of[memory["id"]] = server["metadata"]
        if text:
            found.sort(key=lambda m: (m["score"], m["created_at"]), reverse=True)
        memories = found[:top_k]
        for memory in memories:
            self._record_access(memory, metadata_of[memory["id"]], now)
        return memories

    def recall_global_knowledge(
        self, query: str, top_k: int = 5, category: str | None = None
    ) -> list[Knowledge]:
        text = check_text(query, "query", max_chars=MAX_QUERY_CHARS)
        top_k = check_top_k(top_k)
        category = check_optional_id(category, "category")
        tags = [KNOWLEDGE_TAG] + ([f"category:{category}"] if category else [])
        params = [("query", text), ("limit", min(RECALL_LIMIT, max(2 * top_k, 20))),
                  ("tag_mode", "all"), ("tag_match", "exact"), *[("tags", t) for t in tags]]
        found = []
        for result in self._request("GET", "/recall", params=params).get("results") or []:
            server = result.get("memory") or {}
            layer = (server.get("metadata") or {}).get(LAYER) or {}
            if layer.get("kind") != "knowledge" or (category and layer.get("category") != category):
                continue
            found.append(_knowledge_from_server(server, layer,
                                                _clip(result.get("final_score",
                                                                 result.get("score")))))
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
    ) -> Memory:
        now = datetime.now(UTC)
        draft = prepare_store(
            user_id, content, conversation_id, tags, metadata, agent_id=agent_id,
            namespace=namespace, key=key, importance=importance, ttl=ttl, expires_at=expires_at,
            now=now,
        )
        _check_server_limit(draft.content, "content")
        return self._store_one(draft, now)[0]

    def store_global_knowledge(
        self,
        content: str,
        category: str,
        title: str | None = None,
        doc_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KnowledgeDocument:
        draft = prepare_knowledge(content, category, title, doc_id, metadata)
        chunks = [piece for chunk in chunk_text(draft.content)
                  for piece in _fit_server_limit(chunk)]
        old = self._list_tagged(f"document:{draft.doc_id}", kind="knowledge",
                                doc_id=draft.doc_id)
        now = datetime.now(UTC)
        created: str = min((str(_layer(m)["document_created_at"]) for m in old
                            if _layer(m).get("document_created_at")), default=now.isoformat())
        generation = uuid.uuid4().hex
        items = [{
            "content": chunk, "importance": 0.5, "timestamp": now.isoformat(),
            "tags": [KNOWLEDGE_TAG, f"category:{draft.category}", f"document:{draft.doc_id}"],
            "metadata": {LAYER: {
                "kind": "knowledge", "doc_id": draft.doc_id, "category": draft.category,
                "title": draft.title, "chunk_index": index, "chunk_count": len(chunks),
                "generation": generation, "document_metadata": draft.metadata,
                "document_created_at": created, "updated_at": now.isoformat()}},
        } for index, chunk in enumerate(chunks)]
        self._store_batches(items)
        for memory in old:  # the new chunks are in: only now do the old ones go
            self._delete_id(memory["id"])
        return {"doc_id": draft.doc_id, "category": draft.category, "title": draft.title,
                "metadata": draft.metadata, "chunk_count": len(chunks),
                "created_at": _parse_time(created) or now, "updated_at": now}

    def delete(self, memory_id: str, user_id: str | None = None) -> bool:
        memory_id, user_id = check_by_id(memory_id, user_id)
        server = self._visible_server_memory(memory_id, user_id)
        if server is None:
            return False
        layer = _layer(server)
        layer["deleted_at"] = datetime.now(UTC).isoformat()
        self._patch(memory_id, tags=[*server["tags"], DELETED_TAG], metadata=server["metadata"])
        return True

    def health_check(self) -> HealthReport:
        started = time.perf_counter()
        checks: dict[str, Any] = {}
        status = "ok"
        try:
            response = self._client.get("/health")
            body = response.json()
            service = body.get("status")
            checks["service"] = {key: body.get(key) for key in
                                 ("status", "falkordb", "qdrant", "memory_count")}
            if service != "healthy":
                status = "degraded" if service == "degraded" else "down"
            probe = self._client.get("/memory/by-tag",
                                     params=[("tags", "memory-layer:health"), ("limit", 1)])
            checks["auth"] = {"status": "ok" if probe.status_code != 401 else "unauthorized"}
            if probe.status_code == 401:
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
        server = self._visible_server_memory(memory_id, user_id, include_deleted=include_deleted)
        return None if server is None else _memory_from_server(server, memory_id)

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
    ) -> Memory | None:
        memory_id, user_id = check_by_id(memory_id, user_id)
        now = datetime.now(UTC)
        changes = prepare_changes(content=content, tags=tags, metadata=metadata,
                                  importance=importance, ttl=ttl, expires_at=expires_at,
                                  clear_expiry=clear_expiry, now=now)
        if changes.content is not None:
            _check_server_limit(changes.content, "content")
        server = self._visible_server_memory(memory_id, user_id)
        if server is None:
            return None
        layer = _layer(server)
        layer["updated_at"] = now.isoformat()
        patch: dict[str, Any] = {"updated_at": now.isoformat()}
        if changes.content is not None:
            patch["content"] = changes.content
        if changes.importance is not None:
            patch["importance"] = changes.importance
        if changes.tags is not None:
            own = set(layer.get("tags", []))
            kept = [tag for tag in server["tags"] if tag not in own]
            patch["tags"] = kept + [tag for tag in changes.tags if tag not in kept]
            layer["tags"] = changes.tags
        if changes.metadata is not None:
            server["metadata"]["data"] = changes.metadata
        if changes.expires_at is not None or changes.clear_expiry:
            layer["expires_at"] = changes.expires_at.isoformat() if changes.expires_at else None
            patch["t_invalid"] = layer["expires_at"]
        patch["metadata"] = server["metadata"]
        self._patch(memory_id, **patch)
        return self.get(memory_id, user_id)

    def store_many(self, items: Iterable[MemoryInput]) -> list[Memory]:
        now = datetime.now(UTC)
        drafts = prepare_store_many(items, now=now)
        for index, draft in enumerate(drafts):
            _check_server_limit(draft.content, f"items[{index}].content")
        results: list[Memory | None] = [None] * len(drafts)
        created: list[str] = []
        replaced: list[dict[str, Any]] = []
        try:
            plain: list[int] = []
            for index, draft in enumerate(drafts):
                if draft.key is None and draft.expires_at is None:
                    plain.append(index)
                    continue
                memory, previous = self._store_one(draft, now)
                results[index] = memory
                if previous is None:
                    created.append(memory["id"])
                else:
                    replaced.append(previous)
            # Distinct timestamps keep "newest first" exact within a batch.
            stamps = {index: now + timedelta(microseconds=n) for n, index in enumerate(plain)}
            payload = [_server_item(drafts[i], stamps[i]) for i in plain]
            ids = self._store_batches(payload, created)
            for position, (index, memory_id) in enumerate(zip(plain, ids, strict=True)):
                results[index] = _memory_from_server({**payload[position], "id": memory_id},
                                                     memory_id)
        except Exception:
            self._undo(created, replaced)
            raise
        return [memory for memory in results if memory is not None]

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
        before = check_cursor(cursor)
        now = datetime.now(UTC)
        memories = [m for m in (_memory_from_server(s, s.get("id")) for s in
                                self._list_tagged(f"user:{filters.user_id}", kind="memory",
                                                  user_id=filters.user_id))
                    if m is not None and _visible(m, filters, now, include_deleted=include_deleted)]
        memories.sort(key=_micros, reverse=True)
        if before is not None:
            memories = [m for m in memories if _micros(m) < before]
        page = memories[:limit]
        return {"items": page,
                "next_cursor": str(_micros(page[-1])) if len(memories) > limit else None}

    def restore(self, memory_id: str, user_id: str | None = None) -> bool:
        memory_id, user_id = check_by_id(memory_id, user_id)
        server = self._visible_server_memory(memory_id, user_id, include_deleted=True)
        if server is None or not _layer(server).get("deleted_at"):
            return False
        _layer(server)["deleted_at"] = None
        self._patch(memory_id, tags=[t for t in server["tags"] if t != DELETED_TAG],
                    metadata=server["metadata"])
        return True

    def forget_user(self, user_id: str) -> int:
        user_id = check_id(user_id, "user_id")
        # by-tag matches case-insensitively: only what is exactly this user's goes.
        mine = self._list_tagged(f"user:{user_id}", user_id=user_id)
        erased = 0
        for server in mine:
            self._delete_id(server["id"])
            erased += _layer(server).get("kind") == "memory"
        return erased

    def purge(self, *, retention: timedelta | None = None) -> int:
        retention = check_retention(retention, self._retention)
        now = datetime.now(UTC)
        gone = 0
        for server in self._list_tagged(MEMORY_TAG, kind="memory"):
            layer = _layer(server)
            expires, deleted = _parse_time(layer.get("expires_at")), _parse_time(
                layer.get("deleted_at"))
            if (expires and expires <= now) or (deleted and deleted <= now - retention):
                self._delete_id(server["id"])
                gone += 1
        return gone

    def delete_knowledge(self, doc_id: str) -> bool:
        doc_id = check_id(doc_id, "doc_id")
        chunks = self._list_tagged(f"document:{doc_id}", kind="knowledge", doc_id=doc_id)
        for server in chunks:
            self._delete_id(server["id"])
        return bool(chunks)

    def stats(self, user_id: str | None = None) -> dict[str, Any]:
        user_id = check_optional_id(user_id, "user_id")
        now = datetime.now(UTC)
        if user_id is not None:
            servers = self._list_tagged(f"user:{user_id}", kind="memory", user_id=user_id)
        else:
            servers = self._list_tagged(MEMORY_TAG, kind="memory")
        result: dict[str, Any] = {"driver": self.name, "memories": _counts(servers, now)}
        if user_id is None:
            users = {_layer(s).get("user_id") for s in servers}
            users |= {_layer(s).get("user_id") for s in self._list_tagged(USER_TAG, kind="user")}
            chunks = self._list_tagged(KNOWLEDGE_TAG, kind="knowledge")
            result["users"] = len(users)
            result["knowledge"] = {"documents": len({_layer(c).get("doc_id") for c in chunks}),
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
            if self._user_record(candidate) is not None:
                return False
            self._write_user(candidate, name, stored_profile, None)
            return True

        user = self.get_user(claim_user_id(chosen, insert))
        assert user is not None
        return user

    def get_user(self, user_id: str) -> User | None:
        user_id = check_id(user_id, "user_id")
        record = self._user_record(user_id)
        servers = self._list_tagged(f"user:{user_id}", kind="memory", user_id=user_id)
        created = [_parse_time(s.get("timestamp")) for s in servers]
        row = None
        if record is not None:
            layer = _layer(record)
            row = (layer.get("display_name"), layer.get("profile") or {},
                   _parse_time(layer.get("created_at")), _parse_time(layer.get("updated_at")))
        return user_record(user_id, row, _counts(servers, datetime.now(UTC)),
                           min(filter(None, created), default=None),
                           max(filter(None, created), default=None))

    def get_profile(self, user_id: str) -> dict[str, Any]:
        user_id = check_id(user_id, "user_id")
        record = self._user_record(user_id)
        return dict(_layer(record).get("profile") or {}) if record else {}

    def set_profile(
        self, user_id: str, profile: dict[str, Any], *, merge: bool = False
    ) -> dict[str, Any]:
        user_id = check_id(user_id, "user_id")
        if profile is None:
            raise InvalidInputError("profile must be a dict (got None)")
        new = check_json_object(profile, "profile", max_bytes=MAX_PROFILE_BYTES)
        merge = check_bool(merge, "merge")
        record = self._user_record(user_id)
        old = _layer(record).get("profile") or {} if record else {}
        stored = check_json_object({**old, **new} if merge else new, "profile",
                                   max_bytes=MAX_PROFILE_BYTES)
        name = _layer(record).get("display_name") if record else None
        self._write_user(user_id, name, stored, record)
        return stored

    def close(self) -> None:
        self._closed = True
        self._client.close()

    # -- private helpers ----------------------------------------------------------------------

    def _request(self, method: str, path: str, *, params: Any = None, body: Any = None,
                 creates: bool = False, not_found: Any = "raise") -> Any:
        """One API call with retries; returns the decoded body (or ``not_found`` on a 404)."""
        if self._closed:
            raise BackendUnavailableError("this AutomemDriver is closed")
        httpx = self._httpx
        reason = ""
        for attempt in range(self._max_tries):
            if attempt:
                time.sleep(self._backoff * 2 ** (attempt - 1))
            try:
                response = self._client.request(method, path, params=params, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                reason = f"cannot connect ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                if creates:
                    raise BackendUnavailableError(
                        f"AutoMem {method} {path} failed ({type(exc).__name__}); it may or may "
                        "not have been carried out") from exc
                reason = f"no answer ({type(exc).__name__})"
                continue
            if response.status_code >= 500:
                reason = f"HTTP {response.status_code}"
                continue
            try:
                decoded = response.json()
            except ValueError:
                if creates and response.status_code < 300:
                    raise BackendUnavailableError(
                        f"AutoMem {method} {path} answered an unreadable body; it may or may not "
                        "have been carried out") from None
                reason = f"unreadable answer (HTTP {response.status_code})"
                continue
            if response.status_code == 404 and not_found != "raise":
                return not_found
            if response.status_code == 400:
                raise InvalidInputError(f"AutoMem refused the request: "
                                        f"{decoded.get('message', 'bad request')}")
            if response.status_code == 401:
                raise BackendUnavailableError(
                    "AutoMem refused the token (HTTP 401): check AUTOMEM_API_TOKEN")
            if response.status_code >= 300:
                raise BackendUnavailableError(f"AutoMem {method} {path} answered HTTP "
                                              f"{response.status_code}")
            return decoded
        raise BackendUnavailableError(
            f"AutoMem {method} {path} failed after {self._max_tries} tries: {reason}")

    def _patch(self, memory_id: str, **fields: Any) -> None:
        self._request("PATCH", f"/memory/{memory_id}", body=fields)

    def _delete_id(self, memory_id: str) -> None:
        self._request("DELETE", f"/memory/{memory_id}", not_found=None)

    def _server_memory(self, memory_id: str) -> dict[str, Any] | None:
        if not _SERVER_ID.fullmatch(memory_id):
            return None  # the server answers 400 for ids that are not UUIDs: none of ours
        body = self._request("GET", f"/memory/{memory_id}", not_found=None)
        if body is None:
            return None
        server: dict[str, Any] = body.get("memory") or {}
        server.setdefault("id", memory_id)
        return server

    def _visible_server_memory(self, memory_id: str, user_id: str | None, *,
                               include_deleted: bool = False) -> dict[str, Any] | None:
        server = self._server_memory(memory_id)
        if server is None:
            return None
        memory = _memory_from_server(server, memory_id)
        if memory is None or (user_id is not None and memory["user_id"] != user_id):
            return None
        if not _visible(memory, RecallFilters(user_id=memory["user_id"]), datetime.now(UTC),
                        include_deleted=include_deleted):
            return None
        return server

    def _store_one(self, draft: MemoryDraft,
                   now: datetime) -> tuple[Memory, dict[str, Any] | None]:
        """Store or upsert one memory; returns it and, for an upsert, the memory it replaced."""
        item = _server_item(draft, now)
        existing = self._find_key(draft) if draft.key is not None else None
        if existing is not None:
            previous = dict(existing)
            layer = _layer(existing)
            item["metadata"][LAYER].update(created_at=layer.get("created_at", now.isoformat()),
                                           access_count=layer.get("access_count", 0),
                                           last_accessed_at=layer.get("last_accessed_at"))
            self._patch(existing["id"], content=item["content"], tags=item["tags"],
                        importance=item["importance"], metadata=item["metadata"],
                        t_invalid=item.get("t_invalid"), updated_at=now.isoformat())
            stored = self._server_memory(existing["id"])
            memory = _memory_from_server(stored or {}, existing["id"])
            assert memory is not None
            return memory, previous
        if draft.expires_at is not None:
            item["t_invalid"] = draft.expires_at.isoformat()
        answer = self._request("POST", "/memory", body=item, creates=True)
        memory = _memory_from_server({**item, "id": answer.get("memory_id")},
                                     answer.get("memory_id"))
        assert memory is not None
        return memory, None

    def _store_batches(self, items: list[dict[str, Any]],
                       created: list[str] | None = None) -> list[str]:
        ids: list[str] = []
        for start in range(0, len(items), BATCH_LIMIT):
            answer = self._request("POST", "/memory/batch",
                                   body={"memories": items[start:start + BATCH_LIMIT]},
                                   creates=True)
            new = list(answer.get("memory_ids") or [])
            ids += new
            if created is not None:
                created += new
        return ids

    def _undo(self, created: list[str], replaced: list[dict[str, Any]]) -> None:
        for memory_id in created:
            self._delete_id(memory_id)
        for previous in replaced:
            self._patch(previous["id"], content=previous["content"], tags=previous["tags"],
                        importance=previous["importance"], metadata=previous["metadata"],
                        t_invalid=previous.get("t_invalid"))

    def _find_key(self, draft: MemoryDraft) -> dict[str, Any] | None:
        for server in self._list_tagged(f"key:{draft.key}", kind="memory",
                                        user_id=draft.user_id):
            layer = _layer(server)
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
            body = self._request("GET", "/memory/by-tag", params=[
                ("tags", tag), ("limit", LIST_PAGE), ("offset", offset)])
            for server in body.get("memories") or []:
                layer = _layer(server)
                if ((kind is None or layer.get("kind") == kind)
                        and (user_id is None or layer.get("user_id") == user_id)
                        and (doc_id is None or layer.get("doc_id") == doc_id)
                        and server.get("id")):
                    found.append(server)
            if not body.get("has_more"):
                return found
            offset += LIST_PAGE

    def _user_record(self, user_id: str) -> dict[str, Any] | None:
        records = self._list_tagged(f"user:{user_id}", kind="user", user_id=user_id)
        return records[0] if records else None

    def _write_user(self, user_id: str, name: str | None, profile: dict[str, Any],
                    record: dict[str, Any] | None) -> None:
        now = datetime.now(UTC).isoformat()
        created = _layer(record).get("created_at") if record else now
        metadata = {LAYER: {"kind": "user", "user_id": user_id, "display_name": name,
                            "profile": profile, "created_at": created, "updated_at": now}}
        if record is None:
            self._request("POST", "/memory", creates=True, body={
                "content": f"User record {user_id}", "tags": [USER_TAG, f"user:{user_id}"],
                "importance": 0.5, "metadata": metadata})
        else:
            self._patch(record["id"], metadata=metadata)

    def _record_access(self, memory: Memory, metadata: dict[str, Any], now: datetime) -> None:
        """Count one access, patching the metadata the recall just read (no extra GET)."""
        layer = metadata[LAYER]
        layer["access_count"] = int(layer.get("access_count") or 0) + 1
        layer["last_accessed_at"] = now.isoformat()
        self._patch(memory["id"], metadata=metadata, last_accessed=now.isoformat())
        memory["access_count"] = layer["access_count"]
        memory["last_accessed_at"] = now


# -- module helpers -------------------------------------------------------------------------


def _scope_tags(filters: RecallFilters) -> list[str]:
    tags = [f"user:{filters.user_id}"]
    for prefix, value in (("agent", filters.agent_id), ("conversation", filters.conversation_id),
                          ("namespace", filters.namespace)):
        if value is not None:
            tags.append(f"{prefix}:{value}")
    return tags


def _server_item(draft: MemoryDraft, now: datetime) -> dict[str, Any]:
    """The body of ``POST /memory`` (and a batch item) for ``draft``."""
    tags = [MEMORY_TAG, f"user:{draft.user_id}", f"namespace:{draft.namespace}"]
    for prefix, value in (("agent", draft.agent_id), ("conversation", draft.conversation_id),
                          ("key", draft.key)):
        if value is not None:
            tags.append(f"{prefix}:{value}")
    tags += [tag for tag in draft.tags if tag not in tags]
    layer = {"kind": "memory", "user_id": draft.user_id, "agent_id": draft.agent_id,
             "conversation_id": draft.conversation_id, "namespace": draft.namespace,
             "key": draft.key, "tags": draft.tags, "access_count": 0, "last_accessed_at": None,
             "expires_at": draft.expires_at.isoformat() if draft.expires_at else None,
             "deleted_at": None, "created_at": now.isoformat(), "updated_at": now.isoformat()}
    return {"content": draft.content, "tags": tags, "importance": draft.importance,
            "timestamp": now.isoformat(), "metadata": {LAYER: layer, "data": draft.metadata}}


def _layer(server: dict[str, Any] | None) -> dict[str, Any]:
    if not server:
        return {}
    metadata = server.get("metadata")
    if not isinstance(metadata, dict):
        return {}
    layer = metadata.get(LAYER)
    return layer if isinstance(layer, dict) else {}


def _memory_from_server(server: dict[str, Any], memory_id: Any) -> Memory | None:
    """The contract's record of a server memory; ``None`` if it is not one of this driver's."""
    layer = _layer(server)
    if layer.get("kind") != "memory" or not memory_id:
        return None
    created = _parse_time(layer.get("created_at")) or _parse_time(server.get("timestamp"))
    updated = (_parse_time(layer.get("updated_at")) or _parse_time(server.get("updated_at"))
               or created)
    return {
        "id": str(memory_id),
        "user_id": layer.get("user_id", ""),
        "agent_id": layer.get("agent_id"),
        "conversation_id": layer.get("conversation_id"),
        "namespace": layer.get("namespace", DEFAULT_NAMESPACE),
        "key": layer.get("key"),
        "content": server.get("content", ""),
        "tags": list(layer.get("tags") or []),
        "metadata": dict((server.get("metadata") or {}).get("data") or {}),
        "importance": float(server.get("importance", 0.5)),
        "access_count": int(layer.get("access_count") or 0),
        "last_accessed_at": _parse_time(layer.get("last_accessed_at")),
        "expires_at": _parse_time(layer.get("expires_at")),
        "deleted_at": _parse_time(layer.get("deleted_at")),
        "created_at": created or datetime.now(UTC),
        "updated_at": updated or datetime.now(UTC),
    }


def _knowledge_from_server(server: dict[str, Any], layer: dict[str, Any],
                           score: float) -> Knowledge:
    return {
        "id": f"{layer.get('doc_id')}#{layer.get('chunk_index')}",
        "doc_id": layer.get("doc_id", ""),
        "category": layer.get("category", ""),
        "title": layer.get("title"),
        "content": server.get("content", ""),
        "chunk_index": int(layer.get("chunk_index") or 0),
        "metadata": dict(layer.get("document_metadata") or {}),
        "created_at": _parse_time(layer.get("updated_at")) or datetime.now(UTC),
        "score": score,
    }


def _visible(memory: Memory, filters: RecallFilters, now: datetime, *,
             include_deleted: bool = False) -> bool:
    """The client-side check every result passes, whatever the server returned."""
    if memory["user_id"] != filters.user_id:
        return False
    if memory["expires_at"] is not None and memory["expires_at"] <= now:
        return False
    if memory["deleted_at"] is not None and not include_deleted:
        return False
    for field in ("agent_id", "conversation_id", "namespace"):
        wanted = getattr(filters, field)
        if wanted is not None and memory[field] != wanted:
            return False
    if filters.min_importance is not None and memory["importance"] < filters.min_importance:
        return False
    own = set(memory["tags"])
    return set(filters.tags) <= own and not own & set(filters.exclude_tags)


def _counts(servers: list[dict[str, Any]], now: datetime) -> dict[str, int]:
    counts = {"visible": 0, "deleted": 0, "expired": 0}
    for server in servers:
        layer = _layer(server)
        expires = _parse_time(layer.get("expires_at"))
        if expires is not None and expires <= now:
            counts["expired"] += 1
        elif layer.get("deleted_at"):
            counts["deleted"] += 1
        else:
            counts["visible"] += 1
    return counts


def _check_server_limit(content: str, name: str) -> None:
    if len(content) > SERVER_CONTENT_LIMIT:
        raise InvalidInputError(f"{name} must be at most {SERVER_CONTENT_LIMIT} characters with "
                                "the automem driver (the AutoMem service's limit)")


def _fit_server_limit(chunk: str) -> list[str]:
    """``chunk`` cut into pieces the server accepts (chunks are word-bounded, words may be long)."""
    return [chunk[start:start + SERVER_CONTENT_LIMIT]
            for start in range(0, len(chunk), SERVER_CONTENT_LIMIT)] or [chunk]


def _parse_time(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def _micros(memory: Memory) -> int:
    return int(memory["created_at"].timestamp() * 1_000_000)


def _clip(value: Any) -> float:
    try:
        return round(min(1.0, max(0.0, float(value))), 6)
    except (TypeError, ValueError):
        return 0.0
