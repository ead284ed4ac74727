"""The command line, in-process (``app.cli.main``, sharing the loaded model) and, for start-up
and exit status, as the real ``python -m app`` process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import DEMO_USER, main
from tests.conftest import PROJECT_ROOT, migrate_sqlite


@pytest.fixture
def database(embedder) -> Path:
    """The file the CLI's default driver uses (from MEMORY_SQLITE_PATH), migrated."""
    return migrate_sqlite(Path(os.environ["MEMORY_SQLITE_PATH"]))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_store_recall_get_delete_restore(database: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run(capsys, "--json", "store", "alice", "Prefers dark mode", "--tag", "ui",
                       "--conversation", "c1", "--metadata", '{"source": "cli"}')
    assert code == 0
    stored = json.loads(out)
    assert stored["tags"] == ["ui"] and stored["metadata"] == {"source": "cli"}
    run(capsys, "store", "alice", "Cycles to work")
    code, out, _ = run(capsys, "--json", "recall", "alice", "user interface theme", "--top-k", "1")
    assert code == 0
    assert [m["id"] for m in json.loads(out)] == [stored["id"]]
    code, out, _ = run(capsys, "recall", "alice", "dark", "--keyword-only")
    assert stored["id"] in out and "Cycles" not in out
    assert run(capsys, "get", stored["id"], "--user", "bob")[0] == 1
    assert run(capsys, "delete", stored["id"], "--user", "alice")[0] == 0
    assert run(capsys, "get", stored["id"])[0] == 1
    assert run(capsys, "restore", stored["id"])[0] == 0
    code, out, _ = run(capsys, "get", stored["id"])
    assert code == 0 and "Prefers dark mode" in out


def test_knowledge_from_stdin_and_file(database: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Refunds are paid within 14 days."))
    code, out, _ = run(capsys, "knowledge", "add", "--category", "policies", "--doc-id", "refunds")
    assert code == 0 and "refunds" in out
    document = tmp_path / "parking.txt"
    document.write_text("Visitors park for free on level two.", encoding="utf-8")
    assert run(capsys, "knowledge", "add", str(document), "--category", "facilities")[0] == 0
    code, out, _ = run(capsys, "--json", "knowledge", "search", "when is my money returned?",
                       "--top-k", "1")
    assert code == 0 and json.loads(out)[0]["doc_id"] == "refunds"
    assert run(capsys, "knowledge", "delete", "refunds")[0] == 0
    assert run(capsys, "knowledge", "delete", "refunds")[0] == 1
    code, _, err = run(capsys, "knowledge", "add", str(tmp_path / "missing.txt"),
                       "--category", "x")
    assert code == 2 and "file" in err


def test_bad_input_exits_2_and_names_the_argument(database: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    code, _, err = run(capsys, "store", "not a valid id", "x")
    assert code == 2 and "user_id" in err
    code, _, err = run(capsys, "recall", "alice", "--top-k", "0")
    assert code == 2 and "top_k" in err


def test_users_stats_and_demo(database: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run(capsys, "--json", "users", "create", "--name", "Ada")
    user_id = json.loads(out)["user_id"]
    assert code == 0 and user_id.startswith("user_")
    code, out, _ = run(capsys, "--json", "users", "show", user_id)
    assert code == 0 and json.loads(out)["display_name"] == "Ada"
    assert run(capsys, "users", "show", "nobody")[0] == 1
    for _ in range(2):  # the demo upserts by key: running it twice adds nothing
        code, out, _ = run(capsys, "demo")
        assert code == 0
    assert "Is vegetarian and allergic to peanuts" in out
    code, out, _ = run(capsys, "--json", "stats", "--user", DEMO_USER)
    assert json.loads(out)["memories"]["visible"] == 6


def test_python_m_app_health_as_a_process(database: Path):
    result = subprocess.run([sys.executable, "-m", "app", "--json", "health"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok"


def test_unmigrated_database_fails_with_the_fix(capsys: pytest.CaptureFixture[str]):
    code, _, err = run(capsys, "recall", "alice")
    assert code == 1
    assert "python migrate.py" in err


def test_occurred_at_on_store_and_update(database: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run(capsys, "--json", "store", "alice", "Moved to Lisbon",
                       "--occurred-at", "2023-05-01T09:00:00+01:00")
    assert code == 0
    stored = json.loads(out)
    assert stored["occurred_at"] == "2023-05-01T08:00:00+00:00"
    code, out, _ = run(capsys, "--json", "update", stored["id"], "--occurred-at",
                       "2023-06-01T00:00:00Z")
    assert code == 0 and json.loads(out)["occurred_at"] == "2023-06-01T00:00:00+00:00"
    for bad, rule in (("last May", "--occurred-at must be an ISO 8601 time"),
                      ("2023-05-01T09:00:00", "--occurred-at must be an ISO 8601 time"),
                      ("0001-01-01T00:00:00Z", "occurred_at must be a timezone-aware")):
        code, out, err = run(capsys, "store", "alice", "never stored", "--occurred-at", bad)
        assert code == 2 and out == "" and err.count("\n") == 1 and rule in err, err
        assert run(capsys, "update", stored["id"], "--occurred-at", bad)[0] == 2
    code, out, _ = run(capsys, "--json", "list", "alice")
    assert [m["occurred_at"] for m in json.loads(out)["items"]] == ["2023-06-01T00:00:00+00:00"]


def test_recall_with_a_time_window_and_context(database: Path,
                                               capsys: pytest.CaptureFixture[str]):
    for minute, text in enumerate(["Where shall we go?", "Lisbon, in the spring",
                                   "Book the flights then"]):
        run(capsys, "store", "alice", text, "--conversation", "trip",
            "--occurred-at", f"2024-03-01T09:0{minute}:00Z")
    run(capsys, "store", "alice", "Lisbon again, later", "--occurred-at", "2024-09-01T09:00:00Z")
    code, out, _ = run(capsys, "--json", "recall", "alice", "Lisbon", "--keyword-only",
                       "--start", "2024-01-01T00:00:00Z", "--end", "2024-06-30T00:00:00Z",
                       "--context", "1")
    assert code == 0
    [hit] = json.loads(out)
    assert hit["content"] == "Lisbon, in the spring"
    assert [m["content"] for m in hit["context"]] == ["Where shall we go?",
                                                      "Book the flights then"]
    code, out, _ = run(capsys, "recall", "alice", "Lisbon", "--keyword-only", "--context", "1")
    assert code == 0 and "| Where shall we go?" in out
    code, _, err = run(capsys, "recall", "alice", "x", "--start", "yesterday")
    assert code == 2 and "--start must be an ISO 8601 time" in err
    code, _, err = run(capsys, "recall", "alice", "x", "--context", "99")
    assert code == 2 and "context must be a whole number from 0 to 20" in err
