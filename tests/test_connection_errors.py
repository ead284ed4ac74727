"""PostgreSQL connection failures say their cause at once, and once: a missing database (run
migrate.py), an unknown role, nothing listening, a string that is not a connection string. Real
server on 127.0.0.1; the pool timeout is set far above what the tests allow, so a driver that
still waits it out fails them."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest
from psycopg.conninfo import make_conninfo

from app.core.memory import BackendUnavailableError, InvalidInputError, SchemaNotMigratedError
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from tests.conftest import PG_ADMIN_URL, PROJECT_ROOT
from tests.word_hash_embedder import WordHashEmbedder

SLOW_POOL = 60.0  # seconds: waiting this out would be the old behaviour
PROMPT = 20.0     # far above a refused connection's milliseconds, far below SLOW_POOL


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def causes() -> dict[str, tuple[str, type[Exception], str]]:
    """Each fault: its DATABASE_URL, the error it must raise, and words the message must hold."""
    missing = f"memory_missing_{secrets.token_hex(4)}"
    return {
        "missing database": (make_conninfo(PG_ADMIN_URL, dbname=missing), SchemaNotMigratedError,
                             f'"{missing}" does not exist'),
        "unknown role": (make_conninfo(PG_ADMIN_URL, user="no_such_role_x"),
                         BackendUnavailableError,
                         'authentication failed for role "no_such_role_x"'),
        "no server": (make_conninfo(PG_ADMIN_URL, port=str(free_port())),
                      BackendUnavailableError, "connection refused"),
    }


@pytest.mark.parametrize("fault", list(causes()))
def test_driver_says_the_cause_at_once(fault: str):
    url, error, words = causes()[fault]
    driver = PgvectorDriver(url=url, embedder=WordHashEmbedder(), pool_timeout=SLOW_POOL)
    started = time.monotonic()
    with pytest.raises(error) as raised:
        driver.stats()
    report = driver.health_check()
    elapsed = time.monotonic() - started
    driver.close()
    assert words in str(raised.value)
    if fault == "missing database":
        assert "migrate.py" in str(raised.value)
    assert report["status"] == "down" and words in report["checks"]["database"]["error"]
    assert elapsed < PROMPT, f"took {elapsed:.1f}s: the pool's timeout was waited out"


def test_not_a_connection_string_is_refused_when_the_driver_is_made():
    with pytest.raises(InvalidInputError, match="not a valid PostgreSQL connection string"):
        PgvectorDriver(url="not-a-url", embedder=WordHashEmbedder())


@pytest.mark.parametrize("fault", ["missing database", "unknown role"])
def test_cli_prints_the_cause_once_without_pool_warnings(fault: str):
    url, _, words = causes()[fault]
    env = dict(os.environ, MEMORY_DRIVER="pgvector", DATABASE_URL=url,
               MEMORY_PG_POOL_TIMEOUT=str(SLOW_POOL))
    done = subprocess.run([sys.executable, "-m", "app", "stats"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count(words) == 1, done.stderr
    assert "error connecting in" not in done.stderr  # psycopg_pool's retry warnings
    assert "Traceback" not in done.stderr


def test_a_failed_connection_is_logged_once_under_the_app_logger(caplog: pytest.LogCaptureFixture):
    url, _, words = causes()["unknown role"]
    driver = PgvectorDriver(url=url, embedder=WordHashEmbedder(), pool_timeout=SLOW_POOL)
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendUnavailableError):
        driver.stats()
    driver.close()
    ours = [record for record in caplog.records if record.name.startswith("app.")]
    assert len(ours) == 1 and words in ours[0].getMessage(), caplog.text
    assert ours[0].levelno == logging.INFO  # the error itself is what the caller sees
    assert not logging.getLogger("app").handlers  # the application decides where logs go
