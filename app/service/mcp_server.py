"""The MCP server: the contract's everyday verbs as MCP tools, built with the official ``mcp`` SDK.

Tools: ``store_memory``, ``recall_memory``, ``update_memory``, ``delete_memory``,
``list_memories``, ``search_knowledge``. Each answers with structured content (the records as the
HTTP API returns them) plus a short text for models that read text only. Bad arguments and
refusals come back as a tool error carrying the library's message (``isError``), never as a
crash of the server.

The tools take no ``user_id``: whose memories they touch is fixed outside the model's reach.

- **stdio** (``python -m app mcp --user U``): the agent launches the server for one user.
- **streamable HTTP** at ``/mcp`` inside ``python -m app serve``: the request's API key decides.
  A user key acts for its user; an admin key names the user in an ``X-Memory-User`` header (one
  per client configuration). ``--no-auth`` servers need that header too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field, TypeAdapter
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.core.memory.aio import AsyncMemoryDriver
from app.core.memory.errors import InvalidInputError, MemoryDriverError
from app.core.memory.validation import parse_iso_time
from app.service import schemas as s
from app.service.asgi import send_error
from app.service.keys import AuthError, Principal, Unauthorized

if TYPE_CHECKING:
    from app.service.http_api import ServiceState

log = logging.getLogger("app.service")

#: The header an admin key (or a --no-auth server) names the user with over MCP.
USER_HEADER = "x-memory-user"

INSTRUCTIONS = (
    "Long-term memory about the user you are talking to. Before answering, call recall_memory "
    "with what the user asks about to get what you learned earlier. When you learn something "
    "worth keeping (a preference, a fact, a decision), call store_memory with one short, "
    "self-contained sentence. search_knowledge searches documents shared by all users "
    "(policies, documentation)."
)

_memories = TypeAdapter(list[s.MemoryOut])
_hits = TypeAdapter(list[s.SearchHit])
_knowledge = TypeAdapter(list[s.KnowledgeOut])

#: How a tool call finds its driver and the user it acts for.
Resolver = Callable[[Context], Awaitable[tuple[AsyncMemoryDriver, str]]]
KnowledgeResolver = Callable[[Context], Awaitable[AsyncMemoryDriver]]

Tags = Annotated[list[str] | None, Field(description="Short labels without commas, e.g. "
                                                     "[\"preference\", \"ui\"].")]
OccurredAt = Annotated[str | None, Field(description=(
    "When the remembered thing was said or happened, as ISO 8601 with a UTC offset, e.g. "
    "\"2023-05-07T14:30:00+00:00\" or \"2023-05-07T14:30:00Z\". Give it when the user mentions "
    "when something happened or will happen (\"I moved to Lisbon in May 2023\": "
    "\"2023-05-01T00:00:00Z\"); a future time is fine for plans. Leave out for \"now\".")),
]


def build_server(resolve: Resolver, resolve_driver: KnowledgeResolver) -> MCPServer[Any]:
    """An ``MCPServer`` with the memory tools; ``resolve`` says whose memories a call touches."""
    server: MCPServer[Any] = MCPServer("memory", instructions=INSTRUCTIONS, version="0.1.0",
                                       log_level="WARNING")

    @server.tool(annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=False))
    async def store_memory(
        ctx: Context,
        content: Annotated[str, Field(description="What to remember: one short, self-contained "
                                                  "statement about the user.")],
        tags: Tags = None,
        importance: Annotated[float, Field(description="0..1; how much this matters.")] = 0.5,
        key: Annotated[str | None, Field(description="Upsert key: storing again with the same "
                                                     "key replaces that memory, e.g. "
                                                     "\"favourite_color\".")] = None,
        conversation_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        ttl_seconds: Annotated[float | None, Field(description="Forget it after this many "
                                                               "seconds.")] = None,
        namespace: str = "default",
        occurred_at: OccurredAt = None,
    ) -> CallToolResult:
        """Remember something about the user for later conversations. Returns the stored memory
        with its id."""
        driver, user_id = await resolve(ctx)
        memory = await _verb(driver.store(
            user_id, content, conversation_id, tags, metadata, namespace=namespace, key=key,
            importance=importance, ttl=ttl_seconds,
            occurred_at=_time_argument(occurred_at, "occurred_at")))
        return _answer(f"stored {memory['id']}", {"memory": _one(memory)})

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def recall_memory(
        ctx: Context,
        query: Annotated[str | None, Field(description="What to look for, in plain words. "
                                                       "Leave out for the newest memories.")]
        = None,
        top_k: Annotated[int, Field(description="At most this many memories (1..100).")] = 5,
        tags: Annotated[list[str] | None, Field(description="Only memories carrying all of "
                                                            "these tags.")] = None,
        exclude_tags: Annotated[list[str] | None, Field(description="Skip memories carrying "
                                                                    "any of these.")] = None,
        conversation_id: str | None = None,
        namespace: str | None = None,
        start: Annotated[datetime | None, Field(
            description="Only memories from this time on (ISO 8601 with a timezone, e.g. "
                        "2023-05-01T00:00:00Z).")] = None,
        end: Annotated[datetime | None, Field(
            description="Only memories up to this time (ISO 8601 with a timezone).")] = None,
        context: Annotated[int, Field(
            description="Also return the N messages before and after each result in its "
                        "conversation (0..20), to see what was around it.")] = 0,
    ) -> CallToolResult:
        """Recall what is known about the user, most relevant first (hybrid semantic and keyword
        search). Each result has a score from 0 to 1. A query that names a time ("in May
        2023", "last Friday") favours memories from then; start and end filter by time."""
        driver, user_id = await resolve(ctx)
        found = await _verb(driver.recall(user_id, conversation_id, query, top_k,
                                          exclude_tags=exclude_tags, namespace=namespace,
                                          tags=tags, start=start, end=end, context=context))
        lines = [f"{m['score']:.2f} {m['id']}: {_short(m['content'])}" for m in found]
        results = _hits.dump_python(_hits.validate_python(found), mode="json", exclude_none=True)
        return _answer("\n".join(lines) or "no memories found", {"results": results})

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True))
    async def update_memory(
        ctx: Context,
        memory_id: Annotated[str, Field(description="The id from store_memory or "
                                                    "recall_memory.")],
        content: str | None = None,
        tags: Annotated[list[str] | None, Field(description="Replaces all tags.")] = None,
        importance: float | None = None,
        metadata: Annotated[dict[str, Any] | None, Field(description="Replaces the metadata.")]
        = None,
        occurred_at: OccurredAt = None,
    ) -> CallToolResult:
        """Correct a memory in place; only the fields given change."""
        driver, user_id = await resolve(ctx)
        memory = await _verb(driver.update(
            memory_id, user_id, content=content, tags=tags, importance=importance,
            metadata=metadata, occurred_at=_time_argument(occurred_at, "occurred_at")))
        if memory is None:
            raise ToolError(f"no memory {memory_id}")
        return _answer(f"updated {memory_id}", {"memory": _one(memory)})

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True))
    async def delete_memory(
        ctx: Context,
        memory_id: Annotated[str, Field(description="The id of the memory to forget.")],
    ) -> CallToolResult:
        """Forget a memory (it can be restored by an operator until it is purged)."""
        driver, user_id = await resolve(ctx)
        if not await _verb(driver.delete(memory_id, user_id)):
            raise ToolError(f"no memory {memory_id}")
        return _answer(f"deleted {memory_id}", {"id": memory_id, "deleted": True})

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def list_memories(
        ctx: Context,
        limit: Annotated[int, Field(description="Page size (1..1000).")] = 20,
        cursor: Annotated[str | None, Field(description="next_cursor of the previous page.")]
        = None,
        tags: Annotated[list[str] | None, Field(description="Only memories carrying all of "
                                                            "these tags.")] = None,
        namespace: str | None = None,
    ) -> CallToolResult:
        """List the user's memories, newest first, one page at a time."""
        driver, user_id = await resolve(ctx)
        page = await _verb(driver.list_memories(user_id, tags=tags, namespace=namespace,
                                                limit=limit, cursor=cursor))
        more = f"; more with cursor {page['next_cursor']}" if page["next_cursor"] else ""
        return _answer(f"{len(page['items'])} memories{more}",
                       {"items": _many(page["items"]), "next_cursor": page["next_cursor"]})

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def search_knowledge(
        ctx: Context,
        query: Annotated[str, Field(description="What to look for in the shared documents.")],
        top_k: Annotated[int, Field(description="At most this many passages (1..100).")] = 5,
        category: Annotated[str | None, Field(description="Only this category, e.g. "
                                                          "\"policies\".")] = None,
    ) -> CallToolResult:
        """Search knowledge shared by all users (policies, documentation), best passages
        first."""
        driver = await resolve_driver(ctx)
        found = await _verb(driver.recall_global_knowledge(query, top_k, category))
        lines = [f"{k['score']:.2f} {k['doc_id']}: {_short(k['content'])}" for k in found]
        return _answer("\n".join(lines) or "no knowledge found",
                       {"results": _knowledge.dump_python(_knowledge.validate_python(found),
                                                          mode="json")})

    return server


def _time_argument(value: str | None, name: str) -> datetime | None:
    """A time argument (ISO 8601 text) as a datetime; bad text is a tool error naming it."""
    if value is None:
        return None
    try:
        return parse_iso_time(value, name)
    except InvalidInputError as exc:
        raise ToolError(str(exc)) from exc


async def _verb(call: Awaitable[Any]) -> Any:
    """Await a verb; the library's errors (bad input, backend down...) become tool errors."""
    try:
        return await call
    except MemoryDriverError as exc:
        raise ToolError(str(exc)) from exc


def _answer(text: str, structured: dict[str, Any]) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=structured)


def _one(memory: Any) -> dict[str, Any]:
    return _many([memory])[0]


def _many(memories: Any) -> list[dict[str, Any]]:
    return _memories.dump_python(_memories.validate_python(memories), mode="json",
                                 exclude_none=False)


def _short(text: str, width: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# -- stdio --------------------------------------------------------------------------------------


async def serve_stdio(driver: AsyncMemoryDriver, user_id: str) -> None:
    """Serve the tools on stdin/stdout for ``user_id`` until the client closes the pipe."""

    async def resolve(ctx: Context) -> tuple[AsyncMemoryDriver, str]:
        return driver, user_id

    async def resolve_driver(ctx: Context) -> AsyncMemoryDriver:
        return driver

    await build_server(resolve, resolve_driver).run_stdio_async()


# -- streamable HTTP inside `serve` -------------------------------------------------------------


class HttpMcp:
    """The MCP endpoint of the HTTP service: ``routes()`` for the app, ``running()`` for its
    lifespan, ``attach(state)`` once the driver and the key store are open."""

    def __init__(self, *, max_body_bytes: int, host: str) -> None:
        self._state: ServiceState | None = None
        self.server = build_server(self._resolve, self._resolve_driver)
        loopback = host in ("127.0.0.1", "localhost", "::1")
        security = TransportSecuritySettings(
            # Behind a non-loopback bind the key is the protection; Host names are the
            # deployment's business.
            enable_dns_rebinding_protection=loopback,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
        )
        self.server.streamable_http_app(streamable_http_path="/mcp", transport_security=security,
                                        max_request_body_size=max_body_bytes, host=host)
        self._endpoint = StreamableHTTPASGIApp(self.server.session_manager)

    def attach(self, state: ServiceState) -> None:
        self._state = state

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.server.session_manager.run():
            yield

    def routes(self) -> list[Route]:
        # The instance itself is the endpoint: Starlette treats a callable object as an ASGI app
        # (a function or method would be wrapped as a request -> response handler).
        return [Route("/mcp", endpoint=self, include_in_schema=False)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key of every request to /mcp (401 in the service's error shape)."""
        state = self._require_state()
        try:
            principal = await self._principal(state, scope)
        except Unauthorized as exc:
            await send_error(send, 401, "unauthorized", str(exc),
                             [(b"www-authenticate", b"Bearer")])
            return
        except MemoryDriverError as exc:
            await send_error(send, 503, "backend_unavailable", str(exc),
                             [(b"retry-after", b"5")])
            return
        scope.setdefault("state", {})["memory_principal"] = principal
        await self._endpoint(scope, receive, send)

    async def _principal(self, state: ServiceState, scope: Scope) -> Principal:
        return await state.principal(_header(scope, b"authorization"))

    async def _resolve(self, ctx: Context) -> tuple[AsyncMemoryDriver, str]:
        state = self._require_state()
        request = ctx.request_context.request
        principal = request.scope.get("state", {}).get("memory_principal") if request else None
        if not isinstance(principal, Principal):
            raise ToolError("this call carries no authenticated key")
        try:
            if principal.is_admin:
                named = request.headers.get(USER_HEADER) if request else None
                if not named:
                    raise InvalidInputError("an admin key names the user in the X-Memory-User "
                                            "header (or use a user key)")
                return state.driver, principal.acting_user(named)
            return state.driver, principal.acting_user(None)
        except (AuthError, MemoryDriverError) as exc:
            raise ToolError(str(exc)) from exc

    async def _resolve_driver(self, ctx: Context) -> AsyncMemoryDriver:
        return self._require_state().driver

    def _require_state(self) -> ServiceState:
        if self._state is None:
            raise RuntimeError("the MCP endpoint is used before the service started")
        return self._state


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def build_http_mcp(*, max_body_bytes: int, host: str = "127.0.0.1") -> HttpMcp:
    """The ``/mcp`` endpoint for ``http_api.create_app``."""
    return HttpMcp(max_body_bytes=max_body_bytes, host=host)
