"""Laravel-style schema runner: ``python migrate.py [command] [--database NAME] [options]``.

Commands: ``migrate`` (default; run pending migrations as one batch), ``fresh`` (drop every table,
migrate), ``rollback [--step N]`` (undo the last batch, or the last N migrations), ``reset`` (undo
every migration), ``refresh`` (reset, then migrate), ``status`` (ran and pending, and whether
the tables of the ran ones exist: exit status 1 if not). ``fresh``, ``rollback`` and ``reset``
are all-or-nothing.
``--database`` defaults to ``MEMORY_DRIVER``: ``sqlite`` migrates ``MEMORY_SQLITE_PATH`` (or
``--path``), ``pgvector`` migrates ``DATABASE_URL`` (created if it does not exist yet), ``automem``
has nothing to migrate. In ``APP_ENV=production`` the destructive commands
(fresh, rollback, reset, refresh) refuse to run without ``--force``; in any environment,
``rollback`` of a store that holds memories, users or knowledge asks first (and, with no terminal
to ask on, refuses) unless ``--force``. ``--pretend`` prints the SQL and changes nothing.
Exit status: 0 on success, 1 on failure or refusal, 2 on a usage error (a bad environment value,
a path that cannot be used, a damaged file). Every failure is one line on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence

from app.core.database.migrator import (
    MigrationDatabase,
    MigrationError,
    Migrator,
    SqliteMigrationDatabase,
    migrations_dir,
)
from app.core.memory.errors import BackendUnavailableError, MemoryDriverError
from config.settings import SettingsError, get_settings, redact_secrets, redact_url

COMMANDS = ("migrate", "fresh", "rollback", "reset", "refresh", "status")
DESTRUCTIVE = {"fresh", "rollback", "reset", "refresh"}
DATABASES = ("sqlite", "pgvector", "automem")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migrate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="migrate", choices=COMMANDS)
    parser.add_argument("--database", choices=DATABASES,
                        help="which database to migrate (default: MEMORY_DRIVER)")
    parser.add_argument("--path", help="sqlite: the file (default: MEMORY_SQLITE_PATH)")
    parser.add_argument("--step", type=int, help="rollback: how many migrations to undo")
    parser.add_argument("--force", action="store_true",
                        help="allow destructive commands when APP_ENV=production")
    parser.add_argument("--pretend", action="store_true", help="print the SQL, change nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``_main`` with every failure as one line on stderr: no traceback reaches the user."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (SettingsError, OSError, sqlite3.DatabaseError) as exc:
        print(f"error: {_described(exc, args)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not type(exc).__module__.startswith("psycopg"):
            raise
        # e.g. a role without CREATE on schema public: PostgreSQL's own words say it best.
        message = redact_secrets(" ".join(str(exc).split()), get_settings().database_url)
        print(f"error: PostgreSQL refused: {message}", file=sys.stderr)
        return 1


def _described(exc: Exception, args: argparse.Namespace) -> str:
    if isinstance(exc, sqlite3.DatabaseError):
        path = args.path or get_settings().sqlite_path
        return (f"the SQLite file {path} cannot be used: {exc} (a damaged file: restore it "
                "from a backup; a read-only place: choose another --path)")
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot use{where}: {exc.strerror or exc} (check --path and its folder)"
    return str(exc)


def _main(args: argparse.Namespace) -> int:
    settings = get_settings()
    database = args.database or settings.memory_driver
    if database == "automem":
        print("The AutoMem service owns its storage: there is nothing to migrate here.")
        return 0
    if database not in DATABASES:
        print(f"error: no migrations for database {database!r} "
              f"(choose --database from {', '.join(DATABASES)})", file=sys.stderr)
        return 2
    if args.step is not None and (args.command != "rollback" or args.step < 1):
        print("error: --step takes a whole number of 1 or more, with rollback", file=sys.stderr)
        return 2
    if args.command in DESTRUCTIVE and settings.is_production and not args.force:
        print(f"error: APP_ENV=production: `{args.command}` destroys data; "
              "add --force to run it anyway", file=sys.stderr)
        return 1

    try:
        db = _open(database, args)
    except MemoryDriverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    migrator = Migrator(db, migrations_dir(database))
    try:
        if args.command == "rollback" and not (args.force or args.pretend) and _holds_data(db) \
                and not _confirmed("The tables hold data, and rolling back drops them. "
                                   "Roll back anyway? [y/N] "):
            print("error: not confirmed; nothing was rolled back (pass --force to skip the "
                  "question)", file=sys.stderr)
            return 1
        return _run(migrator, args)
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()


def _holds_data(db: MigrationDatabase) -> bool:
    """Whether any table a user's data lives in has a row (tables not there yet hold none)."""
    for table in ("memories", "users", "knowledge_documents"):
        try:
            if db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                return True
        except Exception:  # noqa: BLE001 - sqlite3's or psycopg's "no such table"
            continue
    return False


def _confirmed(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:  # no terminal and nothing piped in: not a yes
        return False


def _open(database: str, args: argparse.Namespace) -> MigrationDatabase:
    settings = get_settings()
    if database == "sqlite":
        return SqliteMigrationDatabase(args.path or settings.sqlite_path,
                                       busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    from app.core.database.postgres_migration import PostgresMigrationDatabase

    try:
        return PostgresMigrationDatabase(settings.database_url,
                                         create_missing=args.command != "status")
    except Exception as exc:  # psycopg's errors: the module is imported lazily
        raise BackendUnavailableError(
            f"cannot connect to DATABASE_URL ({redact_url(settings.database_url)}): "
            f"{redact_secrets(str(exc), settings.database_url)}"
        ) from exc


def _run(migrator: Migrator, args: argparse.Namespace) -> int:
    if args.command == "status":
        rows = migrator.status()
        if not rows:
            print("No migrations found.")
        width = max((len(row.name) for row in rows), default=0)
        for row in rows:
            state = f"Ran (batch {row.batch})" if row.ran else "Pending"
            if row.missing:
                state += f", but its tables are missing: {', '.join(row.missing)}"
            print(f"{row.name.ljust(width)}  {state}")
        damage = migrator.damage()
        if damage is not None:
            print(f"error: {damage}", file=sys.stderr)
            return 1
        return 0
    if args.command == "rollback":
        migrator.rollback(step=args.step, pretend=args.pretend)
    else:
        getattr(migrator, args.command)(pretend=args.pretend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
