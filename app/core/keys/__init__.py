"""The store of the service's API keys: rows of (id, name, user, admin flag, hash of the key).

The store knows SQL and nothing of HTTP; ``app/service/keys.py`` makes keys, hashes them and
decides what a key may do. A key is never stored, only its hash (``key_hash``), so a stolen
database holds no usable key.

Where keys live: beside the memories, in the database of the configured driver: the SQLite file
(``MEMORY_SQLITE_PATH``) for ``sqlite``, the PostgreSQL database (``DATABASE_URL``) for
``pgvector``. The AutoMem service has no place for them, so with ``automem`` keys live in the
local SQLite file ``MEMORY_SQLITE_PATH`` (run ``python migrate.py --database sqlite`` once; the
memory tables in that file stay empty). ``MEMORY_KEYS_DATABASE`` (sqlite|pgvector) overrides the
choice. The table is created by the ``create_api_keys`` migration, like every other table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ApiKey:
    """One key as stored (never the key itself). ``user_id`` is ``None`` for an admin key."""

    id: str
    name: str | None
    user_id: str | None
    is_admin: bool
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeyStore(ABC):
    """Rows of the ``api_keys`` table. Every method is thread-safe.

    Errors: ``SchemaNotMigratedError`` when the table is missing (it names ``python migrate.py``),
    ``BackendUnavailableError`` when the database cannot be reached.

    ``lookup_is_local``: ``find_active`` is a read of a local file that never waits on the
    network or on writers (SQLite in WAL mode), cheap enough to call on an event loop.
    """

    lookup_is_local: bool = False

    @abstractmethod
    def add(self, *, key_id: str, key_hash: str, prefix: str, user_id: str | None,
            name: str | None) -> ApiKey:
        """Store a new key's row (an admin key when ``user_id`` is ``None``) and return it."""

    @abstractmethod
    def find_active(self, key_hash: str) -> ApiKey | None:
        """The key whose hash is ``key_hash``, unless it is unknown or revoked."""

    @abstractmethod
    def list_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""

    @abstractmethod
    def revoke(self, key_id: str) -> bool:
        """Revoke a key at once; ``False`` if there is no active key with that id."""

    @abstractmethod
    def count_active(self) -> int:
        """How many keys are not revoked."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection(s). Idempotent."""


def open_key_store(driver: str | None = None) -> KeyStore:
    """The key store that goes with the memory driver ``driver`` (default: ``MEMORY_DRIVER``),
    unless ``MEMORY_KEYS_DATABASE`` names one (see the module docstring)."""
    from config.settings import get_settings

    settings = get_settings()
    driver = driver or settings.memory_driver
    chosen = settings.keys_database or ("pgvector" if driver == "pgvector" else "sqlite")
    if chosen not in ("sqlite", "pgvector"):
        from app.core.memory.errors import InvalidInputError

        raise InvalidInputError(f"MEMORY_KEYS_DATABASE must be sqlite or pgvector (got {chosen!r})")
    if chosen == "pgvector":
        from app.core.keys.postgres_key_store import PostgresKeyStore

        return PostgresKeyStore(settings.database_url,
                                connect_timeout=settings.pg_connect_timeout)
    from app.core.keys.sqlite_key_store import SqliteKeyStore

    return SqliteKeyStore(settings.sqlite_path, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
