"""schemathesis against the live ``/openapi.json``: every operation, a few hundred generated
requests (valid and invalid), no 5xx, and every answer matches the documented schema."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.keys.sqlite_key_store import SqliteKeyStore
from app.core.memory.aio import AsyncMemoryDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from tests.conftest import migrate_sqlite
from tests.service.conftest import Service, _serve_in_thread

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


@pytest.fixture
def fresh_service(tmp_path: Path, embedder: SentenceTransformerEmbedder) -> Iterator[Service]:
    """A server of this test's own: generated requests erase users and revoke keys."""
    from app.core.memory.drivers.sqlite_driver import SqliteDriver

    path = migrate_sqlite(tmp_path / "fuzzed.sqlite3")
    driver = AsyncMemoryDriver(SqliteDriver(path=path, embedder=embedder))
    yield from _serve_in_thread("sqlite", driver, SqliteKeyStore(path))


@pytest.mark.parametrize("who", ["admin"])
def test_generated_requests(fresh_service: Service, who: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{fresh_service.url}/openapi.json",
         "--header", f"Authorization: Bearer {fresh_service.keys[who]}",
         "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
         "--max-examples", "8", "--seed", "12", "--workers", "2", "--no-color",
         "--generation-database", "none",
         "--generation-with-security-parameters", "false", "--report", "json",
         "--report-json-path", str(report), "--request-timeout", "60"],
        capture_output=True, text=True, timeout=400, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    # Every operation was exercised, with a few hundred requests in all.
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert selected and tested and cases, output[-3000:]
    assert selected.group(1) == selected.group(2) == tested.group(1), output[-3000:]
    assert int(tested.group(1)) >= 20  # every route of the API (the test above lists them)
    assert int(cases.group(1)) >= 300 and cases.group(1) == cases.group(2), output[-3000:]
