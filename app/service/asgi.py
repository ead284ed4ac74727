"""Two plain ASGI wrappers around the service: a request-body limit and a last-resort shield.

Plain ASGI (not ``BaseHTTPMiddleware``) so that streaming answers, such as the MCP transport's
event streams, pass through untouched and nothing is buffered.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("app.service")


def error_body(kind: str, message: str) -> bytes:
    """The one error shape, as bytes: ``{"error": {"type": ..., "message": ...}}``."""
    return json.dumps({"error": {"type": kind, "message": message}},
                      separators=(",", ":")).encode("utf-8")


async def send_error(send: Send, status: int, kind: str, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(kind, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Answer 413 to a request whose body is over ``max_bytes``: at once when its
    ``Content-Length`` says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is over the limit of {self.max_bytes} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await send_error(send, 413, "payload_too_large", message,
                                     [(b"connection", b"close")])
                    return
        seen = 0
        over = started = False

        async def limited_receive() -> Message:
            nonlocal seen, over
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise _TooLarge
            return received

        async def watched_send(sent: Message) -> None:
            nonlocal started
            if over:
                # The app answered the interrupted read its own way (FastAPI: 400 "error parsing
                # the body"); the caller gets the 413 instead, once.
                if sent["type"] == "http.response.start" and not started:
                    started = True
                    await send_error(send, 413, "payload_too_large", message,
                                     [(b"connection", b"close")])
                return
            if sent["type"] == "http.response.start":
                started = True
            await send(sent)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _TooLarge:
            if not started:
                started = True
                await send_error(send, 413, "payload_too_large", message,
                                 [(b"connection", b"close")])


class Shield:
    """Turn an exception no handler mapped into a 500 in the one error shape.

    The log line names the exception's type and the route only: an unexpected error's message
    may quote a key or memory content, so neither it nor a traceback is logged or answered.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(sent: Message) -> None:
            nonlocal started
            if sent["type"] == "http.response.start":
                started = True
            await send(sent)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:  # noqa: BLE001 - the last resort: nothing may leak a trace
            log.error("unexpected %s on %s %s", type(exc).__name__, scope.get("method"),
                      scope.get("path", "?"))
            if not started:
                await send_error(send, 500, "internal_error",
                                 "the server failed unexpectedly; the error was logged")
