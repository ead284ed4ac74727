"""Online backups of a SQLite database with SQLite's backup API, consistent while writers work.

The backup copies pages in steps (so progress can be shown) from one read transaction held for
the whole copy: every page comes from the same snapshot, and writers in other connections or
processes go on meanwhile (WAL). Without that transaction, SQLite restarts a stepped backup
whenever another connection writes, and under steady writes it would never finish.

The copy is written to ``<target>.partial`` and renamed when complete and checked. A backup
holds an ``flock`` on its partial file while it runs, so a later backup can tell the partial
files of killed backups (nobody holds their lock) from running ones, and removes the dead ones in
its folder before it starts: a killed backup's leftovers last until the next backup, no longer.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.core.database.sqlite_connection import open_sqlite
from app.core.memory.errors import InvalidInputError, MemoryDriverError

#: Pages copied per step (4 KiB each): progress is reported after each step.
PAGES_PER_STEP = 256
PARTIAL_SUFFIX = ".partial"
SQLITE_HEADER = b"SQLite format 3\x00"


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
    overwrites anything). Partial files that killed backups left in ``target``'s folder are
    removed first (see the module docstring).
    """
    if not source.is_file():
        raise InvalidInputError(f"no SQLite database at {source}")
    if target.exists():
        raise InvalidInputError(f"{target} exists already; a backup never overwrites a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    remove_dead_partials(target.parent)
    with _claimed(partial):
        try:
            pages, check = _copy(source, partial, progress)
        except BaseException:  # an error or Ctrl-C: leave nothing half-written behind
            _remove(partial)
            raise
        if check != "ok":
            _remove(partial)
            raise MemoryDriverError(f"the backup failed its integrity check: {check}")
        partial.rename(target)  # only a complete, checked copy ever carries the target's name
    return BackupResult(target, pages, target.stat().st_size, time.perf_counter() - started)


def remove_dead_partials(folder: Path) -> list[Path]:
    """Remove the ``*.partial`` files in ``folder`` whose backup is no longer running (its lock
    is free); returns them."""
    removed = []
    for partial in sorted(folder.glob(f"*{PARTIAL_SUFFIX}")):
        try:
            handle = os.open(partial, os.O_RDONLY)
        except FileNotFoundError:
            continue  # finished or removed meanwhile
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a backup is writing it now
        else:
            # Only what a backup leaves: an empty file or an SQLite one, never someone's file.
            if os.pread(handle, len(SQLITE_HEADER), 0) in (b"", SQLITE_HEADER):
                _remove(partial)
                removed.append(partial)
        finally:
            os.close(handle)
    return removed


@contextmanager
def _claimed(partial: Path) -> Iterator[None]:
    """Create ``partial`` (replacing a dead one) and hold its lock until the block ends."""
    handle = os.open(partial, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise InvalidInputError(f"another backup is writing {partial} now") from None
    try:
        os.ftruncate(handle, 0)  # a dead backup's pages must not become part of this copy
        _remove_journal(partial)
        yield
    finally:
        os.close(handle)


def _remove(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _remove_journal(partial)


def _remove_journal(partial: Path) -> None:
    Path(f"{partial}-journal").unlink(missing_ok=True)


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
