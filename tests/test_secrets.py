"""Secrets: the database password and the AutoMem token never appear in logs (every logger, at
DEBUG), errors (with their causes), ``health_check`` output, the CLI's output or
``migrate.py``'s, whatever goes wrong: a server that is not there, 5xx answers, garbage bodies, a
wrong token."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from app.core.memory import MemoryDriverError
from app.core.memory.drivers.automem_driver import AutomemDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from tests.automem_double import AutomemDouble
from tests.conftest import PROJECT_ROOT
from tests.word_hash_embedder import WordHashEmbedder

PASSWORD = "hunter2-pg-secret"
TOKEN = "tok-automem-secret-42"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def error_chain(error: BaseException | None) -> str:
    """The error and every cause or context behind it, as text."""
    texts = []
    while error is not None:
        texts.append(f"{type(error).__name__}: {error!r} {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


def test_postgres_password_is_in_no_log_error_or_report(every_log):
    url = f"postgresql://memory:{PASSWORD}@127.0.0.1:{free_port()}/memory"
    driver = PgvectorDriver(url=url, embedder=WordHashEmbedder(), pool_timeout=1.0,
                            connect_timeout=1.0)
    seen = [repr(driver.health_check()), repr(driver), str(driver.url)]
    for call in (lambda: driver.recall("alice", query="x"), lambda: driver.store("alice", "x"),
                 lambda: driver.stats()):
        with pytest.raises(MemoryDriverError) as raised:
            call()
        seen.append(error_chain(raised.value))
    driver.close()
    assert every_log.records, "failed connections are logged; nothing was captured"
    seen.append(every_log.text)
    assert PASSWORD not in "\n".join(seen)


@pytest.mark.parametrize("fault", ["wrong token", "5xx", "garbage", "no server"])
def test_automem_token_is_in_no_log_error_or_report(every_log, fault: str):
    double = AutomemDouble(token=TOKEN if fault != "wrong token" else "the-real-token")
    url = double.start()
    if fault == "no server":
        double.stop()
    elif fault == "5xx":
        double.fail_next(100)
    elif fault == "garbage":
        double.garbage_next(100)
    driver = AutomemDriver(url=url, token=TOKEN, max_tries=2, backoff_seconds=0.0,
                           connect_timeout=1.0, read_timeout=2.0)
    seen = [repr(driver.health_check()), repr(driver)]
    with pytest.raises(MemoryDriverError) as raised:
        driver.recall("alice", query="anything")
    seen.append(error_chain(raised.value))
    driver.close()
    if fault != "no server":
        double.stop()
    assert every_log.records, "httpx logs every request; nothing was captured"
    seen.append(every_log.text)
    assert TOKEN not in "\n".join(seen)


def test_cli_and_migrate_never_print_the_password():
    env = dict(os.environ, MEMORY_DRIVER="pgvector", MEMORY_PG_POOL_TIMEOUT="1",
               MEMORY_PG_CONNECT_TIMEOUT="1",
               DATABASE_URL=f"postgresql://memory:{PASSWORD}@127.0.0.1:{free_port()}/memory")
    runs = [
        [sys.executable, "-m", "app", "health", "--json"],
        [sys.executable, "-m", "app", "stats"],
        [sys.executable, "migrate.py", "status", "--database", "pgvector"],
        [sys.executable, "migrate.py", "--database", "pgvector"],
    ]
    for command in runs:
        done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode != 0 or "down" in done.stdout, (command, done.stdout)
        assert PASSWORD not in done.stdout + done.stderr, command


def url_forms(port: int) -> dict[str, str]:
    """The password in every form libpq accepts, plus strings it cannot read that hold it."""
    return {
        "url": f"postgresql://memory:{PASSWORD}@127.0.0.1:{port}/memory",
        "query": f"postgresql://memory@127.0.0.1:{port}/memory?password={PASSWORD}",
        "keywords": f"host=127.0.0.1 port={port} dbname=memory user=memory password={PASSWORD}",
        "quoted keyword": f"host=127.0.0.1 port={port} user=memory password='{PASSWORD} x'",
        "percent-encoded": f"postgresql://memory:{PASSWORD}%40x@127.0.0.1:{port}/memory",
        "raw @": f"postgresql://memory:x@{PASSWORD}@127.0.0.1:{port}/memory",
        "space": f"postgresql://memory:{PASSWORD} x@127.0.0.1:{port}/memory",
        "bad port": f"postgresql://memory:{PASSWORD}@127.0.0.1:port{PASSWORD}/memory",
        "garbage": f"not-a-url {PASSWORD}",
    }


@pytest.mark.parametrize("form", list(url_forms(1)))
def test_redaction_follows_libpq_for_every_form(form: str):
    from config.settings import redact_secrets, redact_url, strip_password

    url = url_forms(5432)[form]
    message = f"libpq said: {url} / {PASSWORD} / {PASSWORD}%40x"
    shown = [redact_url(url), strip_password(url), redact_secrets(message, url)]
    assert not any(PASSWORD in text for text in shown), shown
    if form in ("url", "query", "keywords"):  # what is not secret stays readable
        assert redact_url(url) == "postgresql://memory:***@127.0.0.1:5432/memory"
        assert strip_password(url) == "postgresql://memory@127.0.0.1:5432/memory"


@pytest.mark.parametrize("form", ["query", "keywords", "raw @", "space", "garbage"])
def test_driver_never_shows_a_password_in_any_form(every_log, form: str):
    url = url_forms(free_port())[form]
    try:
        driver = PgvectorDriver(url=url, embedder=WordHashEmbedder(), pool_timeout=1.0,
                                connect_timeout=1.0)
    except MemoryDriverError as refused:  # strings libpq cannot read: refused, not quoted
        assert form in ("raw @", "space", "garbage")
        assert PASSWORD not in error_chain(refused)
        return
    seen = [repr(driver.health_check()), repr(driver), str(driver.url)]
    with pytest.raises(MemoryDriverError) as raised:
        driver.stats()
    seen.append(error_chain(raised.value))
    driver.close()
    seen.append(every_log.text)
    assert PASSWORD not in "\n".join(seen)


@pytest.mark.parametrize("form", ["query", "keywords", "raw @", "space", "garbage"])
def test_cli_migrate_and_pg_dump_command_never_print_a_password_in_any_form(form: str):
    env = dict(os.environ, MEMORY_DRIVER="pgvector", MEMORY_PG_POOL_TIMEOUT="1",
               MEMORY_PG_CONNECT_TIMEOUT="1", DATABASE_URL=url_forms(free_port())[form])
    runs = [
        [sys.executable, "-m", "app", "health", "--json"],
        [sys.executable, "-m", "app", "stats"],
        [sys.executable, "-m", "app", "backup"],
        [sys.executable, "migrate.py", "--database", "pgvector"],
    ]
    for command in runs:
        done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert "Traceback" not in done.stderr, (command, done.stderr)
        assert PASSWORD not in done.stdout + done.stderr, (command, done.stdout, done.stderr)
