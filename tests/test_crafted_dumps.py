"""A dump is input: crafted lines (JSON nested 200,000 deep, times that overflow UTC, an
access_count of 10**30, vectors scaled to outrank everything) are each refused or neutralised by
line number while the rest is imported, on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.core.memory import transfer
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from tests.conftest import migrate_sqlite
from tests.word_hash_embedder import WordHashEmbedder


@pytest.fixture(params=["sqlite", "pgvector"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[BaseMemoryDriver,
                                                                           BaseMemoryDriver]]:
    """A source SQLite driver and an empty target (SQLite or PostgreSQL), one embedder."""
    embedder = WordHashEmbedder()
    source = SqliteDriver(path=migrate_sqlite(tmp_path / "source.sqlite3"), embedder=embedder)
    if request.param == "sqlite":
        target: BaseMemoryDriver = SqliteDriver(
            path=migrate_sqlite(tmp_path / "target.sqlite3"), embedder=embedder)
    else:
        target = PgvectorDriver(url=request.getfixturevalue("empty_pg"), embedder=embedder)
    yield source, target
    source.close()
    target.close()


def crafted_dump(source: BaseMemoryDriver, kind: str) -> tuple[list[str], int | None]:
    """A real export with one crafted line put in; returns the lines and the crafted line's
    number (None when the crafted change is to a valid line: the vector scaled by 1e30)."""
    source.store("alice", "boats moored in the harbor at dawn", key="harbor")
    source.store("alice", "the weather in lisbon is mild", key="weather")
    out = io.StringIO()
    transfer.export_dump(source, out)
    lines = out.getvalue().splitlines(keepends=True)
    at = {json.loads(line).get("key"): index for index, line in enumerate(lines)
          if '"type": "memory"' in line}
    harbor = json.loads(lines[at["harbor"]])
    if kind == "vector":
        weather = json.loads(lines[at["weather"]])
        vector = np.frombuffer(base64.b64decode(weather["embedding"]), dtype="<f4") * 1e30
        weather["embedding"] = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        lines[at["weather"]] = json.dumps(weather) + "\n"
        return lines, None
    crafted = {
        "deep": "[" * 200_000 + "]" * 200_000,
        "overflow": json.dumps({**harbor, "id": "mem_overflow", "key": "o",
                                "created_at": "0001-01-01T00:00:00+14:00"}),
        "count": json.dumps({**harbor, "id": "mem_count", "key": "c", "access_count": 10**30}),
        "occurred": json.dumps({**harbor, "id": "mem_occurred", "key": "t",
                                "occurred_at": "0001-01-01T12:00:00+00:00"}),
    }[kind]
    lines.insert(1, crafted + "\n")
    return lines, 2


@pytest.mark.parametrize("kind", ["deep", "overflow", "count", "occurred", "vector"])
def test_a_crafted_line_is_refused_by_number_and_the_rest_imported(pair, kind: str):
    source, target = pair
    lines, number = crafted_dump(source, kind)
    report = transfer.import_dump(target, lines)
    if number is None:
        assert report.refused == []
    else:
        words = {"deep": "nested deeper", "overflow": "created_at", "count": "access_count",
                 "occurred": "occurred_at must be an ISO 8601 time with a UTC offset, from "
                             "0001-01-02 to 9999-12-30"}
        assert len(report.refused) == 1 and report.refused[0][0] == f"line {number}"
        assert words[kind] in report.refused[0][1]
    assert report.written["memories"] == 2 and report.complete
    found = target.recall("alice", query="boats in the harbor", top_k=2)
    assert [memory["key"] for memory in found] == ["harbor", "weather"]
    # A vector scaled by 1e30 is not taken as it is: every stored vector has length 1.
    out = io.StringIO()
    transfer.export_dump(target, out)
    for line in out.getvalue().splitlines():
        if '"type": "memory"' in line:
            stored = np.frombuffer(base64.b64decode(json.loads(line)["embedding"]), dtype="<f4")
            assert abs(float(np.linalg.norm(stored.astype(np.float64))) - 1) < 1e-3
