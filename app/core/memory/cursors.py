"""Opaque ``list_memories`` cursors, shared by every driver.

A cursor names the position after which the next page starts and is meaningful only for the
listing that issued it (same user, same filters, same ``include_deleted``). It is the URL-safe
base64 of ``<position>.<check>``, where ``position`` is driver-chosen text about the caller's own
data (the SQLite and PGVector drivers use the id of the page's last memory, never the table's
primary key, so a cursor reveals nothing about other users or how large the store is) and
``check`` is a digest of the position and the listing's scope.

The digest is not a secret: a caller can forge a cursor for a scope of its own, but a forged
cursor only ever positions a listing of that caller's own memories (drivers look the position up
inside the listing's user), so nothing is gained by forging. What it does guarantee is that a
cursor reused with another user or other filters, or altered, is refused as
``InvalidInputError`` naming ``cursor`` rather than silently paging something else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

from app.core.memory.errors import InvalidInputError
from app.core.memory.validation import RecallFilters

#: Bumped if the format changes, so old cursors are refused instead of misread.
_VERSION = "c1"
#: Hex digits of the digest kept: 96 bits, far beyond guessing by accident.
_CHECK_CHARS = 24
#: A cursor longer than this was not issued by us (a 128-character id encodes to ~220).
MAX_CURSOR_CHARS = 512

_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")  # URL-safe base64 without padding, nothing else

CURSOR_RULE = ("a cursor returned by list_memories for the same user_id, filters and "
         "include_deleted (cursors are not reusable across listings)")

#: The message when a cursor's position (the memory it continues after) no longer exists.
CURSOR_GONE = ("cursor must point after a memory that still exists: the memory this cursor "
               "continues after was purged or erased; list again without a cursor")


def listing_scope(filters: RecallFilters, *, include_deleted: bool) -> str:
    """The scope a cursor is bound to: the listing's user, filters and ``include_deleted``."""
    return json.dumps([_VERSION, filters.user_id, filters.agent_id, filters.conversation_id,
                       filters.namespace, sorted(filters.tags), include_deleted])


def _check(position: str, scope: str) -> str:
    digest = hashlib.sha256(f"{scope}\0{position}".encode())
    return digest.hexdigest()[:_CHECK_CHARS]


def encode_cursor(position: str, scope: str) -> str:
    """The cursor for the page that starts after ``position`` in the listing ``scope``."""
    raw = f"{position}.{_check(position, scope)}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(value: Any, scope: str, name: str = "cursor") -> str | None:
    """The position ``value`` encodes, if it was issued for ``scope``; ``None`` for no cursor.

    Raises ``InvalidInputError`` naming ``name`` for anything else: not a string, not one of our
    cursors, altered, or issued for another listing. The value is never quoted (it is opaque).
    """
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_CURSOR_CHARS \
            or not _ALPHABET.fullmatch(value):
        raise InvalidInputError(f"{name} must be {CURSOR_RULE}")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{name} must be {CURSOR_RULE}") from None
    position, dot, check = raw.rpartition(".")
    if not dot or not position or check != _check(position, scope):
        raise InvalidInputError(f"{name} must be {CURSOR_RULE}")
    return position
