"""``MigrationDatabase`` over PostgreSQL (psycopg 3), for ``migrate.py --database pgvector``.

The lock is a session-level advisory lock, so two runs on any machines against one database
never interleave. ``fresh`` drops every table of the current schema (extensions stay installed).
A missing database is created on the first ``migrate``, as a first run would expect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from app.core.memory.errors import MissingDependencyError

#: Arbitrary but fixed: the key of the advisory lock every migrate run takes.
MIGRATION_LOCK_KEY = 7_303_515_041


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise MissingDependencyError(
            "the pgvector database needs psycopg: pip install -e '.[pgvector]'"
        ) from exc
    return psycopg


class PostgresMigrationDatabase:
    """One psycopg connection in autocommit mode; transactions are explicit."""

    def __init__(self, url: str, *, create_missing: bool = False,
                 connect_timeout: int = 10) -> None:
        psycopg = _psycopg()
        self.url = url
        try:
            self.connection = psycopg.connect(url, autocommit=True,
                                              connect_timeout=connect_timeout)
        except psycopg.OperationalError as exc:
            if not (create_missing and "does not exist" in str(exc)):
                raise
            create_database(url, connect_timeout=connect_timeout)
            self.connection = psycopg.connect(url, autocommit=True,
                                              connect_timeout=connect_timeout)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.connection.execute(sql, tuple(params) or None)

    def ran_migrations(self) -> list[tuple[str, int]]:
        return self.connection.execute(
            "SELECT migration, batch FROM migrations ORDER BY id").fetchall()

    def log_migration(self, name: str, batch: int) -> None:
        self.connection.execute("INSERT INTO migrations (migration, batch) VALUES (%s, %s)",
                                (name, batch))

    def unlog_migration(self, name: str) -> None:
        self.connection.execute("DELETE FROM migrations WHERE migration = %s", (name,))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction, or a savepoint inside the one already open (``fresh`` and
        ``rollback`` run their migrations inside one: PostgreSQL's DDL is transactional)."""
        with self.connection.transaction():
            yield

    @contextmanager
    def lock(self) -> Iterator[None]:
        self.connection.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            yield
        finally:
            self.connection.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))

    def has_migrations_table(self) -> bool:
        row = self.connection.execute("SELECT to_regclass('migrations') IS NOT NULL").fetchone()
        return bool(row and row[0])

    def ensure_migrations_table(self) -> None:
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS migrations ("
            " id SERIAL PRIMARY KEY,"
            " migration TEXT NOT NULL UNIQUE,"
            " batch INTEGER NOT NULL)"
        )

    def drop_all_tables(self, execute: Callable[[str], Any]) -> None:
        sql = _psycopg().sql
        tables = [name for (name,) in self.connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "ORDER BY tablename")]
        for name in tables:
            statement = sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name))
            execute(statement.as_string(self.connection))

    def table_names(self) -> set[str]:
        return {name.lower() for (name,) in self.connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}

    def close(self) -> None:
        self.connection.close()


def create_database(url: str, *, connect_timeout: int = 10) -> None:
    """Create the database ``url`` names, connecting to the server's ``postgres`` database."""
    psycopg = _psycopg()
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    name = params.get("dbname")
    if not name:
        raise ValueError("DATABASE_URL must name a database")
    admin = make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=connect_timeout) as connection:
        connection.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(
            psycopg.sql.Identifier(name)))
