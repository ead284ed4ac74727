"""The pgvector driver's access counts: counted by recall, written off its path, in batches, and
always read exactly by this process (``pgvector_access``), on a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from app.core.memory.drivers.pgvector_access import AccessCounts
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from tests.threads import run_together
from tests.word_hash_embedder import WordHashEmbedder


def _stored_count(url: str, memory_id: str) -> int:
    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT access_count FROM memories WHERE id = %s",
                                 (memory_id,)).fetchone()
    assert row is not None
    return int(row[0])


def _driver(url: str, flush_seconds: float, **options: object) -> PgvectorDriver:
    return PgvectorDriver(url=url, embedder=WordHashEmbedder(),
                          access_flush_seconds=flush_seconds, **options)  # type: ignore[arg-type]


def test_recalls_are_written_in_the_background_one_statement_for_many(empty_pg: str):
    driver = _driver(empty_pg, 0.2)
    try:
        memory = driver.store("u", "the quick brown fox")
        counts = [driver.recall("u", query="quick fox")[0]["access_count"] for _ in range(5)]
        assert counts == [1, 2, 3, 4, 5]  # each record shows its own access, none written yet
        deadline = time.monotonic() + 10
        while _stored_count(empty_pg, memory["id"]) != 5:  # another process's view
            assert time.monotonic() < deadline, "the access counts were never written"
            time.sleep(0.05)
    finally:
        driver.close()


def test_every_other_verb_reads_the_counts_this_process_has_not_written_yet(empty_pg: str):
    driver = _driver(empty_pg, 3600)  # the thread would not write them within the test
    try:
        memory = driver.store("u", "the quick brown fox")
        driver.recall("u", query="quick fox")
        driver.recall("u", query="quick fox")
        assert _stored_count(empty_pg, memory["id"]) == 0
        got = driver.get(memory["id"])
        assert got is not None and got["access_count"] == 2
        assert got["last_accessed_at"] is not None
        listed = driver.list_memories("u")["items"]
        assert [item["access_count"] for item in listed] == [2]
    finally:
        driver.close()


def test_close_writes_what_is_pending(empty_pg: str):
    driver = _driver(empty_pg, 3600)
    memory = driver.store("u", "the quick brown fox")
    driver.recall("u", query="quick fox")
    assert _stored_count(empty_pg, memory["id"]) == 0
    driver.close()
    assert _stored_count(empty_pg, memory["id"]) == 1


def test_concurrent_recalls_each_see_a_count_of_their_own_while_writes_go_on(empty_pg: str):
    """Four threads recall one memory while the thread writes every 10 ms: the counts the
    records show are exactly 1..N, each once (none lost or seen twice around a write), and N
    is what the database holds in the end."""
    driver = _driver(empty_pg, 0.01, pool_max_size=5)
    memory = driver.store("u", "the quick brown fox")
    seen: list[int] = []

    def recall_many() -> None:
        for _ in range(30):
            seen.append(driver.recall("u", query="quick fox")[0]["access_count"])

    try:
        errors = run_together([recall_many] * 4)
    finally:
        driver.close()
    assert errors == []
    assert sorted(seen) == list(range(1, 121))
    assert _stored_count(empty_pg, memory["id"]) == 120


def test_counts_that_could_not_be_written_are_kept_for_the_next_write():
    """A write that fails (the database unreachable) puts its counts back, merged with those
    counted meanwhile (the failure is raised by a stand-in writer: an outage in the middle of
    the one statement cannot be caused on demand)."""
    counts = AccessCounts(flush_seconds=3600)
    early, late = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    with counts.reading():
        counts.record([1, 2], early)

    def unreachable(pending: object) -> None:
        raise ConnectionError("the database is down")

    with pytest.raises(ConnectionError):
        counts.write_pending(unreachable)
    with counts.reading():
        assert counts.record([2], late) == {2: 1}
    written: list[dict[int, tuple[int, datetime]]] = []
    counts.write_pending(written.append)
    assert written == [{1: (1, early), 2: (2, late)}]
    assert not counts.has_pending()



def test_interpreter_exit_writes_the_counts_of_a_driver_nobody_closed(empty_pg: str):
    """A script that recalls and ends without ``close()`` (a CLI call, say) still counts."""
    script = (
        "import sys\n"
        "from app.core.memory.drivers.pgvector_driver import PgvectorDriver\n"
        "from tests.word_hash_embedder import WordHashEmbedder\n"
        "driver = PgvectorDriver(url=sys.argv[1], embedder=WordHashEmbedder(),\n"
        "                        access_flush_seconds=3600)\n"
        "memory = driver.store('u', 'the quick brown fox')\n"
        "driver.recall('u', query='quick fox')\n"
        "print(memory['id'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, empty_pg], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert _stored_count(empty_pg, done.stdout.strip()) == 1
