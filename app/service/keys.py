"""API keys: making them, hashing them, and deciding which user a key acts for.

A key is ``mem_`` followed by 43 URL-safe characters (256 random bits). It is shown once, when it
is created; the store keeps only its SHA-256 (``hash_key``) and its first 8 characters (so that
``keys list`` can tell keys apart). A request proves a key with ``Authorization: Bearer <key>``.

What a key may do (``Principal``):

- a **user key** acts for exactly one user. A ``user_id`` left out is implied; another one is
  ``Forbidden`` (403). By-id verbs are scoped to the key's user, so someone else's memory answers
  as one that does not exist (404), as the library does.
- an **admin key** acts for any user (it names the user in each call), writes knowledge, reads
  stats and manages keys.
- ``--no-auth`` (loopback only) makes every caller the ``OPERATOR``, an admin without a key.

Nothing here logs or returns a key: errors say "missing", "malformed" or "unknown or revoked".
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from app.core.keys import ApiKey, KeyStore
from app.core.memory.errors import InvalidInputError
from app.core.memory.validation import check_id, check_text

KEY_PREFIX = "mem_"
_SHOWN_CHARS = 8
_MAX_KEY_CHARS = 128
_MAX_NAME_CHARS = 200


class AuthError(Exception):
    """The caller may not do this; subclasses say why (401 or 403 over HTTP)."""


class Unauthorized(AuthError):
    """No key, a malformed key, or a key that is unknown or revoked."""


class Forbidden(AuthError):
    """A valid key asking for something outside what it may do."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (``None`` without auth), its user (``None`` for an admin)."""

    key_id: str | None
    user_id: str | None
    is_admin: bool

    def acting_user(self, requested: str | None) -> str:
        """The user a user-scoped call acts for, given the ``user_id`` the caller asked for.

        A user key implies its own user and refuses another one; an admin must name the user.
        """
        if not self.is_admin:
            if requested is not None and requested != self.user_id:
                raise Forbidden("this key acts only for its own user; "
                                "leave user_id out or give the key's user")
            assert self.user_id is not None
            return self.user_id
        if requested is None:
            raise InvalidInputError("user_id is required when the key is an admin key")
        return check_id(requested, "user_id")

    def scope(self, requested: str | None) -> str | None:
        """The ``user_id`` to pass to a by-id verb: a user key's own user (so that another
        user's memory answers as missing); for an admin, whatever was asked (``None``: the id
        alone, an operator's call)."""
        if not self.is_admin:
            if requested is not None and requested != self.user_id:
                raise Forbidden("this key acts only for its own user; "
                                "leave user_id out or give the key's user")
            return self.user_id
        return requested

    def require_admin(self, what: str) -> None:
        """Refuse (403) unless this is an admin."""
        if not self.is_admin:
            raise Forbidden(f"{what} needs an admin key")


OPERATOR = Principal(key_id=None, user_id=None, is_admin=True)


def hash_key(key: str) -> str:
    """The hex SHA-256 of ``key``: what the store keeps and looks up."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(store: KeyStore, *, user_id: str | None = None,
               name: str | None = None) -> tuple[ApiKey, str]:
    """Make a key for ``user_id`` (``None``: an admin key), store its hash; returns the stored
    record and the key itself, which exists nowhere else: show it once and forget it."""
    if user_id is not None:
        user_id = check_id(user_id, "user_id")
    if name is not None:
        name = check_text(name, "name", max_chars=_MAX_NAME_CHARS)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = store.add(key_id="key_" + secrets.token_hex(6), key_hash=hash_key(key),
                       prefix=key[:_SHOWN_CHARS], user_id=user_id, name=name)
    return record, key


def bearer_token(authorization: str | None) -> str:
    """The key carried by an ``Authorization`` header value; ``Unauthorized`` if there is none."""
    if not authorization:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if not hmac.compare_digest(scheme.lower(), "bearer") or not token:
        raise Unauthorized("malformed Authorization header: send Authorization: Bearer <key>")
    return token


def presented_key_hash(authorization: str | None) -> str:
    """The hash of the key in an ``Authorization`` header value, what the store looks up;
    ``Unauthorized`` for no key or one that cannot be a key (before anything is looked up)."""
    token = bearer_token(authorization)
    if len(token) > _MAX_KEY_CHARS or not token.startswith(KEY_PREFIX):
        raise Unauthorized("unknown or revoked API key")
    return hash_key(token)


def principal_of(store: KeyStore, key_hash: str) -> Principal:
    """The ``Principal`` of the active key with hash ``key_hash``; ``Unauthorized`` if it is
    unknown or revoked (this reads the store: a revocation counts from the next call)."""
    record = store.find_active(key_hash)
    if record is None:
        raise Unauthorized("unknown or revoked API key")
    return Principal(key_id=record.id, user_id=record.user_id, is_admin=record.is_admin)


def authenticate(store: KeyStore, authorization: str | None) -> Principal:
    """The ``Principal`` of the key in an ``Authorization`` header value.

    ``Unauthorized`` for no key, a malformed one, or one unknown or revoked (the store is read
    on every call; the HTTP service remembers active keys briefly, see ``ServiceState``).
    """
    return principal_of(store, presented_key_hash(authorization))


def key_summary(record: ApiKey) -> dict[str, object]:
    """A key's record as shown to people and over HTTP (never the key or its hash)."""
    return {
        "id": record.id,
        "name": record.name,
        "user_id": record.user_id,
        "admin": record.is_admin,
        "prefix": record.prefix,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
    }


__all__ = [
    "KEY_PREFIX", "OPERATOR", "AuthError", "Forbidden", "InvalidInputError", "Principal",
    "Unauthorized", "authenticate", "bearer_token", "create_key", "hash_key", "key_summary",
    "presented_key_hash", "principal_of",
]
