"""Opening SQLite connections the way every part of the project needs them.

WAL journal (readers never block the writer), ``busy_timeout`` (a writer waits for another
instead of failing at once), foreign keys on, ``synchronous=NORMAL`` (durable at every checkpoint,
safe against corruption with WAL). Autocommit mode: transactions are explicit ``BEGIN`` blocks.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

MEMORY_DATABASE = ":memory:"


def open_sqlite(path: str | Path, *, busy_timeout_ms: int = 5_000,
                create: bool = True, mmap_bytes: int = 0) -> sqlite3.Connection:
    """Open a configured connection to ``path``.

    With ``create`` (the migrator's, backup's way) a missing file and its folder are made; without
    it (the driver's way) a missing file is an ``sqlite3.OperationalError``, so that a database
    deleted under a running program is never silently replaced by a new, empty one.
    The connection may be closed from another thread (``check_same_thread=False``) but must be
    used by one thread at a time.

    ``mmap_bytes``: read up to that much of the file through memory mapping (``mmap_size``)
    instead of ``read()`` calls into the connection's own page cache (2 MB): pages come
    straight from the operating system's cache, and a connection whose cache another
    connection's write has emptied (SQLite drops it whole) starts warm.
    """
    location = str(path)
    uri = False
    if location != MEMORY_DATABASE:
        resolved = Path(location).expanduser()
        if create:
            resolved.parent.mkdir(parents=True, exist_ok=True)
            location = str(resolved)
        else:
            location, uri = f"file:{quote(str(resolved))}?mode=rw", True
    connection = sqlite3.connect(
        location, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False,
        uri=uri,
    )
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if str(path) != MEMORY_DATABASE:
        _enable_wal(connection, busy_timeout_ms)
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA synchronous = NORMAL")
    if mmap_bytes > 0 and str(path) != MEMORY_DATABASE:
        connection.execute(f"PRAGMA mmap_size = {int(mmap_bytes)}")
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
