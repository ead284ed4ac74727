"""A test double of the AutoMem service: a real HTTP server on 127.0.0.1, written from
``../shared/AUTOMEM_API.md`` (release 0.16.x), quirks included.

What it reproduces: Bearer / X-API-Key / ?api_key= auth (401 without it), errors whose HTTP
status equals the body's ``code``, 201 on store, the 2,000-character content limit, batch limits
(1-500, no t_valid/t_invalid), 400 for ids that are not UUIDs, PATCH replacing metadata and not
bumping ``updated_at`` unless sent, by-tag listing (exact, case-insensitive, ANY), recall with
repeated ``tags`` (a comma list is one tag), ``tag_mode``, ``tag_match`` (prefix by default),
``exclude_tags`` (repeated or comma-separated), ``state_mode`` (``current``, the default, hides
memories whose ``timestamp`` or ``t_valid`` lies in the future or whose ``t_invalid`` passed;
``history`` shows them), ``sort``, ``limit``
(default 5, at most 100), results whose id is only at ``result["id"]`` for vector-store hits,
``+00:00`` timestamps, server-appended ``entity:`` tags and metadata keys, and ``/health`` that
always answers 200. Ranking is by keyword overlap then importance, as the real server ranks with
its placeholder embedder (every text matches every memory about equally).

Faults, for the fault tests: ``fail_next(n, status)`` (n 5xx answers), ``garbage_next(n)`` (n
unreadable bodies), ``non_object_next(n, value)`` (n answers of JSON that is not an object, such
as ``[]`` or ``"ok"``), ``hang_seconds`` (sleep before answering), ``leak_other_scopes`` (recall
also returns memories outside the asked tags, as ``scope_fallback`` can), ``graph_down`` (every
call but ``/health`` answers 500 while ``/health`` still says healthy).

What the real server does that a client must survive (``AUTOMEM_API.md``, the section of that
name), each switchable and (but for the two tag rules below) off by default; ``realistic()``
turns them all on with delays short enough for tests:

- ``enrichment_seconds``: every new memory is enriched by a background job that snapshots its
  tags and metadata at once and writes them back (plus an ``entity:`` tag and a metadata key)
  that many seconds later, undoing any tags/metadata PATCH made meanwhile.
- ``embedding_queue_seconds``: ``POST /memory`` answers ``"qdrant": "queued"`` and the vector is
  written that much later, from the text as it was at the store (so a content PATCH meanwhile
  ends with the old text's vector); ``POST /memory/batch`` embeds before it answers.
- ``embedding_model``: ranks by a stand-in for meaning. A memory's vector is the set of its
  words' first four letters ("preferences" matches "prefers"); a memory with no vector yet can
  only be found by its exact words. Without it, every memory matches every query about equally
  (the placeholder provider).
- ``prefix_exclude``: ``exclude_tags`` drops a memory having a tag that starts with one of them.
- ``case_insensitive_tags`` and ``recall_limit_cap`` (100) are on by default, as the server has
  them (the double was written with them); switch them off to see a test depend on them.
- ``batch_seconds_per_item``: a batch takes that long per item before it is stored; the server
  finishes it even after the client gave up.
- ``summarise_over``: content longer than that is replaced by a short "summary" on store (and
  on a content PATCH too with ``summarise_patches``, which the issue did not observe).
- ``after_recall``: called with the ids a recall answered, after answering (another client can
  delete one before the driver's next request); ``max_concurrent_patches`` records how many
  PATCHes were ever served at once, and ``patched`` the path of each PATCH in order.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
WORD = re.compile(r"\w+")


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()  # "+00:00", never "Z"


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class AutomemDouble:
    """The service's state and behaviour; ``start()`` serves it on a free 127.0.0.1 port."""

    def __init__(self, token: str | None = "test-token") -> None:
        self.token = token
        self.memories: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.requests = 0
        self.fail_status: list[int] = []
        self.garbage = 0
        self.hang_seconds = 0.0
        self.leak_other_scopes = False
        self.health_status = "healthy"
        self.server: ThreadingHTTPServer | None = None
        self.non_object: list[Any] = []
        self.graph_down = False
        self.enrichment_seconds: float | None = None
        self.embedding_queue_seconds: float | None = None
        self.embedding_model = False
        self.prefix_exclude = False
        self.case_insensitive_tags = True
        self.recall_limit_cap = 100
        self.batch_seconds_per_item = 0.0
        self.summarise_over: int | None = None
        self.summarise_patches = False
        self.after_recall: Callable[[list[str]], None] | None = None
        self.max_concurrent_patches = 0
        self.patched: list[str] = []  # the path of every PATCH request, in order
        self._patches_in_flight = 0
        self._pending_jobs = 0
        self._queued_vectors = 0
        self._timers: list[threading.Timer] = []

    @classmethod
    def realistic(cls, token: str | None = "test-token", *, enrichment_seconds: float = 0.05,
                  embedding_queue_seconds: float = 0.1,
                  batch_seconds_per_item: float = 0.0005) -> AutomemDouble:
        """A double with every behaviour of the real server switched on (short delays)."""
        double = cls(token)
        double.enrichment_seconds = enrichment_seconds
        double.embedding_queue_seconds = embedding_queue_seconds
        double.embedding_model = True
        double.prefix_exclude = True
        double.batch_seconds_per_item = batch_seconds_per_item
        double.summarise_over = 500
        return double

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                double.handle(self, "GET")

            def do_POST(self) -> None:
                double.handle(self, "POST")

            def do_PATCH(self) -> None:
                double.handle(self, "PATCH")

            def do_DELETE(self) -> None:
                double.handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def fail_next(self, count: int, status: int = 500) -> None:
        self.fail_status = [status] * count

    def garbage_next(self, count: int) -> None:
        self.garbage = count

    def non_object_next(self, count: int, value: Any = ()) -> None:
        """The next ``count`` answers are 200 with ``value`` (default ``[]``) as the JSON body."""
        self.non_object = [list(value) if isinstance(value, tuple) else value] * count

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every background job (enrichment, queued embedding) has run."""
        deadline = time.monotonic() + timeout
        while self._pending_jobs and time.monotonic() < deadline:
            time.sleep(0.01)

    def _later(self, seconds: float, job: Callable[[], None]) -> None:
        def run() -> None:
            with self.lock:
                try:
                    job()
                finally:
                    self._pending_jobs -= 1

        self._pending_jobs += 1
        timer = threading.Timer(seconds, run)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    # -- dispatch --------------------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        self.requests += 1
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        url = urlparse(request.path)
        query = parse_qs(url.query, keep_blank_values=True)
        try:
            if self.fail_status:
                status = self.fail_status.pop(0)
                raise HttpError(status, "Internal error")
            if self.garbage:
                self.garbage -= 1
                self._send(request, 200, b"<html>proxy error</html>", raw=True)
                return
            if self.non_object:
                self._send(request, 200, self.non_object.pop(0))
                return
            if url.path == "/health" and method == "GET":
                self._send(request, 200, self.health())
                return
            self._authorise(request, query)
            if self.graph_down:
                raise HttpError(500, "Failed to fetch memory")
            length = int(request.headers.get("Content-Length") or 0)
            body = json.loads(request.rfile.read(length) or b"{}") if length else {}
            if url.path == "/memory/batch" and self.batch_seconds_per_item:
                items = body.get("memories") if isinstance(body, dict) else None
                time.sleep(self.batch_seconds_per_item * len(items or []))
            patching = method == "PATCH"
            if patching:
                with self.lock:
                    self.patched.append(url.path)
                    self._patches_in_flight += 1
                    self.max_concurrent_patches = max(self.max_concurrent_patches,
                                                      self._patches_in_flight)
                time.sleep(0.005)  # long enough for concurrent PATCHes to overlap
            try:
                status, answer = self.route(method, url.path, query, body)
            finally:
                if patching:
                    with self.lock:
                        self._patches_in_flight -= 1
            self._send(request, status, answer)
            if url.path == "/recall" and self.after_recall is not None:
                self.after_recall([result["id"] for result in answer["results"]])
        except HttpError as error:
            self._send(request, error.code,
                       {"status": "error", "code": error.code, "message": error.message})
        except (ValueError, TypeError, KeyError) as error:
            self._send(request, 400, {"status": "error", "code": 400, "message": str(error)})

    def _authorise(self, request: BaseHTTPRequestHandler, query: dict[str, list[str]]) -> None:
        if not self.token:
            return
        offered = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        offered = offered or request.headers.get("X-API-Key") or (query.get("api_key") or [""])[0]
        if offered != self.token:
            raise HttpError(401, "Unauthorized")

    def _send(self, request: BaseHTTPRequestHandler, status: int, body: Any,
              raw: bool = False) -> None:
        data = body if raw else json.dumps(body).encode()
        # A client that gave up (a timeout) gets nothing; what was done stays done, as on the
        # real server.
        with contextlib.suppress(OSError):
            request.send_response(status)
            request.send_header("Content-Type", "text/html" if raw else "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)

    def route(self, method: str, path: str, query: dict[str, list[str]],
              body: dict[str, Any]) -> tuple[int, Any]:
        with self.lock:
            if path == "/memory" and method == "POST":
                memory_id = self._create(body)
                stored = self.memories[memory_id]
                queued = self.embedding_queue_seconds is not None
                if queued:
                    stored["vector_text"] = None
                    text = stored["content"]

                    def embed() -> None:
                        self._queued_vectors -= 1
                        if memory_id in self.memories:  # the old text's vector, over any newer
                            self.memories[memory_id]["vector_text"] = text

                    self._queued_vectors += 1
                    self._later(self.embedding_queue_seconds or 0.0, embed)
                return 201, {"status": "success", "memory_id": memory_id,
                             "timestamp": stored["timestamp"], "updated_at": stored["updated_at"],
                             "type": stored["type"], "qdrant": "queued" if queued else "stored"}
            if path == "/memory/batch" and method == "POST":
                items = body.get("memories")
                if not isinstance(items, list) or not 1 <= len(items) <= 500:
                    raise HttpError(400, "memories must be a list of 1 to 500 items")
                for item in items:
                    if "t_valid" in item or "t_invalid" in item:
                        raise HttpError(400, "t_valid and t_invalid are not accepted in a batch")
                    self._check_memory(item)
                ids = [self._create(item) for item in items]
                return 201, {"status": "success", "stored": len(ids), "memory_ids": ids}
            if path == "/memory/by-tag":
                return 200, self._by_tag(method, query)
            if path == "/recall" and method == "GET":
                return 200, self._recall(query)
            match = re.fullmatch(r"/memory/([^/]+)", path)
            if match:
                return 200, self._one(method, match.group(1), body)
            raise HttpError(405 if path.startswith("/memory") else 404, "Not found")

    # -- endpoints -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        status = self.health_status
        if status == "healthy" and self._queued_vectors:
            status = "degraded"  # the real server says so while vectors are queued
        return {"status": status, "falkordb": "connected",
                "qdrant": "connected" if self.embedding_model else "disconnected",
                "memory_count": None if self.graph_down else len(self.memories),
                "vector_count": 0, "timestamp": _iso(_now())}

    def _check_memory(self, item: dict[str, Any]) -> None:
        content = item.get("content")
        if not isinstance(content, str) or not content.strip():
            raise HttpError(400, "content is required")
        if len(content) > 2000:
            raise HttpError(400, "content must be at most 2000 characters")
        tags = item.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise HttpError(400, "tags must be a list of strings")
        importance = item.get("importance", 0.5)
        if not isinstance(importance, (int, float)) or not 0 <= importance <= 1:
            raise HttpError(400, "importance must be between 0 and 1")
        if not isinstance(item.get("metadata", {}), dict):
            raise HttpError(400, "metadata must be an object")

    def _create(self, item: dict[str, Any]) -> str:
        self._check_memory(item)
        memory_id = str(uuid.uuid4())
        now = _iso(_now())
        content = self._summarised(item["content"])
        tags = list(item.get("tags", []))
        metadata = dict(item.get("metadata", {}))
        if self.enrichment_seconds is None:
            # The server enriches what it stores: an entity tag and a metadata key of its own.
            tags.append("entity:enriched")
            metadata["enriched_by"] = "double"
        else:
            snapshot = json.loads(json.dumps({"tags": tags, "metadata": metadata}))

            def enrich() -> None:  # writes back what it read at the store, over any PATCH
                if memory_id in self.memories:
                    self.memories[memory_id]["tags"] = snapshot["tags"] + ["entity:enriched"]
                    self.memories[memory_id]["metadata"] = {**snapshot["metadata"],
                                                           "enriched_by": "double"}

            self._later(self.enrichment_seconds, enrich)
        self.memories[memory_id] = {
            "id": memory_id,
            "content": content,
            "vector_text": content,
            "tags": tags,
            "importance": float(item.get("importance", 0.5)),
            "type": item.get("type", "Context"),
            "confidence": item.get("confidence", 0.9),
            "timestamp": _iso(_parse_time(item["timestamp"])) if item.get("timestamp") else now,
            "updated_at": now,
            "last_accessed": now,
            "t_valid": item.get("t_valid"),
            "t_invalid": _iso(_parse_time(item["t_invalid"])) if item.get("t_invalid") else None,
            "metadata": metadata,
        }
        return memory_id

    def _one(self, method: str, memory_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not UUID.fullmatch(memory_id):
            raise HttpError(400, "Invalid memory id")
        stored = self.memories.get(memory_id)
        if stored is None:
            raise HttpError(404, "Memory not found")
        if method == "GET":
            return {"status": "success", "memory": self._public(stored)}
        if method == "DELETE":
            del self.memories[memory_id]
            return {"status": "success", "memory_id": memory_id}
        if method == "PATCH":
            allowed = {"content", "tags", "importance", "type", "confidence", "timestamp",
                       "t_valid", "t_invalid", "metadata", "updated_at", "last_accessed"}
            unknown = set(body) - allowed
            if unknown:
                raise HttpError(400, f"unknown fields: {sorted(unknown)}")
            if "content" in body:
                self._check_memory({**stored, **body})
                if self.summarise_patches:
                    body = {**body, "content": self._summarised(body["content"])}
            for field, value in body.items():
                stored[field] = value  # metadata replaces; updated_at moves only when sent
            if "content" in body:
                stored["vector_text"] = body["content"]  # a PATCH embeds before it answers
            return {"status": "success", "memory_id": memory_id}
        raise HttpError(405, "Method not allowed")

    def _by_tag(self, method: str, query: dict[str, list[str]]) -> dict[str, Any]:
        fold = self._fold
        wanted = {fold(tag) for tag in query.get("tags", [])}
        found = [m for m in self.memories.values()
                 if wanted & {fold(tag) for tag in m["tags"]}]
        if method == "DELETE":
            for memory in found:
                del self.memories[memory["id"]]
            return {"status": "success", "deleted_count": len(found)}
        limit = int((query.get("limit") or ["20"])[0])
        offset = int((query.get("offset") or ["0"])[0])
        if not 1 <= limit <= 200:
            raise HttpError(400, "limit must be between 1 and 200")
        found.sort(key=lambda m: (m["importance"], m["timestamp"]), reverse=True)
        page = found[offset:offset + limit]
        return {"status": "success", "memories": [self._public(m) for m in page],
                "count": len(page), "has_more": offset + limit < len(found)}

    def _recall(self, query: dict[str, list[str]]) -> dict[str, Any]:
        limit = min(self.recall_limit_cap, int((query.get("limit") or ["5"])[0]))
        text = (query.get("query") or [""])[0]
        fold = self._fold
        tags = [fold(tag) for tag in query.get("tags", [])]
        mode = (query.get("tag_mode") or ["any"])[0]
        exact = (query.get("tag_match") or ["prefix"])[0] == "exact"
        excluded = {fold(t) for raw in query.get("exclude_tags", []) for t in raw.split(",")}
        now = _now()

        def carries(memory: dict[str, Any], tag: str) -> bool:
            own = [fold(t) for t in memory["tags"]]
            return tag in own if exact else any(t.startswith(tag) for t in own)

        def in_scope(memory: dict[str, Any]) -> bool:
            if tags:
                hits = [carries(memory, tag) for tag in tags]
                if not (all(hits) if mode == "all" else any(hits)):
                    return False
            own = {fold(t) for t in memory["tags"]}
            if self.prefix_exclude:
                return not any(t.startswith(x) for t in own for x in excluded)
            return not excluded & own

        def current(memory: dict[str, Any]) -> bool:
            if memory["t_invalid"] and _parse_time(memory["t_invalid"]) <= now:
                return False
            if memory.get("t_valid") and _parse_time(memory["t_valid"]) > now:
                return False
            return _parse_time(memory["timestamp"]) <= now

        words = {w.lower() for w in WORD.findall(text)}
        stems = {w[:4] for w in words}

        def keyword(memory: dict[str, Any]) -> float:
            own = {w.lower() for w in WORD.findall(memory["content"])}
            return len(words & own) / len(words) if words else 0.0

        def meaning(memory: dict[str, Any]) -> float:
            vector = {w.lower()[:4] for w in WORD.findall(memory["vector_text"] or "")}
            return len(stems & vector) / len(stems) if stems else 0.0

        def findable(memory: dict[str, Any]) -> bool:
            # With a model, a memory is found through its vector, or else by its exact words.
            return (not self.embedding_model or not words or memory["vector_text"] is not None
                    or keyword(memory) > 0)

        # state_mode=current (the default) hides what is not valid now; history shows all.
        history = (query.get("state_mode") or ["current"])[0] == "history"
        chosen = [m for m in self.memories.values() if (history or current(m)) and findable(m)
                  and (in_scope(m) or self.leak_other_scopes)]

        def score(memory: dict[str, Any]) -> float:
            if self.embedding_model:
                return round(0.5 * meaning(memory) + 0.3 * keyword(memory)
                             + 0.2 * memory["importance"], 6)
            return round(0.7 * keyword(memory) + 0.3 * memory["importance"], 6)

        sort = (query.get("sort") or ["score"])[0]
        if sort == "time_asc":
            chosen.sort(key=lambda m: m["timestamp"])
        elif sort != "score":
            chosen.sort(key=lambda m: m["timestamp"], reverse=True)
        elif text:
            chosen.sort(key=lambda m: (score(m), m["timestamp"]), reverse=True)
        else:
            chosen.sort(key=lambda m: (m["importance"], m["timestamp"]), reverse=True)
        results = []
        for index, memory in enumerate(chosen[:limit]):
            public = self._public(memory)
            source = "qdrant" if index % 2 == 0 else "graph"
            if source == "qdrant":
                del public["id"]  # vector-store hits carry the id only at the top level
            results.append({"id": memory["id"], "score": score(memory),
                            "final_score": score(memory), "match_type": "keyword",
                            "source": source, "memory": public, "score_components": {}})
        return {"status": "success", "results": results, "count": len(results)}

    def _summarised(self, content: str) -> str:
        if self.summarise_over is not None and len(content) > self.summarise_over:
            return "Summary: " + " ".join(content.split()[:12])
        return content

    def _fold(self, tag: str) -> str:
        return tag.lower() if self.case_insensitive_tags else tag

    def _public(self, memory: dict[str, Any]) -> dict[str, Any]:
        public = json.loads(json.dumps(memory))
        del public["vector_text"]
        public["tag_prefixes"] = sorted({tag.split(":")[0] for tag in memory["tags"]})
        return public
