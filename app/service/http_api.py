"""The HTTP API: a FastAPI app whose routes are the contract's verbs, over ``AsyncMemoryDriver``.

``create_app(...)`` builds it; ``python -m app serve`` runs it under uvicorn. Every route parses
its arguments, decides from the caller's key which user it acts for (``keys.Principal``), calls
one verb and returns the record as the library returns it. Errors take one shape,
``{"error": {"type", "message"}}``, from one table (``ERRORS``): no route catches an error itself
and no answer carries a stack trace. ``/openapi.json`` and ``/docs`` describe every route.

The model is loaded (and the backend reached) once, at start-up; ``/health`` needs no key and
never fails. The MCP server (``mcp_server.py``) is mounted at ``/mcp`` over the same driver, the
same keys and the same body limit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar, cast

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from app.core.keys import KeyStore
from app.core.memory.aio import AsyncMemoryDriver, get_async_memory_driver
from app.core.memory.errors import (
    BackendUnavailableError,
    EmbeddingMismatchError,
    InvalidInputError,
    MemoryDriverError,
    NotSupportedError,
    SchemaNotMigratedError,
)
from app.core.memory.records import MemoryInput
from app.service import schemas as s
from app.service.asgi import BodyLimit, Shield
from app.service.keys import (
    OPERATOR,
    Forbidden,
    Principal,
    Unauthorized,
    create_key,
    key_summary,
    presented_key_hash,
    principal_of,
)

log = logging.getLogger("app.service")

#: Seconds a client is told to wait after a 503.
RETRY_AFTER_SECONDS = 5
#: Threads for key-store calls.
KEY_WORKERS = 4
#: Seconds an active key is trusted without a new lookup (see ``ServiceState``).
KEY_CACHE_SECONDS = 1.0
#: Keys remembered at most (beyond it the memory starts afresh).
KEY_CACHE_ENTRIES = 4_096

T = TypeVar("T")


class NotFound(Exception):
    """The verb found nothing (an unknown id, or another user's: they answer the same)."""


#: The one error table: exception -> (HTTP status, error type). Looked up along the MRO, so a
#: subclass maps like its parent unless listed itself.
ERRORS: dict[type[Exception], tuple[int, str]] = {
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    NotFound: (404, "not_found"),
    InvalidInputError: (422, "invalid_input"),
    NotSupportedError: (501, "not_supported"),
    BackendUnavailableError: (503, "backend_unavailable"),
    SchemaNotMigratedError: (503, "schema_not_migrated"),
    EmbeddingMismatchError: (503, "embedding_mismatch"),
    MemoryDriverError: (500, "memory_error"),
}

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": s.ErrorBody, "description": description} for status, description in (
        (401, "No key, a malformed key, or a key unknown or revoked."),
        (403, "The key may not do this (another user's data, or an admin-only verb)."),
        (404, "Nothing found (another user's id answers the same)."),
        (413, "The request body is over the limit."),
        (422, "Bad input: the message names the argument and the rule."),
        (503, "The backend is unavailable or not migrated; retry after Retry-After seconds."),
    )
}


@dataclass
class ServiceState:
    """What the routes share: the driver, the key store, whether keys are required.

    Key-store calls run on a small pool of their own (``KEY_WORKERS`` threads, made on first use
    and kept), so a key lookup never blocks the event loop, never waits behind memory calls, and
    the number of threads stays fixed however many clients come and go.

    A key found active is remembered for ``key_cache_seconds`` (by its hash, never the key), so
    a client sending many requests costs one lookup a second rather than one a request (~30 us
    of the event loop each on SQLite; a thread hand-off and a round trip on PostgreSQL). A key
    revoked through this server (``DELETE /v1/keys/{id}``) is refused on the very next request;
    one revoked elsewhere (``keys revoke``, another server) within ``key_cache_seconds``. Keys
    found unknown or revoked are not remembered, so a new key works at once.
    """

    driver: AsyncMemoryDriver
    keys: KeyStore | None
    auth: bool
    model_loaded: bool = False
    key_cache_seconds: float = KEY_CACHE_SECONDS
    key_workers: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=KEY_WORKERS, thread_name_prefix="memory-keys"))
    #: key hash -> (its Principal, monotonic time it was looked up); touched on the loop only.
    _known: dict[str, tuple[Principal, float]] = field(default_factory=dict)
    _generation: int = 0

    async def principal(self, authorization: str | None) -> Principal:
        """Who sends ``authorization`` (``OPERATOR`` when the server runs without keys)."""
        if not self.auth:
            return OPERATOR
        store = self.key_store()
        key_hash = presented_key_hash(authorization)
        now = time.monotonic()
        known = self._known.get(key_hash)
        if known is not None and now - known[1] < self.key_cache_seconds:
            return known[0]
        generation = self._generation
        if store.lookup_is_local:
            # One indexed read of a WAL-mode file (tens of microseconds): cheaper here than the
            # two thread hand-offs a worker costs.
            found = principal_of(store, key_hash)
        else:
            found = await self.on_key_worker(lambda: principal_of(store, key_hash))
        if generation == self._generation:  # else a revocation came meanwhile: don't keep it
            if len(self._known) >= KEY_CACHE_ENTRIES:
                self._known.clear()
            self._known[key_hash] = (found, now)
        return found

    def forget_keys(self) -> None:
        """Look every key up again on its next request (after a revocation)."""
        self._generation += 1
        self._known.clear()

    def key_store(self) -> KeyStore:
        if self.keys is None:
            raise NotSupportedError("this server runs without a key store (--no-auth)")
        return self.keys

    async def on_key_worker(self, call: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.key_workers.submit(call))


def create_app(*, driver_name: str | None = None, driver: AsyncMemoryDriver | None = None,
               key_store: KeyStore | None = None,
               auth: bool = True, max_body_bytes: int | None = None,
               mcp: bool = True, host: str = "127.0.0.1") -> ASGIApp:
    """The service as an ASGI app: the FastAPI routes, ``/mcp`` (unless ``mcp=False``), the body
    limit (default ``MEMORY_SERVICE_MAX_BODY_BYTES``) and the error shield.

    The driver is ``get_async_memory_driver(driver_name)``, or ``driver`` when given (tests,
    embedding applications). ``auth=False`` answers every caller as an admin (``serve
    --no-auth``, loopback only). The driver and ``key_store`` are closed with the app. ``host``
    is where it will listen (the MCP transport's DNS-rebinding protection is on for loopback).
    """
    from config.settings import get_settings

    if auth and key_store is None:
        raise ValueError("auth needs a key store")
    limit = max_body_bytes or get_settings().service_max_body_bytes
    mcp_server = None
    if mcp:
        from app.service.mcp_server import build_http_mcp

        mcp_server = build_http_mcp(max_body_bytes=limit, host=host)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(driver=driver or get_async_memory_driver(driver_name),
                             keys=key_store, auth=auth)
        app.state.service = state
        async with AsyncExitStack() as stack:
            stack.push_async_callback(_close, state)
            state.model_loaded = await _warm_up(state.driver)
            if mcp_server is not None:
                mcp_server.attach(state)
                await stack.enter_async_context(mcp_server.running())
            log.info("serving the %s driver", state.driver.name)
            yield

    app = FastAPI(
        title="Agent memory layer",
        version="0.1.0",
        description="Memories of users and shared knowledge for AI agents. Send "
                    "`Authorization: Bearer <key>`; a user key acts only for its user.",
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
    )
    app.router.route_class = _Route
    _install_error_table(app)
    _add_routes(app)
    if mcp_server is not None:
        app.router.routes.extend(mcp_server.routes())
    return Shield(BodyLimit(app, limit))


async def _warm_up(driver: AsyncMemoryDriver) -> bool:
    """Load the embedding model now rather than on the first request (drivers that embed here)."""
    if driver.name == "automem":
        return False

    def load() -> bool:
        from app.core.memory.embeddings import get_default_embedder

        try:
            embedder = get_default_embedder()
            embedder.embed_query("warm up")
        except Exception as exc:  # noqa: BLE001 - reported by /health; calls that embed fail alone
            log.error("the embedding model did not load (%s); /health reports it",
                      type(exc).__name__)
            return False
        return bool(getattr(embedder, "is_loaded", True))

    return await asyncio.get_running_loop().run_in_executor(None, load)


async def _close(state: ServiceState) -> None:
    await state.driver.aclose()
    state.key_workers.shutdown(wait=True)
    if state.keys is not None:
        state.keys.close()
    log.info("stopped: the %s driver and the key store are closed", state.driver.name)


# -- errors -------------------------------------------------------------------------------------


class _Route(APIRoute):
    """Every route answers with what its verb returned, serialised as is: records come back as
    the library returns them (a field the verb did not set, such as ``score`` outside search
    results, is left out rather than shown as null).

    The value is written to JSON by ``pydantic_core.to_json`` (datetimes as ISO 8601, as the
    models would) and sent as a ready ``Response`` with the route's status code, so FastAPI does
    not validate it against ``response_model`` again: that re-validation cost ~65 us of the
    event loop per search of 10 records (measured, ``bench.service``) and checked nothing the
    library does not guarantee (its records are the TypedDicts the response models mirror; the
    schemathesis test checks every answer against ``/openapi.json``). ``response_model`` still
    documents each answer.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        status = kwargs.get("status_code") or 200

        @functools.wraps(endpoint)
        async def answer(*args: Any, **values: Any) -> Response:
            value = await endpoint(*args, **values)
            if isinstance(value, Response):
                return value
            return Response(to_json(value), status_code=status, media_type="application/json")

        super().__init__(path, answer, **kwargs)


def _install_error_table(app: FastAPI) -> None:
    def answer(status: int, kind: str, message: str) -> JSONResponse:
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        elif status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status,
                            headers=headers)

    async def mapped(request: Request, exc: Exception) -> JSONResponse:
        for kind in type(exc).__mro__:
            if kind in ERRORS:
                status, name = ERRORS[kind]
                if status >= 500:
                    log.warning("%s on %s %s", type(exc).__name__, request.method,
                                request.url.path)
                return answer(status, name, str(exc))
        raise exc  # not in the table: the shield answers 500

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return answer(422, "invalid_input", _validation_message(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI's answer to a body it could not read (not UTF-8, not JSON): bad input.
            return answer(422, "invalid_input", "the body could not be read as JSON")
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return answer(exc.status_code, kind, str(exc.detail))

    for error in ERRORS:
        app.add_exception_handler(error, mapped)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _validation_message(exc: RequestValidationError) -> str:
    """Name the argument and the rule, never echo the value (it may be a secret or content)."""
    parts = []
    for error in exc.errors()[:5]:
        if error.get("type") == "json_invalid":
            return "the body is not valid JSON"
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is malformed"


# -- who is calling -----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key from `python -m app keys create`.")


async def _principal(request: Request,
                     _: Annotated[Any, Depends(_bearer)] = None) -> Principal:
    state: ServiceState = request.app.state.service
    return await state.principal(request.headers.get("authorization"))


async def _driver(request: Request) -> AsyncMemoryDriver:
    return request.app.state.service.driver


Caller = Annotated[Principal, Depends(_principal)]
Driver = Annotated[AsyncMemoryDriver, Depends(_driver)]
UserQuery = Annotated[str | None, Query(description=s.USER_ID_DOC)]


def _found(value: Any) -> Any:
    if value is None or value is False:
        raise NotFound("not found")
    return value


# -- routes -------------------------------------------------------------------------------------


def _add_routes(app: FastAPI) -> None:  # noqa: C901 - one flat list of thin routes reads best
    memories = "memories"

    @app.post("/v1/memories", status_code=201, response_model=s.MemoryOut, tags=[memories],
              summary="Store a memory")
    async def store(body: s.StoreBody, caller: Caller, driver: Driver) -> Any:
        args = body.model_dump(exclude={"user_id"})
        return await driver.store(caller.acting_user(body.user_id), **args)

    @app.post("/v1/memories/batch", status_code=201, response_model=s.MemoryList,
              tags=[memories], summary="Store many memories (all or none)")
    async def store_many(body: s.BatchBody, caller: Caller, driver: Driver) -> Any:
        items = [cast(MemoryInput, {**item.model_dump(exclude={"user_id"}),
                                    "user_id": caller.acting_user(item.user_id)})
                 for item in body.items]
        return {"items": await driver.store_many(items)}

    @app.post("/v1/memories/search", response_model=s.SearchResults, tags=[memories],
              summary="Recall a user's memories, best first")
    async def search(body: s.SearchBody, caller: Caller, driver: Driver) -> Any:
        args = body.model_dump(exclude={"user_id", "conversation_id", "query", "top_k",
                                        "use_vector", "exclude_tags"})
        results = await driver.recall(
            caller.acting_user(body.user_id), body.conversation_id, body.query, body.top_k,
            body.use_vector, body.exclude_tags, **args)
        return {"results": results}

    @app.get("/v1/memories", response_model=s.MemoryPageOut, tags=[memories],
             summary="List a user's memories, newest first (keyset pages)")
    async def list_memories(
        caller: Caller, driver: Driver, user_id: UserQuery = None,
        agent_id: str | None = None, conversation_id: str | None = None,
        namespace: str | None = None,
        tag: Annotated[list[str] | None, Query(description="Must carry (repeatable).")] = None,
        include_deleted: bool = False, limit: int = 100, cursor: str | None = None,
    ) -> Any:
        return await driver.list_memories(
            caller.acting_user(user_id), agent_id=agent_id, conversation_id=conversation_id,
            namespace=namespace, tags=tag, include_deleted=include_deleted, limit=limit,
            cursor=cursor)

    @app.get("/v1/memories/{memory_id}", response_model=s.MemoryOut, tags=[memories],
             summary="Get one memory")
    async def get(memory_id: str, caller: Caller, driver: Driver, user_id: UserQuery = None,
                  include_deleted: bool = False) -> Any:
        return _found(await driver.get(memory_id, caller.scope(user_id),
                                       include_deleted=include_deleted))

    @app.patch("/v1/memories/{memory_id}", response_model=s.MemoryOut, tags=[memories],
               summary="Change a memory in place")
    async def update(memory_id: str, body: s.UpdateBody, caller: Caller, driver: Driver,
                     user_id: UserQuery = None) -> Any:
        changes = body.model_dump(exclude_unset=True)
        return _found(await driver.update(memory_id, caller.scope(user_id), **changes))

    @app.delete("/v1/memories/{memory_id}", response_model=s.Done, tags=[memories],
                summary="Soft-delete a memory (restore undoes it)")
    async def delete(memory_id: str, caller: Caller, driver: Driver,
                     user_id: UserQuery = None) -> Any:
        _found(await driver.delete(memory_id, caller.scope(user_id)))
        return {"id": memory_id, "done": True}

    @app.post("/v1/memories/{memory_id}/restore", response_model=s.Done, tags=[memories],
              summary="Undo a soft delete")
    async def restore(memory_id: str, caller: Caller, driver: Driver,
                      user_id: UserQuery = None) -> Any:
        _found(await driver.restore(memory_id, caller.scope(user_id)))
        return {"id": memory_id, "done": True}

    knowledge = "knowledge"

    @app.post("/v1/knowledge", status_code=201, response_model=s.KnowledgeDocumentOut,
              tags=[knowledge], summary="Store a knowledge document (admin keys)")
    async def store_knowledge(body: s.KnowledgeBody, caller: Caller, driver: Driver) -> Any:
        caller.require_admin("writing knowledge")
        return await driver.store_global_knowledge(
            body.content, body.category, body.title, body.doc_id, body.metadata)

    @app.post("/v1/knowledge/search", response_model=s.KnowledgeResults, tags=[knowledge],
              summary="Search the shared knowledge (every key)")
    async def search_knowledge(body: s.KnowledgeSearchBody, caller: Caller,
                               driver: Driver) -> Any:
        return {"results": await driver.recall_global_knowledge(body.query, body.top_k,
                                                                body.category)}

    @app.delete("/v1/knowledge/{doc_id}", response_model=s.Done, tags=[knowledge],
                summary="Delete a knowledge document (admin keys)")
    async def delete_knowledge(doc_id: str, caller: Caller, driver: Driver) -> Any:
        caller.require_admin("deleting knowledge")
        _found(await driver.delete_knowledge(doc_id))
        return {"id": doc_id, "done": True}

    users = "users"

    @app.post("/v1/users", status_code=201, response_model=s.UserOut, tags=[users],
              summary="Create a user record")
    async def create_user(body: s.UserBody, caller: Caller, driver: Driver) -> Any:
        user_id = body.user_id if caller.is_admin else caller.acting_user(body.user_id)
        return await driver.create_user(user_id, display_name=body.display_name,
                                        profile=body.profile)

    @app.get("/v1/users/{user_id}", response_model=s.UserOut, tags=[users],
             summary="A user's record with stats")
    async def get_user(user_id: str, caller: Caller, driver: Driver) -> Any:
        return _found(await driver.get_user(caller.acting_user(user_id)))

    @app.get("/v1/users/{user_id}/profile", response_model=s.ProfileOut, tags=[users],
             summary="A user's profile")
    async def get_profile(user_id: str, caller: Caller, driver: Driver) -> Any:
        user_id = caller.acting_user(user_id)
        return {"user_id": user_id, "profile": await driver.get_profile(user_id)}

    @app.put("/v1/users/{user_id}/profile", response_model=s.ProfileOut, tags=[users],
             summary="Replace (or merge into) a user's profile")
    async def set_profile(user_id: str, body: s.ProfileBody, caller: Caller,
                          driver: Driver) -> Any:
        user_id = caller.acting_user(user_id)
        profile = await driver.set_profile(user_id, body.profile, merge=body.merge)
        return {"user_id": user_id, "profile": profile}

    @app.delete("/v1/users/{user_id}", response_model=s.Erased, tags=[users],
                summary="Erase a user and every memory of theirs, for good")
    async def forget_user(user_id: str, caller: Caller, driver: Driver) -> Any:
        user_id = caller.acting_user(user_id)  # a user key may erase itself, only an admin others
        return {"user_id": user_id, "erased_memories": await driver.forget_user(user_id)}

    operations = "operations"

    @app.get("/v1/stats", response_model=dict[str, Any], tags=[operations],
             summary="Counts (admin keys)")
    async def stats(caller: Caller, driver: Driver, user_id: str | None = None) -> Any:
        caller.require_admin("stats")
        return await driver.stats(user_id)

    @app.get("/health", response_model=dict[str, Any], tags=[operations],
             summary="Health of the backend and the model (no key needed; never fails)")
    async def health(request: Request) -> Any:
        state: ServiceState = request.app.state.service
        try:
            report: dict[str, Any] = dict(await state.driver.health_check())
        except MemoryDriverError as exc:  # the contract says it never raises; be sure anyway
            report = {"driver": state.driver.name, "status": "down",
                      "checks": {"error": type(exc).__name__}, "latency_ms": 0.0}
        return {"status": report["status"], "driver": report,
                "model_loaded": state.model_loaded, "auth": state.auth}

    keys = "keys"

    @app.get("/v1/keys", response_model=s.KeyList, tags=[keys], summary="Every key (admin)")
    async def list_keys(request: Request, caller: Caller) -> Any:
        caller.require_admin("managing keys")
        state: ServiceState = request.app.state.service
        store = state.key_store()
        found = await state.on_key_worker(store.list_keys)
        return {"keys": [key_summary(record) for record in found]}

    @app.post("/v1/keys", status_code=201, response_model=s.NewKeyOut, tags=[keys],
              summary="Create a key (admin); the key is in this answer only")
    async def new_key(request: Request, body: s.KeyBody, caller: Caller) -> Any:
        caller.require_admin("managing keys")
        if body.admin == (body.user_id is not None):
            raise InvalidInputError("give either user_id (a user key) or admin: true")
        state: ServiceState = request.app.state.service
        store = state.key_store()
        record, key = await state.on_key_worker(lambda: create_key(store, user_id=body.user_id,
                                                                   name=body.name))
        return {**key_summary(record), "key": key}

    @app.delete("/v1/keys/{key_id}", response_model=s.Done, tags=[keys],
                summary="Revoke a key at once (admin)")
    async def revoke_key(request: Request, key_id: str, caller: Caller) -> Any:
        caller.require_admin("managing keys")
        state: ServiceState = request.app.state.service
        store = state.key_store()
        revoked = await state.on_key_worker(lambda: store.revoke(key_id))
        state.forget_keys()
        _found(revoked)
        return {"id": key_id, "done": True}



__all__ = ["ERRORS", "NotFound", "ServiceState", "create_app"]
