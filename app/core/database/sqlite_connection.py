"""Opening SQLite connections the way every part of the project needs them.

WAL journal (readers never block the writer), ``busy_timeout`` (a writer waits for another
instead of failing at once), foreign keys on, ``synchronous=NORMAL`` (durable at every checkpoint,
safe against corruption with WAL). Autocommit mode: transactions are explicit ``BEGIN`` blocks.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

MEMORY_DATABASE = ":memory:"


def open_sqlite(path: str | Path, *, busy_timeout_ms: int = 5_000) -> sqlite3.Connection:
    """Open (creating the file and its folder if needed) a configured connection to ``path``.

    The connection may be closed from another thread (``check_same_thread=False``) but must be
    used by one thread at a time.
    """
    location = str(path)
    if location != MEMORY_DATABASE:
        Path(location).expanduser().parent.mkdir(parents=True, exist_ok=True)
        location = str(Path(location).expanduser())
    connection = sqlite3.connect(
        location, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if location != MEMORY_DATABASE:
        _enable_wal(connection, busy_timeout_ms)
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


def _enable_wal(connection: sqlite3.Connection, busy_timeout_ms: int) -> None:
    # Switching a new file to WAL needs a moment of exclusive access, and SQLite answers "database
    # is locked" at once, without its busy handler, when two processes open a new file together.
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
