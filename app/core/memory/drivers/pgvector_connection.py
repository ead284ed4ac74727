"""Connecting the pgvector driver: the connection string checked, failures explained, logs clean.

- ``check_url`` reads ``DATABASE_URL`` by libpq's rules before anything connects, and refuses a
  string libpq cannot read (or one whose raw ``@`` in the password shifted part of it into the
  host) with ``InvalidInputError``, without quoting it.
- ``connection_cause`` makes one direct connection attempt and, when it fails, returns an error
  that says why in a sentence (database missing: run migrate.py; authentication failed for role
  X; nothing listens at host:port; the host does not resolve). The driver calls it before it
  opens its pool, so a certain failure is reported at once and once, instead of after the pool's
  whole timeout with one pool warning per retry; and again when a checkout times out, to tell a
  server gone away from a pool that is merely busy.
- ``guard_pool_log`` filters psycopg_pool's logger so that its messages never carry a secret of a
  registered connection string (libpq's messages can quote it).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from app.core.memory.errors import (
    BackendUnavailableError,
    InvalidInputError,
    MemoryDriverError,
    SchemaNotMigratedError,
)
from config.settings import ConninfoError, parse_conninfo, redact_secrets, redact_url

logger = logging.getLogger(__name__)

_MISSING_DATABASE = re.compile(r'database "([^"]*)" does not exist')
_MISSING_ROLE = re.compile(r'role "([^"]*)" does not exist')
_BAD_PASSWORD = re.compile(r'password authentication failed for user "([^"]*)"')
_NO_HBA = re.compile(r'no pg_hba\.conf entry for host "([^"]*)", user "([^"]*)"')


def check_url(url: str) -> dict[str, str]:
    """``url`` read by libpq's rules; ``InvalidInputError`` (never quoting it) if it cannot be."""
    try:
        return parse_conninfo(url)
    except ConninfoError as exc:
        refusal = str(exc)  # parse_conninfo's message never quotes the string
    raise InvalidInputError(refusal)


def connection_cause(url: str, connect_timeout: float) -> MemoryDriverError | None:
    """None if one direct connection to ``url`` works; else an error saying why it did not."""
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=max(1, round(connect_timeout))).close()
    except psycopg.Error as exc:
        cause = explain(exc, url)
        logger.info("connecting to %s failed: %s", redact_url(url), cause)
        return cause
    return None


def explain(exc: BaseException, url: str) -> MemoryDriverError:
    """A connection failure as one sentence with its cause and the fix; no secret of ``url``."""
    message = redact_secrets(" ".join(str(exc).split()), url)
    params = parse_conninfo(url)
    where = f"{params.get('host') or 'the local socket'}:{params.get('port') or 5432}"
    if found := _MISSING_DATABASE.search(message):
        return SchemaNotMigratedError(
            f'the PostgreSQL database "{found[1]}" does not exist on {where}: run '
            "`python migrate.py --database pgvector` (it creates the database and its tables)")
    if found := _MISSING_ROLE.search(message):
        return BackendUnavailableError(
            f'authentication failed for role "{found[1]}" on {where}: the role does not exist')
    if found := _BAD_PASSWORD.search(message):
        return BackendUnavailableError(
            f'authentication failed for role "{found[1]}" on {where}: wrong password')
    if found := _NO_HBA.search(message):
        return BackendUnavailableError(
            f'authentication failed for role "{found[2]}" on {where}: the server\'s '
            f"pg_hba.conf has no entry for host {found[1]}")
    if "no password supplied" in message:
        return BackendUnavailableError(
            f"authentication failed on {where}: the server asks for a password and "
            "DATABASE_URL gives none")
    if "Connection refused" in message or "No such file or directory" in message:
        return BackendUnavailableError(
            f"no PostgreSQL server answers at {where} (connection refused): is it running?")
    if "failed to resolve host" in message or "could not translate host name" in message:
        return BackendUnavailableError(
            f"the host in DATABASE_URL ({params.get('host')}) cannot be resolved")
    if "timeout expired" in message:
        return BackendUnavailableError(
            f"no answer from the PostgreSQL server at {where} within the connect timeout")
    return BackendUnavailableError(
        f"cannot connect to PostgreSQL at {redact_url(url)}: {message}")


class _RedactingFilter(logging.Filter):
    """Rewrites each record of the pool's logger with the registered strings' secrets removed."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self.lock:
            urls = list(self.urls)
        if urls:
            message = record.getMessage()
            for url in urls:
                message = redact_secrets(message, url)
            record.msg, record.args = message, ()
        return True


_filter = _RedactingFilter()


def guard_pool_log(url: str, logger_name: str = "psycopg.pool") -> None:
    """Keep every secret of ``url`` out of the records psycopg_pool's logger emits."""
    with _filter.lock:
        _filter.urls.add(url)
    pool_logger: Any = logging.getLogger(logger_name)
    if _filter not in pool_logger.filters:
        pool_logger.addFilter(_filter)
