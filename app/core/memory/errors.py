"""The error classes of the memory layer.

Every failure a caller can see is one of these. Backend exceptions (sqlite3, psycopg, httpx) are
wrapped with ``raise ... from exc`` so that agent code handles one small hierarchy whatever driver
is configured. ``InvalidInputError`` and ``DriverNotFoundError`` are also ``ValueError`` so that
code written against plain Python conventions keeps working.
"""

from __future__ import annotations


class MemoryDriverError(Exception):
    """Base class of every error raised by the memory layer."""


class DriverNotFoundError(MemoryDriverError, ValueError):
    """No registered, built-in or plugin driver has the requested name."""


class InvalidInputError(MemoryDriverError, ValueError):
    """An argument broke an input rule; raised before anything is written."""


class MissingDependencyError(MemoryDriverError, ImportError):
    """A driver's optional dependency is not installed; the message names the pip extra."""


class BackendUnavailableError(MemoryDriverError):
    """The backend could not be reached or did not answer in time (after any retries)."""


class SchemaNotMigratedError(MemoryDriverError):
    """The database lacks the tables the driver needs; run ``python migrate.py``."""


class EmbeddingMismatchError(MemoryDriverError):
    """The configured embedding model differs from the one the stored vectors were made with."""


class NotSupportedError(MemoryDriverError):
    """The driver cannot do what was asked; it never ignores an argument silently."""
