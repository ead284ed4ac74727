"""Online backups of a SQLite database with SQLite's backup API, consistent while writers work.

The backup copies pages in steps (so progress can be shown) from one read transaction held for
the whole copy: every page comes from the same snapshot, and writers in other connections or
processes go on meanwhile (WAL). Without that transaction, SQLite restarts a stepped backup
whenever another connection writes, and under steady writes it would never finish.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from app.core.database.sqlite_connection import open_sqlite
from app.core.memory.errors import InvalidInputError, MemoryDriverError

#: Pages copied per step (4 KiB each): progress is reported after each step.
PAGES_PER_STEP = 256


@dataclass(frozen=True)
class BackupResult:
    """Where the backup went, how big it is, how long it took."""

    path: Path
    pages: int
    bytes: int
    seconds: float


def backup_sqlite(source: Path, target: Path, *,
                  progress: Callable[[int, int], None] | None = None) -> BackupResult:
    """Copy the database ``source`` to the new file ``target``; ``progress(done, total)`` is
    called with page counts after each step. The copy is checked with ``PRAGMA
    integrity_check`` before this returns.

    Raises ``InvalidInputError`` if ``source`` does not exist or ``target`` does (a backup never
    overwrites anything).
    """
    if not source.is_file():
        raise InvalidInputError(f"no SQLite database at {source}")
    if target.exists():
        raise InvalidInputError(f"{target} exists already; a backup never overwrites a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        pages, check = _copy(source, partial, progress)
    except BaseException:  # an error or Ctrl-C: leave nothing half-written behind
        partial.unlink(missing_ok=True)
        raise
    if check != "ok":
        partial.unlink(missing_ok=True)
        raise MemoryDriverError(f"the backup failed its integrity check: {check}")
    partial.rename(target)  # only a complete, checked copy ever carries the target's name
    return BackupResult(target, pages, target.stat().st_size, time.perf_counter() - started)


def _copy(source: Path, partial: Path,
          progress: Callable[[int, int], None] | None) -> tuple[int, str]:
    """Copy from one read snapshot; returns the copy's page count and integrity check."""
    with closing(open_sqlite(source)) as reader, closing(sqlite3.connect(partial)) as copy:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # take the snapshot
        try:
            reader.backup(copy, pages=PAGES_PER_STEP,
                          progress=None if progress is None else
                          lambda _status, remaining, total: progress(total - remaining, total))
        finally:
            reader.execute("COMMIT")
        return (copy.execute("PRAGMA page_count").fetchone()[0],
                copy.execute("PRAGMA integrity_check").fetchone()[0])
