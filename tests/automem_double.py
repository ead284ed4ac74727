"""A test double of the AutoMem service: a real HTTP server on 127.0.0.1, written from
``../shared/AUTOMEM_API.md`` (release 0.16.x), quirks included.

What it reproduces: Bearer / X-API-Key / ?api_key= auth (401 without it), errors whose HTTP
status equals the body's ``code``, 201 on store, the 2,000-character content limit, batch limits
(1-500, no t_valid/t_invalid), 400 for ids that are not UUIDs, PATCH replacing metadata and not
bumping ``updated_at`` unless sent, by-tag listing (exact, case-insensitive, ANY), recall with
repeated ``tags`` (a comma list is one tag), ``tag_mode``, ``tag_match`` (prefix by default),
``exclude_tags`` (repeated or comma-separated), ``state_mode=current``, ``sort``, ``limit``
(default 5, at most 100), results whose id is only at ``result["id"]`` for vector-store hits,
``+00:00`` timestamps, server-appended ``entity:`` tags and metadata keys, and ``/health`` that
always answers 200. Ranking is by keyword overlap then importance, as the real server ranks with
its placeholder embedder (every text matches every memory about equally).

Faults, for the fault tests: ``fail_next(n, status)`` (n 5xx answers), ``garbage_next(n)`` (n
unreadable bodies), ``hang_seconds`` (sleep before answering), ``leak_other_scopes`` (recall also
returns memories outside the asked tags, as ``scope_fallback`` can).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
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
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def fail_next(self, count: int, status: int = 500) -> None:
        self.fail_status = [status] * count

    def garbage_next(self, count: int) -> None:
        self.garbage = count

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
            if url.path == "/health" and method == "GET":
                self._send(request, 200, self.health())
                return
            self._authorise(request, query)
            length = int(request.headers.get("Content-Length") or 0)
            body = json.loads(request.rfile.read(length) or b"{}") if length else {}
            status, answer = self.route(method, url.path, query, body)
            self._send(request, status, answer)
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
                return 201, {"status": "success", "memory_id": memory_id,
                             "timestamp": stored["timestamp"], "updated_at": stored["updated_at"],
                             "type": stored["type"], "qdrant": "unconfigured"}
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
        return {"status": self.health_status, "falkordb": "connected",
                "qdrant": "disconnected", "memory_count": len(self.memories),
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
        # The server enriches what it stores: an entity tag and a metadata key of its own.
        self.memories[memory_id] = {
            "id": memory_id,
            "content": item["content"],
            "tags": list(item.get("tags", [])) + ["entity:enriched"],
            "importance": float(item.get("importance", 0.5)),
            "type": item.get("type", "Context"),
            "confidence": item.get("confidence", 0.9),
            "timestamp": _iso(_parse_time(item["timestamp"])) if item.get("timestamp") else now,
            "updated_at": now,
            "last_accessed": now,
            "t_valid": item.get("t_valid"),
            "t_invalid": _iso(_parse_time(item["t_invalid"])) if item.get("t_invalid") else None,
            "metadata": {**item.get("metadata", {}), "enriched_by": "double"},
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
            for field, value in body.items():
                stored[field] = value  # metadata replaces; updated_at moves only when sent
            return {"status": "success", "memory_id": memory_id}
        raise HttpError(405, "Method not allowed")

    def _by_tag(self, method: str, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = {tag.lower() for tag in query.get("tags", [])}
        found = [m for m in self.memories.values()
                 if wanted & {tag.lower() for tag in m["tags"]}]
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
        limit = min(100, int((query.get("limit") or ["5"])[0]))
        text = (query.get("query") or [""])[0]
        tags = [tag.lower() for tag in query.get("tags", [])]
        mode = (query.get("tag_mode") or ["any"])[0]
        exact = (query.get("tag_match") or ["prefix"])[0] == "exact"
        excluded = {t.lower() for raw in query.get("exclude_tags", []) for t in raw.split(",")}
        now = _now()

        def carries(memory: dict[str, Any], tag: str) -> bool:
            own = [t.lower() for t in memory["tags"]]
            return tag in own if exact else any(t.startswith(tag) for t in own)

        def in_scope(memory: dict[str, Any]) -> bool:
            if tags:
                hits = [carries(memory, tag) for tag in tags]
                if not (all(hits) if mode == "all" else any(hits)):
                    return False
            return not excluded & {t.lower() for t in memory["tags"]}

        def current(memory: dict[str, Any]) -> bool:
            if memory["t_invalid"] and _parse_time(memory["t_invalid"]) <= now:
                return False
            return _parse_time(memory["timestamp"]) <= now

        chosen = [m for m in self.memories.values() if current(m) and
                  (in_scope(m) or self.leak_other_scopes)]
        words = {w.lower() for w in WORD.findall(text)}

        def score(memory: dict[str, Any]) -> float:
            own = {w.lower() for w in WORD.findall(memory["content"])}
            overlap = len(words & own) / len(words) if words else 0.0
            return round(0.7 * overlap + 0.3 * memory["importance"], 6)

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

    def _public(self, memory: dict[str, Any]) -> dict[str, Any]:
        public = json.loads(json.dumps(memory))
        public["tag_prefixes"] = sorted({tag.split(":")[0] for tag in memory["tags"]})
        return public
