"""``KeyStore`` over the SQLite file of the memory layer (table ``api_keys``)."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.database.sqlite_connection import open_sqlite
from app.core.keys import ApiKey, KeyStore
from app.core.memory.errors import BackendUnavailableError, SchemaNotMigratedError

_COLUMNS = "id, name, user_id, is_admin, prefix, created_at, revoked_at"


class SqliteKeyStore(KeyStore):
    """One connection, used under a lock (key lookups are a single indexed read)."""

    lookup_is_local = True

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5_000) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._connection: sqlite3.Connection | None = open_sqlite(
                path, busy_timeout_ms=busy_timeout_ms)
        except sqlite3.Error as exc:
            raise BackendUnavailableError(f"cannot open the key store {self.path}: {exc}") from exc

    def add(self, *, key_id: str, key_hash: str, prefix: str, user_id: str | None,
            name: str | None) -> ApiKey:
        now = time.time()
        self._run("INSERT INTO api_keys (id, name, user_id, is_admin, key_hash, prefix, "
                  "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (key_id, name, user_id, int(user_id is None), key_hash, prefix, now))
        return ApiKey(key_id, name, user_id, user_id is None, prefix, _when(now), None)

    def find_active(self, key_hash: str) -> ApiKey | None:
        rows = self._run(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ? "
                         "AND revoked_at IS NULL", (key_hash,))
        return _record(rows[0]) if rows else None

    def list_keys(self) -> list[ApiKey]:
        return [_record(row) for row in
                self._run(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id")]

    def revoke(self, key_id: str) -> bool:
        rows = self._run("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL "
                         "RETURNING id", (time.time(), key_id))
        return bool(rows)

    def count_active(self) -> int:
        return int(self._run("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")[0][0])

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._connection is None:
                raise BackendUnavailableError("the key store is closed")
            try:
                return self._connection.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    raise SchemaNotMigratedError(
                        f"the key store {self.path} has no api_keys table: run "
                        "`python migrate.py --database sqlite`") from exc
                raise BackendUnavailableError(f"the key store failed: {exc}") from exc
            except sqlite3.Error as exc:
                raise BackendUnavailableError(f"the key store failed: {exc}") from exc


def _when(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _record(row: tuple[Any, ...]) -> ApiKey:
    revoked = None if row[6] is None else _when(row[6])
    return ApiKey(row[0], row[1], row[2], bool(row[3]), row[4], _when(row[5]), revoked)
