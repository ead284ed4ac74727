"""The service's commands behind ``python -m app serve | mcp | keys ...`` (wired in ``app/cli.py``).

``serve`` refuses to start when no API key exists (unless ``--no-auth``), and refuses
``--no-auth`` on a host that is not a loopback address, before anything heavy is loaded. It
stops cleanly on SIGTERM or Ctrl-C: uvicorn stops accepting, lets in-flight requests finish (for
at most ``MEMORY_SERVICE_GRACEFUL_TIMEOUT`` seconds), then the lifespan closes the driver and the
key store, and the process ends by the signal it was sent (exit status -15 for SIGTERM).

``keys create`` prints the new key once, on standard output (with ``--json`` inside the JSON);
nothing else ever prints or logs a key: ``keys list`` shows ids, names and the first 8
characters.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from typing import Any

from app.core.keys import open_key_store
from app.core.memory.errors import InvalidInputError, MemoryDriverError
from app.service.keys import create_key, key_summary

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def add_commands(commands: Any) -> None:
    """Add ``serve``, ``mcp`` and ``keys`` to the CLI's sub-parsers."""
    serve = commands.add_parser("serve", help="run the HTTP API (and MCP at /mcp)")
    serve.add_argument("--host", help="address to bind (default: MEMORY_SERVICE_HOST, "
                                      "127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: MEMORY_SERVICE_PORT, 8080)")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve without API keys (every caller is an admin); loopback only")
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"))

    mcp = commands.add_parser("mcp", help="run the MCP server on stdio for one user")
    mcp.add_argument("--user", dest="user_id", required=True, help="whose memories it serves")

    keys = commands.add_parser("keys", help="API keys of the service").add_subparsers(
        dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key and print it (once)")
    owner = create.add_mutually_exclusive_group(required=True)
    owner.add_argument("--user", dest="user_id", help="the user the key acts for")
    owner.add_argument("--admin", action="store_true", help="an admin key (any user, knowledge, "
                                                            "stats, keys)")
    create.add_argument("--name", help="a label, e.g. the agent that uses it")
    keys.add_parser("list", help="every key (never the keys themselves)")
    revoke = keys.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id")


def run(args: argparse.Namespace) -> int:
    """Run a service command; the CLI maps the library's errors to exit codes around it."""
    if args.command == "serve":
        return _serve(args)
    if args.command == "mcp":
        return _mcp(args)
    return _keys(args)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    from config.settings import get_settings

    settings = get_settings()
    host = args.host or settings.service_host
    port = settings.service_port if args.port is None else args.port
    if args.no_auth and not is_loopback(host):
        print(f"error: --no-auth would open every memory to anyone who reaches {host}; it is "
              "allowed on a loopback host only (127.0.0.1, ::1, localhost)", file=sys.stderr)
        return EXIT_BAD_INPUT
    store = open_key_store(args.driver)
    try:
        if not args.no_auth and store.count_active() == 0:
            print("error: no API key exists, so nobody could use the server. Create one:\n"
                  "  python -m app keys create --admin        (or --user USER_ID)\n"
                  "or, on 127.0.0.1 only, start with --no-auth", file=sys.stderr)
            store.close()
            return EXIT_FAILED
    except MemoryDriverError:
        if not args.no_auth:
            store.close()
            raise
    import uvicorn

    from app.service.http_api import create_app

    _log_to_stderr(args.log_level)
    app = create_app(driver_name=args.driver, key_store=store, auth=not args.no_auth,
                     host=host)
    # Access lines are logged at INFO: below that level uvicorn would still format each one
    # (~30 us a request) only for the logger to drop it, so it is told not to.
    config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level,
                            access_log=args.log_level in ("info", "debug"),
                            timeout_graceful_shutdown=round(settings.service_graceful_timeout),
                            server_header=False, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM and SIGINT: it stops accepting, lets in-flight requests finish,
    # runs the lifespan's shutdown (driver and key store closed), then raises the signal again,
    # so a supervisor sees the process end by the signal it sent.
    server.run()
    return EXIT_OK if server.started else EXIT_FAILED


def _log_to_stderr(level: str) -> None:
    """The service's own log lines (never a key or memory content), formatted like uvicorn's."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
    logger = logging.getLogger("app.service")
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def _mcp(args: argparse.Namespace) -> int:
    from app.core.memory.aio import get_async_memory_driver
    from app.core.memory.validation import check_id
    from app.service.mcp_server import serve_stdio

    user_id = check_id(args.user_id, "--user")

    async def main() -> None:
        async with get_async_memory_driver(args.driver) as driver:
            await serve_stdio(driver, user_id)

    asyncio.run(main())
    return EXIT_OK


def _keys(args: argparse.Namespace) -> int:
    store = open_key_store(args.driver)
    try:
        if args.keys_command == "create":
            record, key = create_key(store, user_id=None if args.admin else args.user_id,
                                     name=args.name)
            if args.json:
                print(json.dumps({**_shown(key_summary(record)), "key": key}, indent=2))
            else:
                whom = "admin key" if record.is_admin else f"key for user {record.user_id}"
                print(f"created {whom} {record.id}. The key is shown this once; store it now:",
                      file=sys.stderr)
                print(key)
            return EXIT_OK
        if args.keys_command == "list":
            rows = [_shown(key_summary(record)) for record in store.list_keys()]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print("\n".join(_key_line(row) for row in rows) or "no keys")
            return EXIT_OK
        if not store.revoke(args.key_id):
            print(f"no active key {args.key_id}", file=sys.stderr)
            return EXIT_FAILED
        print(f"revoked {args.key_id}")
        return EXIT_OK
    finally:
        store.close()


def _shown(summary: dict[str, Any]) -> dict[str, Any]:
    return {name: value.isoformat() if hasattr(value, "isoformat") else value
            for name, value in summary.items()}


def _key_line(row: dict[str, Any]) -> str:
    whom = "admin" if row["admin"] else f"user {row['user_id']}"
    state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
    name = f"  {row['name']}" if row["name"] else ""
    return f"{row['id']}  {row['prefix']}...  {whom}  {state}  created {row['created_at']}{name}"


__all__ = ["InvalidInputError", "add_commands", "is_loopback", "run"]
