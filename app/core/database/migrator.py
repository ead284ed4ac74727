"""A Laravel-style migrator: migration files, a ``migrations`` table of (migration, batch), batches.

A migration is a Python file in ``database/migrations/<database>/`` named
``YYYY_MM_DD_NNNNNN_what_it_does.py`` with ``up(db)`` and ``down(db)``; every statement goes
through ``db.execute(sql, params)``, which is what lets ``--pretend`` print the SQL instead of
running it. Files run in name order. Each migration runs in its own transaction together with the
row that logs it, so a file is logged only if it succeeded and a failed one leaves nothing behind.
One ``migrate`` run is one batch; ``rollback`` undoes the last batch (or the last ``step``
migrations); ``fresh`` drops every table instead of calling ``down()``. A lock held for the whole
run keeps two runs from interleaving: the second waits, then finds nothing left to do.

``fresh``, ``rollback`` and ``reset`` are all-or-nothing: both databases have transactional DDL,
so the whole command is one transaction (each migration a savepoint in it), and an interruption
(lock contention, a failing ``down()``, a kill) leaves the schema as it was. ``status`` and
``migrate`` compare the log with the tables that exist: a migration logged as run whose tables
are missing, or tables with no migration logged, is reported as damage (with the way out,
``fresh``), never as "Nothing to migrate".

Backends plug in through ``MigrationDatabase``: ``SqliteMigrationDatabase`` here,
``PostgresMigrationDatabase`` in ``postgres_migration.py``.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from app.core.database.sqlite_connection import MEMORY_DATABASE, open_sqlite

PROJECT_ROOT = Path(__file__).resolve().parents[3]
MIGRATIONS_ROOT = PROJECT_ROOT / "database" / "migrations"
MIGRATION_NAME = re.compile(r"\d{4}_\d{2}_\d{2}_\d{6}_[a-z0-9_]+")


#: INFO for each migration run or rolled back (name and time, never SQL parameters).
logger = logging.getLogger(__name__)

class MigrationError(RuntimeError):
    """A migration file is malformed or failed; the message names it."""


class MigrationDatabase(Protocol):
    """What the migrator needs of a database connection."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (DDL or DML)."""

    def ran_migrations(self) -> list[tuple[str, int]]:
        """(migration, batch) of every logged migration, oldest first."""

    def log_migration(self, name: str, batch: int) -> None:
        """Record that ``name`` ran in ``batch`` (inside the migration's transaction)."""

    def unlog_migration(self, name: str) -> None:
        """Forget that ``name`` ran (inside its rollback's transaction)."""

    def transaction(self) -> Any:
        """A context manager around one transaction."""

    def lock(self) -> Any:
        """A context manager holding the migration lock for a whole run."""

    def ensure_migrations_table(self) -> None:
        """Create the ``migrations`` table if it is missing."""

    def has_migrations_table(self) -> bool:
        """Whether the ``migrations`` table exists."""

    def drop_all_tables(self, execute: Callable[[str], Any]) -> None:
        """Drop every table (through ``execute``, so that it can be pretended)."""

    def table_names(self) -> set[str]:
        """The tables that exist (shadow tables of virtual tables excluded)."""

    def close(self) -> None:
        """Close the connection."""


@dataclass(frozen=True)
class MigrationStatus:
    """One migration file and whether (and in which batch) it ran; ``missing``: tables a ran
    migration created that do not exist (the schema is damaged)."""

    name: str
    ran: bool
    batch: int | None
    missing: tuple[str, ...] = ()


_CREATED_TABLE = re.compile(
    r"CREATE\s+(?:VIRTUAL\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?(\w+)\"?", re.IGNORECASE)
_DROPPED_TABLE = re.compile(r"DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?\"?(\w+)\"?", re.IGNORECASE)


class Migrator:
    """Runs the migration files of one database; ``out`` receives one line per event."""

    def __init__(self, db: MigrationDatabase, migrations_dir: Path,
                 out: Callable[[str], None] = print) -> None:
        self.db = db
        self.migrations_dir = migrations_dir
        self.out = out

    # -- reading ------------------------------------------------------------------------------

    def files(self) -> list[str]:
        """Every migration name in the folder, in the order they run."""
        names = sorted(path.stem for path in self.migrations_dir.glob("*.py")
                       if not path.name.startswith("_"))
        for name in names:
            if not MIGRATION_NAME.fullmatch(name):
                raise MigrationError(
                    f"migration file {name}.py must be named YYYY_MM_DD_NNNNNN_description.py"
                )
        return names

    def ran(self) -> dict[str, int]:
        """Migration name -> batch, for every logged migration."""
        if not self.db.has_migrations_table():
            return {}
        return dict(self.db.ran_migrations())

    def pending(self) -> list[str]:
        """Migration files that have not run, in the order they would."""
        done = self.ran()
        return [name for name in self.files() if name not in done]

    def status(self) -> list[MigrationStatus]:
        """Every migration file, and every logged migration whose file is gone, with the tables
        each ran migration should have left that do not exist."""
        done = self.ran()
        expected = self._expected_tables(done)
        existing = self.db.table_names()
        rows = [MigrationStatus(name, name in done, done.get(name),
                                tuple(sorted(expected.get(name, set()) - existing)))
                for name in self.files()]
        rows += [MigrationStatus(name, True, batch) for name, batch in done.items()
                 if name not in {row.name for row in rows}]
        return rows

    def damage(self) -> str | None:
        """What is wrong with the schema as it exists against the log, or ``None``."""
        missing = sorted({table for row in self.status() for table in row.missing})
        if missing:
            return (f"tables of migrations logged as run are missing ({', '.join(missing)}): "
                    "the schema is damaged; `migrate.py fresh` rebuilds it (data is lost)")
        if not self.ran():
            strays = sorted(self.db.table_names() - {"migrations"})
            if strays:
                return (f"tables exist that no logged migration created ({', '.join(strays)}): "
                        "`migrate.py fresh` rebuilds the schema (data is lost)")
        return None

    # -- writing ------------------------------------------------------------------------------

    def migrate(self, *, pretend: bool = False) -> list[str]:
        """Run every pending migration as one new batch; returns the names that ran."""
        with self.db.lock():
            if not pretend:
                self.db.ensure_migrations_table()
            pending = self.pending()
            if not pending:
                damage = self.damage()
                if damage is not None:
                    raise MigrationError(damage)
                self.out("Nothing to migrate.")
                return []
            batch = max(self.ran().values(), default=0) + 1
            for name in pending:
                self._run(name, "up", pretend=pretend, log_batch=batch)
            return pending

    def rollback(self, *, step: int | None = None, pretend: bool = False) -> list[str]:
        """Undo the last batch, or the last ``step`` migrations; returns the names undone."""
        with self.db.lock():
            done = self.ran()
            if step is not None:
                targets = list(reversed(list(done)))[:step]
            else:
                last = max(done.values(), default=None)
                targets = [name for name in reversed(list(done)) if done[name] == last]
            return self._roll_back(targets, pretend=pretend)

    def reset(self, *, pretend: bool = False) -> list[str]:
        """Undo every migration, newest first, all or nothing."""
        with self.db.lock():
            return self._roll_back(list(reversed(list(self.ran()))), pretend=pretend)

    def refresh(self, *, pretend: bool = False) -> list[str]:
        """``reset`` then ``migrate``."""
        self.reset(pretend=pretend)
        return self.migrate(pretend=pretend)

    def fresh(self, *, pretend: bool = False) -> list[str]:
        """Drop every table (data included, ``down()`` not called), then migrate every file as
        batch 1: one transaction, so an interrupted ``fresh`` leaves the old schema whole."""
        if pretend:
            with self.db.lock():
                self.db.drop_all_tables(lambda sql: self.out(f"  {sql}"))
            # Pretending on top of the undropped schema would print "nothing to migrate".
            for name in self.files():
                self._run(name, "up", pretend=True, log_batch=1)
            return self.files()
        names = self.files()
        with self.db.lock(), self.db.transaction():
            self.db.drop_all_tables(self.db.execute)
            self.out("Dropped all tables.")
            self.db.ensure_migrations_table()
            for name in names:
                self._run(name, "up", pretend=False, log_batch=1)
        return names

    # -- helpers ------------------------------------------------------------------------------

    def _roll_back(self, names: list[str], *, pretend: bool) -> list[str]:
        if not names:
            self.out("Nothing to roll back.")
            return []
        available = set(self.files())
        for name in names:
            if name not in available:
                raise MigrationError(f"cannot roll back {name}: its file is missing")
        if pretend:
            for name in names:
                self._run(name, "down", pretend=True, log_batch=None)
            return names
        try:
            with self.db.transaction():
                for name in names:
                    self._run(name, "down", pretend=False, log_batch=None)
        except MigrationError as exc:
            raise MigrationError(f"{exc}; nothing was rolled back") from exc
        return names

    def _expected_tables(self, done: dict[str, int]) -> dict[str, set[str]]:
        """For each ran migration, the tables its ``up()`` creates that no later ran migration
        drops (read from the SQL its ``up()`` would run, as ``--pretend`` prints it)."""
        expected: dict[str, set[str]] = {}
        available = set(self.files())
        for name in sorted(done):
            if name not in available:
                continue
            statements: list[str] = []
            self._load(name).up(_PretendDatabase(statements.append))
            sql = "\n".join(statements)
            for tables in expected.values():
                tables -= {match.lower() for match in _DROPPED_TABLE.findall(sql)}
            expected[name] = {match.lower() for match in _CREATED_TABLE.findall(sql)}
        return expected

    def _run(self, name: str, direction: str, *, pretend: bool, log_batch: int | None) -> None:
        module = self._load(name)
        verb = "Migrating" if direction == "up" else "Rolling back"
        if pretend:
            self.out(f"{name} ({direction}):")
            getattr(module, direction)(_PretendDatabase(self.out))
            return
        self.out(f"{verb}: {name}")
        started = time.perf_counter()
        try:
            with self.db.transaction():
                getattr(module, direction)(self.db)
                if direction == "up":
                    self.db.log_migration(name, log_batch or 1)
                else:
                    self.db.unlog_migration(name)
        except Exception as exc:
            raise MigrationError(f"{name} ({direction}) failed: {exc}") from exc
        elapsed = (time.perf_counter() - started) * 1000
        logger.info("%s migration %s (%.1f ms)",
                    "ran" if direction == "up" else "rolled back", name, elapsed)
        self.out(f"{'Migrated' if direction == 'up' else 'Rolled back'}:  {name} "
                 f"({elapsed:.1f}ms)")

    def _load(self, name: str) -> ModuleType:
        path = self.migrations_dir / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_migration_{name}", path)
        if spec is None or spec.loader is None:
            raise MigrationError(f"cannot load migration {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "up", None)) or not callable(getattr(module, "down", None)):
            raise MigrationError(f"migration {name} must define up(db) and down(db)")
        return module


class _PretendDatabase:
    """Stands in for the database under ``--pretend``: prints each statement, runs none."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        statement = " ".join(sql.split())
        self.out(f"  {statement}" + (f"  -- params: {list(params)}" if params else ""))


class SqliteMigrationDatabase:
    """``MigrationDatabase`` over one SQLite file; the lock is an ``flock`` on a sidecar file."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5_000) -> None:
        self.path = str(path)
        self.connection = open_sqlite(self.path, busy_timeout_ms=busy_timeout_ms)
        self._depth = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.connection.execute(sql, tuple(params))

    def ran_migrations(self) -> list[tuple[str, int]]:
        return self.connection.execute(
            "SELECT migration, batch FROM migrations ORDER BY id").fetchall()

    def log_migration(self, name: str, batch: int) -> None:
        self.connection.execute("INSERT INTO migrations (migration, batch) VALUES (?, ?)",
                                (name, batch))

    def unlog_migration(self, name: str) -> None:
        self.connection.execute("DELETE FROM migrations WHERE migration = ?", (name,))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction, or a savepoint inside the one already open (``fresh`` and ``rollback``
        run their migrations inside one). Foreign keys are off for the outermost one (the pragma
        cannot change inside a transaction) and checked before it commits, the way SQLite's
        documentation says to change a schema."""
        if self.connection.in_transaction:
            self._depth += 1
            savepoint = f"migration_{self._depth}"
            self.connection.execute(f"SAVEPOINT {savepoint}")
            try:
                yield
            except BaseException:
                self.connection.execute(f"ROLLBACK TO {savepoint}")
                self.connection.execute(f"RELEASE {savepoint}")
                raise
            finally:
                self._depth -= 1
            self.connection.execute(f"RELEASE {savepoint}")
            return
        self.connection.execute("PRAGMA foreign_keys = OFF")
        try:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield
                broken = self.connection.execute("PRAGMA foreign_key_check").fetchone()
                if broken is not None:
                    raise MigrationError(f"foreign key check failed in table {broken[0]}")
                self.connection.execute("COMMIT")
            except BaseException:
                if self.connection.in_transaction:
                    self.connection.execute("ROLLBACK")
                raise
        finally:
            self.connection.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def lock(self) -> Iterator[None]:
        if self.path == MEMORY_DATABASE:
            yield
            return
        lock_path = Path(self.path).expanduser().with_name(Path(self.path).name + ".migrate-lock")
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def has_migrations_table(self) -> bool:
        row = self.connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'"
        ).fetchone()
        return row is not None

    def ensure_migrations_table(self) -> None:
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS migrations ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " migration TEXT NOT NULL UNIQUE,"
            " batch INTEGER NOT NULL)"
        )

    def drop_all_tables(self, execute: Callable[[str], Any]) -> None:
        rows = self.connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        virtual = {name for name, sql in rows if (sql or "").upper().startswith("CREATE VIRTUAL")}
        # Dropping a virtual table drops its shadow tables (name_data, name_idx, ...) with it.
        shadows = {name for name, _ in rows
                   if any(name.startswith(f"{table}_") for table in virtual)}
        ordered = sorted(virtual) + sorted(name for name, _ in rows
                                           if name not in virtual and name not in shadows)
        # Foreign keys are off: run inside ``transaction()`` (fresh does), so that the implicit
        # DELETE of each DROP checks no references.
        for name in ordered:
            execute(f'DROP TABLE IF EXISTS "{name}"')

    def table_names(self) -> set[str]:
        rows = self.connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        virtual = {name for name, sql in rows if (sql or "").upper().startswith("CREATE VIRTUAL")}
        return {name.lower() for name, _ in rows
                if not any(name.startswith(f"{table}_") for table in virtual)}

    def close(self) -> None:
        self.connection.close()


def migrations_dir(database: str) -> Path:
    """The folder of ``database``'s migration files."""
    return MIGRATIONS_ROOT / database
