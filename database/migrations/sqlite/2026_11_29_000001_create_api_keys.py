"""API keys of the HTTP/MCP service (issue 12): one row per key, the key itself never stored.

``key_hash`` is the SHA-256 of the key (hex); a key is 256 random bits, so a fast hash is enough
and lookups by hash need no per-row salt. ``user_id`` is the user the key acts for (``NULL`` for
an admin key); ``prefix`` is the key's first characters, so that ``keys list`` can show which key
is which without revealing it. Revoking sets ``revoked_at``; the row stays for the record.
"""

from __future__ import annotations

from typing import Any


def up(db: Any) -> None:
    db.execute("""
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT,
            user_id TEXT,
            is_admin INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL,
            CHECK ((is_admin = 1) = (user_id IS NULL))
        )
    """)


def down(db: Any) -> None:
    db.execute("DROP TABLE IF EXISTS api_keys")
