"""Export, import and copy as a user runs them (``python -m app ...`` in a subprocess, the real
model, a real SQLite file and a real PostgreSQL), and the functions behind them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.memory import transfer
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from app.core.memory.errors import InvalidInputError, NotSupportedError
from tests.conftest import PROJECT_ROOT, migrate_sqlite
from tests.word_hash_embedder import WordHashEmbedder

TOPICS = {
    "food": ["Is vegetarian and allergic to peanuts", "Loves spicy Thai curry on Fridays",
             "Drinks oat milk flat whites every morning", "Cannot stand the taste of coriander"],
    "travel": ["Spent last summer hiking in the Dolomites", "Wants to see the northern lights",
               "Prefers window seats on long flights", "Is planning a rail trip across Japan"],
    "work": ["Is migrating the billing service to PostgreSQL", "Leads a team of five engineers",
             "Writes most services in Python", "Has on-call duty every third week"],
    "home": ["Lives in Lisbon near the river", "Keeps two cats called Miso and Tofu",
             "Grows tomatoes on the balcony", "Is renovating the kitchen this spring"],
}
#: When the keyed memory of ``fill`` was said (an explicit occurred_at that must travel).
SAID = datetime(2023, 5, 7, 14, 30, 15, 125_000, tzinfo=UTC)
QUERIES = ["any food allergies?", "what pets do they have?", "which database are they moving to?",
           "where did they go hiking?", "what do they drink in the morning?",
           "where do they live?", "how do they like to fly?"]


def cli(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=PROJECT_ROOT, text=True,
                          capture_output=True, timeout=300, input=stdin,
                          env={**os.environ, **env})


def fill(driver: Any) -> dict[str, Any]:
    """Two users' memories in every state, a user record, a knowledge document."""
    driver.create_user("alice", display_name="Alice", profile={"tz": "Europe/Lisbon"})
    stored = driver.store_many([
        {"user_id": user, "content": text, "tags": [topic], "agent_id": "planner",
         "importance": 0.3 + 0.1 * index}
        for user in ("alice", "bob") for topic, texts in TOPICS.items()
        for index, text in enumerate(texts)])
    keyed = driver.store("alice", "Prefers dark mode everywhere", key="theme",
                         conversation_id="c1", metadata={"source": "settings"},
                         occurred_at=SAID)
    driver.delete(stored[1]["id"])
    driver.store("bob", "A reminder that expires at once", expires_at=datetime.now(UTC)
                 + timedelta(milliseconds=1))
    driver.store_global_knowledge("The office opens at 8am. Badges are at the front desk. "
                                  * 60, "handbook", title="Office", doc_id="doc_office")
    driver.recall("alice", query="dark mode")  # access counts to carry over
    return {"keyed": keyed, "deleted": stored[1]}


def everything(driver: Any) -> list[dict[str, Any]]:
    """Every record with its vector as plain comparable data (importance to 6 places: PostgreSQL
    keeps it as a 4-byte float)."""
    records = []
    for record in driver.export_records(with_embeddings=True):
        line = json.loads(transfer.to_json_line(record))
        if "importance" in line:
            line["importance"] = round(line["importance"], 6)
        records.append(line)
    return sorted(records, key=lambda r: (r["type"], r.get("id") or r.get("doc_id")
                                          or r["user_id"]))


@pytest.fixture
def sqlite_env(sqlite_path: Path) -> dict[str, str]:
    return {"MEMORY_DRIVER": "sqlite", "MEMORY_SQLITE_PATH": str(sqlite_path)}


def test_export_from_sqlite_then_import_into_pgvector_recalls_the_same(
        sqlite_path: Path, empty_pg: str, embedder: SentenceTransformerEmbedder,
        tmp_path: Path, sqlite_env: dict[str, str]):
    source = SqliteDriver(path=sqlite_path, embedder=embedder)
    fill(source)
    dump = tmp_path / "dumps" / "memory.jsonl"
    exported = cli("export", "--output", str(dump), env=sqlite_env)
    assert exported.returncode == 0, exported.stderr
    assert "exported 1 user, 34 memories, 1 knowledge document" in exported.stdout

    pg_env = {"MEMORY_DRIVER": "pgvector", "DATABASE_URL": empty_pg}
    for _ in range(2):  # the second import changes nothing: records keep their ids
        imported = cli("import", str(dump), env=pg_env)
        assert imported.returncode == 0, imported.stderr
        assert "imported 1 user, 34 memories, 1 knowledge document" in imported.stdout
    target = PgvectorDriver(url=empty_pg, embedder=embedder)
    try:
        assert everything(target) == everything(source)
        keyed = [m for m in target.list_memories("alice")["items"] if m["key"] == "theme"]
        assert keyed[0]["occurred_at"] == SAID
        for query in QUERIES:
            for use_vector in (True, False):
                expected = source.recall("alice", query=query, top_k=5, use_vector=use_vector)
                found = target.recall("alice", query=query, top_k=5, use_vector=use_vector)
                assert [m["id"] for m in found] == [m["id"] for m in expected], query
        knowledge = target.recall_global_knowledge("when does the office open?", top_k=1)
        assert knowledge[0]["doc_id"] == "doc_office"
    finally:
        target.close()


def test_import_reports_bad_records_keeps_the_good_and_notices_a_cut(
        sqlite_path: Path, tmp_path: Path, embedder: SentenceTransformerEmbedder):
    source = SqliteDriver(path=sqlite_path, embedder=embedder)
    fill(source)
    out = io.StringIO()
    transfer.export_dump(source, out)
    lines = out.getvalue().splitlines()
    memory = json.loads(lines[2])
    lines[2] = lines[2].replace('"importance": ', '"importance": 7, "was": ')
    lines[3] = "{not json"
    stranger = {**memory, "user_id": "mallory"}  # an id that is alice's here: never taken over
    lines.insert(4, json.dumps(stranger))
    dump = tmp_path / "damaged.jsonl"
    dump.write_text("\n".join(lines[:-1]) + "\n")  # and the end line is gone
    target_path = migrate_sqlite(tmp_path / "target.sqlite3")
    env = {"MEMORY_DRIVER": "sqlite", "MEMORY_SQLITE_PATH": str(target_path)}
    SqliteDriver(path=target_path, embedder=embedder).import_records(
        [transfer.parse_record(memory, None)])

    imported = cli("import", str(dump), env=env)
    assert imported.returncode == 1
    assert "line 3: memory.importance must be a finite number between 0 and 1" in \
        imported.stderr
    assert "line 4: not a line of JSON" in imported.stderr
    assert f"line 5: memory.id '{memory['id']}' belongs to another user here" in imported.stderr
    assert "it was cut short" in imported.stderr
    target = SqliteDriver(path=target_path, embedder=embedder)
    counts = target.stats()["memories"]
    # The 34 memories, less the two lines lost (bad importance, not JSON); the first of those
    # was in the target already (it is why the stranger was refused).
    assert sum(counts.values()) == 34 - 2 + 1
    assert target.get(memory["id"])["user_id"] == "alice"


def test_import_refuses_a_file_that_is_not_a_dump_before_writing(
        sqlite_env: dict[str, str], tmp_path: Path, sqlite_path: Path):
    stray = tmp_path / "notes.jsonl"
    stray.write_text('{"hello": "world"}\n')
    refused = cli("import", str(stray), env=sqlite_env)
    assert refused.returncode == 2
    assert "first line must be the header of an agent-memory-export file" in refused.stderr
    newer = tmp_path / "newer.jsonl"
    newer.write_text(json.dumps({"format": "agent-memory-export", "version": 99}) + "\n")
    assert "a newer file needs a newer release" in cli("import", str(newer),
                                                       env=sqlite_env).stderr
    assert SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder()).stats()["users"] == 0


def test_copy_sqlite_to_pgvector_matches_counts_and_contents(
        sqlite_path: Path, empty_pg: str, embedder: SentenceTransformerEmbedder,
        sqlite_env: dict[str, str]):
    source = SqliteDriver(path=sqlite_path, embedder=embedder)
    fill(source)
    env = {**sqlite_env, "DATABASE_URL": empty_pg}
    copied = cli("copy", "--from", "sqlite", "--to", "pgvector", env=env)
    assert copied.returncode == 0, copied.stderr
    assert "copied from sqlite to pgvector: 1 user, 34 memories, 1 knowledge document" in \
        copied.stdout
    target = PgvectorDriver(url=empty_pg, embedder=embedder)
    try:
        assert everything(target) == everything(source)
        stats = (source.stats(), target.stats())
        assert stats[0]["memories"] == stats[1]["memories"]
        assert stats[0]["knowledge"] == stats[1]["knowledge"]
    finally:
        target.close()
    assert cli("copy", "--from", "sqlite", "--to", "sqlite", env=env).returncode == 2


def test_export_of_one_user_holds_only_that_user(sqlite_path: Path):
    driver = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    fill(driver)
    out = io.StringIO()
    counts = transfer.export_dump(driver, out, user_id="bob", with_embeddings=False)
    records = [json.loads(line) for line in out.getvalue().splitlines()[1:-1]]
    assert counts == {"memories": 17}
    assert {record["user_id"] for record in records} == {"bob"}
    assert all("embedding" not in record for record in records)


def test_import_without_vectors_embeds_with_the_target_model(sqlite_path: Path, tmp_path: Path):
    source = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    fill(source)
    out = io.StringIO()
    transfer.export_dump(source, out, with_embeddings=False)
    target = SqliteDriver(path=migrate_sqlite(tmp_path / "t.sqlite3"), embedder=WordHashEmbedder())
    report = transfer.import_dump(target, io.StringIO(out.getvalue()), batch_size=7)
    assert report.ok and report.written == {"users": 1, "memories": 34, "knowledge_documents": 1}
    assert everything(target) == everything(source)  # the same model makes the same vectors


def test_a_key_held_by_another_memory_is_reported_not_overwritten(sqlite_path: Path,
                                                                   tmp_path: Path):
    source = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    keyed = source.store("alice", "Prefers dark mode", key="theme")
    target = SqliteDriver(path=migrate_sqlite(tmp_path / "t.sqlite3"), embedder=WordHashEmbedder())
    mine = target.store("alice", "Prefers light mode", key="theme")
    refused = target.import_records(list(source.export_records(with_embeddings=True)),
                                    vectors_from=source.stats()["embedding"])
    assert refused == [(0, "memory.key 'theme' is held by another memory of user 'alice' "
                           "(same agent and namespace) here")]
    assert target.get(mine["id"])["content"] == "Prefers light mode"
    assert target.get(keyed["id"]) is None


def test_bad_arguments_and_unsupported_drivers_say_so():
    with pytest.raises(InvalidInputError, match="batch_size must be a whole number"):
        transfer.import_dump(None, [], batch_size=0)  # type: ignore[arg-type]
    from app.core.memory.drivers.automem_driver import AutomemDriver

    automem = AutomemDriver(url="http://127.0.0.1:9")
    with pytest.raises(NotSupportedError, match="cannot list its records"):
        automem.export_records()
    with pytest.raises(NotSupportedError, match="the service embeds on its side"):
        automem.reembed()


def test_vectors_round_trip_exactly():
    vector = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    vector /= np.linalg.norm(vector)  # a model's vectors have length 1; others are dropped
    line = transfer.to_json_line({"type": "x", "embedding": vector})
    decoded = json.loads(line)["embedding"]
    from app.core.memory.portable import _vector

    assert np.array_equal(_vector(decoded, 384, "embedding"), vector)
    with pytest.raises(InvalidInputError, match="base64 of 384 little-endian float32"):
        _vector(decoded[:-8], 384, "memory.embedding")


def test_vectors_of_another_model_are_replaced_by_the_targets_own(sqlite_path: Path,
                                                                   tmp_path: Path):
    class OtherModel(WordHashEmbedder):
        model_name = "word-hash-96"
        dimension = 96

    source = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    fill(source)
    out = io.StringIO()
    transfer.export_dump(source, out)  # with the source model's 384-d vectors
    target = SqliteDriver(path=migrate_sqlite(tmp_path / "t.sqlite3"), embedder=OtherModel())
    assert transfer.import_dump(target, io.StringIO(out.getvalue())).ok
    assert target.stats()["embedding"] == {"model": "word-hash-96", "dimension": 96}
    for record in target.export_records(with_embeddings=True):
        if record["type"] == "memory":
            assert np.allclose(record["embedding"],
                               OtherModel().embed_documents([record["content"]])[0])


def test_a_dump_without_occurred_at_imports_with_created_at(sqlite_path: Path, empty_pg: str):
    """Dumps written before issue 17 have no occurred_at: each memory gets its created_at (what
    the migration gave the memories already stored), and a bad value is refused by line."""
    source = SqliteDriver(path=sqlite_path, embedder=WordHashEmbedder())
    fill(source)
    out = io.StringIO()
    transfer.export_dump(source, out, with_embeddings=False)
    lines = out.getvalue().splitlines(keepends=True)
    old = [json.dumps({k: v for k, v in json.loads(line).items() if k != "occurred_at"}) + "\n"
           if '"type": "memory"' in line else line for line in lines]
    assert "occurred_at" not in "".join(old) and "occurred_at" in "".join(lines)
    first = next(i for i, line in enumerate(old) if '"type": "memory"' in line)
    bad = {**json.loads(old[first]), "id": "mem_bad_time", "key": None,
           "occurred_at": "2023-05-07T14:30:00"}
    old.insert(first, json.dumps(bad) + "\n")
    target = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder())
    try:
        report = transfer.import_dump(target, old)
        assert report.refused == [(f"line {first + 1}", report.refused[0][1])]
        assert "memory.occurred_at must be an ISO 8601 time with a UTC offset" in \
            report.refused[0][1]
        assert report.written["memories"] == 34
        memories = [m for user in ("alice", "bob")
                    for m in target.list_memories(user, include_deleted=True)["items"]]
        assert memories and all(m["occurred_at"] == m["created_at"] for m in memories)
    finally:
        target.close()
        source.close()
