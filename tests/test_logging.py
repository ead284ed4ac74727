"""The library logs through standard ``logging`` under the ``app`` root, installs no handler, and
never logs a secret or memory content: driver opened (INFO, path or redacted URL), migrations run
(INFO), AutoMem retries (WARNING), refused import lines (WARNING, line number and rule). Real
SQLite files, the real PostgreSQL server, and the AutoMem test double (a real HTTP server)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from app.core.memory.drivers.automem_driver import AutomemDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from app.core.memory.transfer import export_dump, import_dump
from tests.automem_double import AutomemDouble
from tests.conftest import migrate_sqlite

SECRET_CONTENT = "the vault code is TOPSECRET-4711"


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name.startswith("app.")]


def _text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in _records(caplog))


def test_no_handler_is_installed_by_the_library() -> None:
    # Importing the drivers (done above) must leave handlers to the application.
    for name in ("app", "app.core", "app.core.memory", "app.core.memory.drivers.sqlite_driver",
                 "app.core.memory.drivers.pgvector_driver", "app.core.memory.transfer",
                 "app.core.memory.drivers.automem_http", "app.core.database.migrator"):
        assert logging.getLogger(name).handlers == [], name


def test_migrations_and_sqlite_opening_are_logged(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture,
                                                  embedder: SentenceTransformerEmbedder) -> None:
    caplog.set_level(logging.INFO, logger="app")
    path = migrate_sqlite(tmp_path / "logged.sqlite3")
    ran = [r for r in _records(caplog) if r.name == "app.core.database.migrator"]
    assert ran and all(r.levelno == logging.INFO and "ran migration" in r.getMessage()
                       for r in ran)
    caplog.clear()
    driver = SqliteDriver(path=path, embedder=embedder)
    try:
        driver.store("alice", SECRET_CONTENT)
        driver.list_memories("alice")
    finally:
        driver.close()
    opened = [r for r in _records(caplog) if r.levelno == logging.INFO
              and r.name == "app.core.memory.drivers.sqlite_driver"]
    assert len(opened) == 1 and str(path.resolve()) in opened[0].getMessage()
    assert "TOPSECRET" not in _text(caplog)


def test_postgresql_opening_is_logged_without_the_password(
        empty_pg: str, caplog: pytest.LogCaptureFixture,
        embedder: SentenceTransformerEmbedder) -> None:
    caplog.set_level(logging.DEBUG, logger="app")
    # The server trusts 127.0.0.1, so the password is sent but not needed: the open succeeds.
    url = make_conninfo(empty_pg, password="hunter2-pw-never-logged")
    driver = PgvectorDriver(url=url, embedder=embedder)
    try:
        driver.list_memories("alice")
    finally:
        driver.close()
    opened = [r for r in _records(caplog) if r.levelno == logging.INFO
              and r.name == "app.core.memory.drivers.pgvector_driver"]
    assert len(opened) == 1 and "***" in opened[0].getMessage()
    assert "hunter2" not in _text(caplog)


def test_automem_retries_are_warnings_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="app")
    double = AutomemDouble(token="tok-never-logged-123")
    url = double.start()
    try:
        driver = AutomemDriver(url=url, token="tok-never-logged-123", backoff_seconds=0.01,
                               max_tries=3)
        double.fail_next(2, 503)
        driver.list_memories("alice")
        driver.close()
    finally:
        double.stop()
    retries = [r for r in _records(caplog) if r.name == "app.core.memory.drivers.automem_http"]
    assert [r.levelno for r in retries] == [logging.WARNING] * 2
    assert "HTTP 503" in retries[0].getMessage() and "try 2 of 3" in retries[0].getMessage()
    assert "tok-never-logged" not in _text(caplog)


def test_refused_import_lines_are_warnings_with_number_and_rule_never_content(
        sqlite_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        embedder: SentenceTransformerEmbedder) -> None:
    source = SqliteDriver(path=sqlite_path, embedder=embedder)
    out = io.StringIO()
    try:
        source.store("alice", "harmless")
        export_dump(source, out, with_embeddings=False)
    finally:
        source.close()
    lines = out.getvalue().splitlines()
    record = next(json.loads(line) for line in lines if '"harmless"' in line)
    bad = json.dumps({**record, "id": "bad-one", "content": SECRET_CONTENT, "importance": 7})
    worse = json.dumps({**record, "id": "worse-one", "content": [SECRET_CONTENT]})
    dump = [lines[0], bad, "{not json " + SECRET_CONTENT, worse, *lines[1:]]
    target = SqliteDriver(path=migrate_sqlite(tmp_path / "target.sqlite3"), embedder=embedder)
    caplog.set_level(logging.INFO, logger="app")
    caplog.clear()
    try:
        report = import_dump(target, dump)
    finally:
        target.close()
    assert [place for place, _ in report.refused] == ["line 2", "line 3", "line 4"]
    # The report (for the dump's owner) quotes the value; the log must not.
    assert any("TOPSECRET" in reason for _, reason in report.refused), report.refused
    refused = [r for r in _records(caplog) if r.name == "app.core.memory.transfer"]
    assert [r.levelno for r in refused] == [logging.WARNING] * 3
    assert ["line 2" in refused[0].getMessage(), "importance" in refused[0].getMessage(),
            "line 3" in refused[1].getMessage(), "line 4" in refused[2].getMessage(),
            "content" in refused[2].getMessage()] == [True] * 5
    assert "TOPSECRET" not in _text(caplog)


def test_slow_verbs_are_warnings_over_the_setting(
        monkeypatch: pytest.MonkeyPatch, sqlite_path: Path, empty_pg: str,
        caplog: pytest.LogCaptureFixture, embedder: SentenceTransformerEmbedder) -> None:
    from config.settings import reset_settings

    monkeypatch.setenv("MEMORY_SQLITE_PATH", str(sqlite_path))
    monkeypatch.setenv("DATABASE_URL", empty_pg)
    monkeypatch.setenv("MEMORY_SLOW_OPERATION_MS", "1")  # embedding a memory takes longer
    reset_settings()
    caplog.set_level(logging.INFO, logger="app")
    for driver in (SqliteDriver.from_settings(), PgvectorDriver.from_settings()):
        assert driver.slow_operation_ms == 1
        try:
            caplog.clear()
            driver.store("alice", SECRET_CONTENT)
            slow = [r for r in _records(caplog) if r.levelno == logging.WARNING]
            assert len(slow) == 1 and f"slow {driver.name}.store" in slow[0].getMessage()
            driver.slow_operation_ms = 0  # off
            caplog.clear()
            driver.store("alice", "again")
            assert not [r for r in _records(caplog) if r.levelno == logging.WARNING]
        finally:
            driver.close()
    assert "TOPSECRET" not in _text(caplog)
    reset_settings()
