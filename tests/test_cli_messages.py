"""What a user sees when something is wrong: one line saying what and how to fix it, and exit 2
for a bad setting, path, file or model, never a traceback; from ``python -m app`` and
``migrate.py`` as real processes (the exit status and stderr are what is under test)."""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import sys
from collections.abc import Iterator
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
    database = migrate_sqlite(tmp_path / "memory.sqlite3")
    refused(run("app", "export", "--output", "/proc/self/no/dump.jsonl",
                MEMORY_SQLITE_PATH=str(database)), 2, "/proc/self/no")
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


# -- surprises for a new user (in-process where no model is needed) ------------------------------

def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from app.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store_with_alice(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The CLI's SQLite file (MEMORY_SQLITE_PATH), migrated, with one memory of alice's, stored
    with the word-hash embedder (the commands under test embed nothing)."""
    from app.core.memory.drivers.sqlite_driver import SqliteDriver
    from tests.word_hash_embedder import WordHashEmbedder

    path = migrate_sqlite(Path(os.environ["MEMORY_SQLITE_PATH"]))
    driver = SqliteDriver(path=path, embedder=WordHashEmbedder())
    memory = driver.store("alice", "alice likes the harbor", tags=["home"])
    driver.close()
    yield path, memory["id"]


def test_a_read_never_creates_the_database(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    path = Path(os.environ["MEMORY_SQLITE_PATH"])
    for command in (["stats"], ["get", "mem_x"], ["list", "alice"]):
        code, _, err = cli(capsys, *command)
        assert code == 1 and str(path.resolve()) in err and "python migrate.py" in err, err
        assert not path.exists(), f"{command} created {path}"


def test_rollback_asks_when_the_tables_hold_data(store_with_alice: tuple[Path, str]):
    path, _ = store_with_alice
    asked = run("migrate.py", "rollback", "--database", "sqlite", "--path", str(path))
    assert asked.returncode == 1 and "nothing was rolled back" in asked.stderr, asked.stderr
    assert "memories" in tables_of(path)
    forced = run("migrate.py", "rollback", "--force", "--database", "sqlite", "--path",
                 str(path))
    assert forced.returncode == 0, forced.stderr
    assert "memories" not in tables_of(path)


def tables_of(path: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(path) as connection:
        return {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_forget_user_of_an_unknown_id_says_nothing_was_found(
        capsys: pytest.CaptureFixture[str], store_with_alice: tuple[Path, str]):
    code, out, err = cli(capsys, "forget-user", "ghost", "--yes")
    assert code == 1 and "no user ghost was found: nothing was erased" in err, (out, err)
    code, out, _ = cli(capsys, "forget-user", "alice", "--yes")
    assert code == 0 and out.strip() == "erased user alice and 1 memory"


def test_json_is_accepted_after_the_command_too(capsys: pytest.CaptureFixture[str],
                                                store_with_alice: tuple[Path, str]):
    for argv in (["stats", "--json"], ["--json", "stats"], ["users", "show", "alice", "--json"]):
        code, out, _ = cli(capsys, *argv)
        assert code == 0 and isinstance(json.loads(out), dict), argv


def test_list_and_update_commands(capsys: pytest.CaptureFixture[str],
                                  store_with_alice: tuple[Path, str]):
    _, memory_id = store_with_alice
    code, out, _ = cli(capsys, "list", "alice")
    assert code == 0 and memory_id in out and "harbor" in out
    code, out, _ = cli(capsys, "update", memory_id, "--user", "alice", "--importance", "0.9",
                       "--tag", "sea", "--json")
    assert code == 0 and json.loads(out)["importance"] == 0.9 and json.loads(out)["tags"] == [
        "sea"]
    code, _, err = cli(capsys, "update", memory_id, "--user", "bob", "--importance", "0.1")
    assert code == 1 and "no memory" in err
    code, out, _ = cli(capsys, "list", "alice", "--tag", "sea", "--json")
    assert [item["id"] for item in json.loads(out)["items"]] == [memory_id]


def test_plurals(capsys: pytest.CaptureFixture[str], store_with_alice: tuple[Path, str]):
    _, memory_id = store_with_alice
    assert cli(capsys, "delete", memory_id)[0] == 0
    code, out, _ = cli(capsys, "purge", "--retention-days", "0")
    assert code == 0 and out.strip() == "purged 1 memory"


def test_knowledge_add_on_a_terminal_says_what_it_waits_for(tmp_path: Path):
    import pty

    main_fd, terminal_fd = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "knowledge", "add", "--category", "docs"],
        cwd=PROJECT_ROOT, stdin=terminal_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ,
                        "MEMORY_SQLITE_PATH": str(migrate_sqlite(tmp_path / "k.sqlite3"))})
    os.close(terminal_fd)
    assert process.stderr is not None
    # The hint comes before the command waits for text; give it time to load the model first.
    ready, _, _ = select.select([process.stderr], [], [], 120)
    hint = process.stderr.readline() if ready else ""
    os.write(main_fd, b"\x04")  # Ctrl-D at the start of a line: end of input, nothing typed
    _, rest = process.communicate(timeout=180)
    os.close(main_fd)
    assert "Ctrl-D" in hint and "reading the document from the terminal" in hint, hint + rest
    assert process.returncode == 2 and "content" in rest, rest
