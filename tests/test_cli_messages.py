"""What a user sees when something is wrong: one line saying what and how to fix it, and exit 2
for a bad setting, path, file or model, never a traceback; from ``python -m app`` and
``migrate.py`` as real processes (the exit status and stderr are what is under test)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.conftest import PG_ADMIN_URL, PROJECT_ROOT, migrate_sqlite


def run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``argv`` (``app ...`` or ``migrate.py ...``) as a process with ``env`` added."""
    command = [sys.executable, "-m", *argv] if argv[0] == "app" else [sys.executable, *argv]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=180, env={**os.environ, **env})


def refused(done: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == status, (done.returncode, done.stderr)
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


def damaged(tmp_path: Path) -> Path:
    path = tmp_path / "damaged.sqlite3"
    path.write_bytes(b"this was a database once" * 400)
    return path


def test_a_bad_environment_value_is_named():
    bad = {"MEMORY_SQLITE_BUSY_TIMEOUT_MS": "5s"}
    refused(run("app", "stats", **bad), 2, "MEMORY_SQLITE_BUSY_TIMEOUT_MS", "whole number")
    refused(run("migrate.py", "--database", "sqlite", **bad), 2,
            "MEMORY_SQLITE_BUSY_TIMEOUT_MS")


def test_a_path_that_cannot_be_used_is_named(tmp_path: Path):
    # /proc/self takes no new files or folders, whoever runs the tests (root included).
    refused(run("app", "store", "alice", "a note",
                MEMORY_SQLITE_PATH="/proc/self/no/memory.sqlite3"), 2, "/proc/self/no")
    refused(run("migrate.py", "--database", "sqlite", "--path", "/proc/self/no/m.sqlite3"), 2,
            "/proc/self/no")
    refused(run("migrate.py", "--database", "sqlite", "--path", "/proc/self/m.sqlite3"), 2,
            "/proc/self/m.sqlite3")


def test_a_damaged_file_is_named_by_migrate_and_backup(tmp_path: Path):
    path = damaged(tmp_path)
    refused(run("migrate.py", "--database", "sqlite", "--path", str(path)), 2, str(path),
            "not a database")
    refused(run("app", "--json", "backup", MEMORY_SQLITE_PATH=str(path)), 2, "not a database")


def test_a_model_that_is_not_installed_is_named_without_internet_advice(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "memory.sqlite3")
    done = run("app", "recall", "alice", "anything", MEMORY_SQLITE_PATH=str(path),
               MEMORY_EMBEDDING_MODEL="no-such-model-x")
    refused(done, 2, "'no-such-model-x'", "not installed")
    assert "internet" not in done.stderr


def test_a_closed_pipe_ends_quietly(tmp_path: Path):
    path = migrate_sqlite(tmp_path / "memory.sqlite3")
    process = subprocess.Popen([sys.executable, "-m", "app", "--json", "stats"], cwd=PROJECT_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MEMORY_SQLITE_PATH": str(path)})
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # like `| head` that has read all it wanted
    errors = process.stderr.read()
    process.wait(timeout=120)
    assert "BrokenPipeError" not in errors and "Traceback" not in errors, errors
    assert errors == ""


@pytest.fixture
def role_without_create():
    """A role that may connect to a fresh database but not create tables in schema public."""
    role, database = f"memory_nocreate_{secrets.token_hex(3)}", f"memory_nc_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        yield make_conninfo(PG_ADMIN_URL, user=role, dbname=database)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_migrate_as_a_role_without_create_says_so(role_without_create: str):
    refused(run("migrate.py", "--database", "pgvector", DATABASE_URL=role_without_create), 1,
            "permission denied")
