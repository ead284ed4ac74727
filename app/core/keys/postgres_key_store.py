"""``KeyStore`` over the PostgreSQL database of the memory layer (table ``api_keys``)."""

from __future__ import annotations

import threading
from typing import Any

from app.core.keys import ApiKey, KeyStore
from app.core.memory.errors import (
    BackendUnavailableError,
    MissingDependencyError,
    SchemaNotMigratedError,
)
from config.settings import redact_url

_COLUMNS = "id, name, user_id, is_admin, prefix, created_at, revoked_at"


class PostgresKeyStore(KeyStore):
    """A small pool of ``size`` connections of its own (opened on first use), so that key lookups
    never wait behind the memory driver's queries. Fixed-size: a long-running service holds the
    same connections from start to stop."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, size: int = 2) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError as exc:
            raise MissingDependencyError(
                "keys in PostgreSQL need psycopg: pip install -e '.[pgvector]'") from exc
        self._psycopg = psycopg
        self._pool_timeout: type[Exception] = PoolTimeout
        self.url = url
        self._pool = ConnectionPool(
            url, min_size=size, max_size=size, open=False, timeout=connect_timeout,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout))},
        )
        self._opened = False
        self._lock = threading.Lock()

    def add(self, *, key_id: str, key_hash: str, prefix: str, user_id: str | None,
            name: str | None) -> ApiKey:
        rows = self._run(f"INSERT INTO api_keys (id, name, user_id, is_admin, key_hash, prefix) "
                         f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                         (key_id, name, user_id, user_id is None, key_hash, prefix))
        return ApiKey(*rows[0])

    def find_active(self, key_hash: str) -> ApiKey | None:
        rows = self._run(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = %s "
                         "AND revoked_at IS NULL", (key_hash,))
        return ApiKey(*rows[0]) if rows else None

    def list_keys(self) -> list[ApiKey]:
        return [ApiKey(*row) for row in
                self._run(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id")]

    def revoke(self, key_id: str) -> bool:
        return bool(self._run("UPDATE api_keys SET revoked_at = now() WHERE id = %s "
                              "AND revoked_at IS NULL RETURNING id", (key_id,)))

    def count_active(self) -> int:
        return int(self._run("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")[0][0])

    def close(self) -> None:
        with self._lock:
            if self._opened:
                self._pool.close()
                self._opened = False

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        psycopg = self._psycopg
        with self._lock:
            if not self._opened:
                self._pool.open(wait=False)
                self._opened = True
        try:
            with self._pool.connection() as connection:
                cursor = connection.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaNotMigratedError(
                "the PostgreSQL database has no api_keys table: run "
                "`python migrate.py --database pgvector`") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError, self._pool_timeout) as exc:
            raise BackendUnavailableError(
                f"the key store at {redact_url(self.url)} is unreachable") from exc
