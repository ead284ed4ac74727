"""Bad input, fuzzed: every public verb of every driver, and the CLI, fed hypothesis-generated
arguments mixing plausible values with NUL bytes, huge strings, SQL and FTS metacharacters,
unicode, NaN and infinities, wrong types, other users' ids and deleted ids.

Only ``InvalidInputError`` (or success) may come out, never a raw backend exception, and a call
that raises must leave the store exactly as it was (same counts, same memories, same contents).
Drivers embed with ``WordHashEmbedder`` (ranking is not under test; see that module).
"""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.core.memory import InvalidInputError
from app.core.memory.base import BaseMemoryDriver
from app.core.memory.drivers.automem_driver import AutomemDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from tests.automem_double import AutomemDouble
from tests.conftest import PROJECT_ROOT, migrate_sqlite
from tests.word_hash_embedder import WordHashEmbedder

NASTY_TEXT = st.sampled_from([
    "", " ", "\x00", "a\x00b", "x" * 200_000, '" * - NEAR OR ( )', "'; DROP TABLE memories; --",
    "%s %(user_id)s {}", "\\", "\u202e\u0301\ufeff", "😀" * 50, "NEAR(a b)", "a:b", "*", "\n\t",
    "alice", "bob", "carol", "\udcff", "9999999999999999999", "²",
])


def nested(depth: int) -> dict[str, Any]:
    """``{"a": {"a": ...}}`` ``depth`` levels deep, built without recursion."""
    top: dict[str, Any] = {}
    inner = top
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return top


def nested_list(depth: int) -> list[Any]:
    """``[[[...[1]...]]]`` ``depth`` lists deep."""
    top: list[Any] = [1]
    for _ in range(depth - 1):
        top = [top]
    return top


DEEP = nested(1_200)  # deeper than json.dumps can recurse
NASTY = st.one_of(
    NASTY_TEXT, st.text(max_size=30), st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e308, 0.5]),
    st.binary(max_size=8), st.lists(NASTY_TEXT, max_size=3),
    st.dictionaries(st.text(max_size=5), NASTY_TEXT, max_size=2),
    st.just(timedelta(seconds=-5)), st.just(object()), st.just(DEEP),
    st.just({"list": nested_list(40)}),
)
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


#: A valid value for each of the ten argument slots the verbs below draw on ...
VALID = ("bob", "fuzz note", None, ["x"], {"k": "v"}, None, "default", None, 0.5, None)
#: ... and, per verb, the slots whose valid value differs (see ``verbs`` for what each slot is).
VALID_FOR = {
    "recall": {8: 5, 5: True, 4: None}, "get": {0: "alice", 1: "alice", 2: False},
    "update": {0: "alice", 1: "alice", 2: "changed"}, "delete": {0: "alice", 1: "alice"},
    "restore": {0: "bob", 1: "alice"}, "list_memories": {8: 10, 1: None},
    "recall_global_knowledge": {8: 3}, "set_profile": {2: False},
}


def fuzzed_arguments(verb: str) -> st.SearchStrategy[tuple[Any, ...]]:
    """Valid arguments with one slot made nasty (most often), or every slot nasty at once."""
    valid = list(VALID)
    for slot, value in VALID_FOR.get(verb, {}).items():
        valid[slot] = value

    def one_bad(slot: int, value: Any) -> tuple[Any, ...]:
        return tuple(value if i == slot else v for i, v in enumerate(valid))

    return st.one_of(st.builds(one_bad, st.integers(0, 9), NASTY),
                     st.builds(one_bad, st.integers(0, 9), NASTY),
                     st.tuples(*[NASTY] * 10))


def verbs(driver: BaseMemoryDriver, known: dict[str, str]) -> dict[str, Callable[..., Any]]:
    """Each verb, called with fuzzed values for every argument it takes."""
    def memory_id(value: Any) -> Any:  # sometimes aim at a real id: alice's, deleted, expired
        return known.get(value, value) if isinstance(value, str) else value

    return {
        "store": lambda a: driver.store(a[0], a[1], a[2], a[3], a[4], agent_id=a[5],
                                        namespace=a[6], key=a[7], importance=a[8], ttl=a[9]),
        "store_many": lambda a: driver.store_many([
            {"user_id": "bob", "content": "fine"},
            {"user_id": a[0], "content": a[1], "tags": a[3], "importance": a[8]}]),
        "recall": lambda a: driver.recall(a[0], a[2], a[1], a[8], a[5], a[3], agent_id=a[6],
                                          tags=a[4], min_importance=a[9]),
        "get": lambda a: driver.get(memory_id(a[0]), a[1], include_deleted=a[2]),
        "update": lambda a: driver.update(memory_id(a[0]), a[1], content=a[2], tags=a[3],
                                          metadata=a[4], importance=a[8], ttl=a[9]),
        "delete": lambda a: driver.delete(memory_id(a[0]), a[1]),
        "restore": lambda a: driver.restore(memory_id(a[0]), a[1]),
        "list_memories": lambda a: driver.list_memories(a[0], agent_id=a[5], tags=a[3],
                                                        limit=a[8], cursor=a[1]),
        "forget_user": lambda a: driver.forget_user(a[0]) if a[0] != "alice" else None,
        "purge": lambda a: driver.purge(retention=a[9]),
        "stats": lambda a: driver.stats(a[0]),
        "store_global_knowledge": lambda a: driver.store_global_knowledge(a[1], a[0], a[2],
                                                                          a[5], a[4]),
        "recall_global_knowledge": lambda a: driver.recall_global_knowledge(a[1], a[8], a[0]),
        "delete_knowledge": lambda a: driver.delete_knowledge(a[0]),
        "create_user": lambda a: driver.create_user(a[0], display_name=a[1], profile=a[4]),
        "get_user": lambda a: driver.get_user(a[0]),
        "get_profile": lambda a: driver.get_profile(a[0]),
        "set_profile": lambda a: driver.set_profile(a[0], a[4], merge=a[2]),
    }


def snapshot(driver: BaseMemoryDriver) -> Any:
    """What must not change when a call is refused."""
    memories = {user: sorted((m["id"], m["content"], tuple(m["tags"]), m["importance"])
                             for m in driver.list_memories(user, include_deleted=True)["items"])
                for user in ("alice", "bob")}
    return driver.stats(), memories, driver.get_profile("alice")


def settle(driver: BaseMemoryDriver) -> None:
    """Clear the expiry of memories about to expire: an earlier fuzzed call that happened to be
    valid may have set a TTL of a second, and a memory expiring during the next call would look
    like a change that call made."""
    soon = datetime.now(UTC) + timedelta(minutes=5)
    for user in ("alice", "bob"):
        for memory in driver.list_memories(user, include_deleted=True)["items"]:
            if memory["expires_at"] is not None and memory["expires_at"] < soon:
                deleted = memory["deleted_at"] is not None
                if deleted:
                    driver.restore(memory["id"])
                driver.update(memory["id"], clear_expiry=True)
                if deleted:
                    driver.delete(memory["id"])


class FuzzedVerbs:
    """Mixed into a class per driver that provides a ``driver`` fixture."""

    @pytest.fixture
    def seeded(self, driver: BaseMemoryDriver) -> tuple[BaseMemoryDriver, dict[str, str]]:
        kept = driver.store("alice", "alice keeps this about the harbor", tags=["home"])
        gone = driver.store("alice", "alice deleted this")
        driver.delete(gone["id"], "alice")
        expired = driver.store("alice", "alice's note that expired", ttl=0.05)
        driver.set_profile("alice", {"tone": "brief"})
        time.sleep(0.1)
        return driver, {"alice": kept["id"], "bob": gone["id"], "carol": expired["id"]}

    @pytest.mark.parametrize("verb", sorted(verbs(None, {})))  # type: ignore[arg-type]
    def test_only_invalid_input_errors_and_nothing_half_written(self, seeded, verb: str):
        driver, known = seeded
        call = verbs(driver, known)[verb]

        @FUZZ
        @given(arguments=fuzzed_arguments(verb))
        def attempt(arguments: tuple[Any, ...]) -> None:
            settle(driver)
            before = snapshot(driver)
            try:
                call(arguments)
            except InvalidInputError as error:
                assert str(error), "an error must say what was wrong"
                assert snapshot(driver) == before, f"{verb} raised but changed the store"

        attempt()


    @pytest.mark.parametrize("verb", ["store", "store_many", "update", "set_profile",
                                      "create_user", "store_global_knowledge"])
    def test_deeply_nested_metadata_is_refused_not_a_recursion_error(self, seeded, verb: str):
        driver, known = seeded
        calls = {
            "store": lambda: driver.store("alice", "deep", metadata=DEEP),
            "store_many": lambda: driver.store_many([{"user_id": "alice", "content": "deep",
                                                      "metadata": DEEP}]),
            "update": lambda: driver.update(known["alice"], "alice", metadata=DEEP),
            "set_profile": lambda: driver.set_profile("alice", DEEP),
            "create_user": lambda: driver.create_user("dora", profile=DEEP),
            "store_global_knowledge": lambda: driver.store_global_knowledge(
                "deep text", "deep", metadata=DEEP),
        }
        before = snapshot(driver)
        with pytest.raises(InvalidInputError, match="nested at most"):
            calls[verb]()
        assert snapshot(driver) == before


class TestSqliteFuzzed(FuzzedVerbs):
    @pytest.fixture
    def driver(self, tmp_path: Path) -> Iterator[SqliteDriver]:
        path = migrate_sqlite(tmp_path / "fuzz.sqlite3")
        driver = SqliteDriver(path=path, embedder=WordHashEmbedder())
        yield driver
        driver.close()


class TestPgvectorFuzzed(FuzzedVerbs):
    @pytest.fixture
    def driver(self, empty_pg: str) -> Iterator[PgvectorDriver]:
        driver = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder())
        yield driver
        driver.close()


class TestAutomemFuzzed(FuzzedVerbs):
    @pytest.fixture
    def driver(self) -> Iterator[AutomemDriver]:
        double = AutomemDouble(token="fuzz-token")
        driver = AutomemDriver(url=double.start(), token="fuzz-token", backoff_seconds=0.01)
        yield driver
        driver.close()
        double.stop()


CLI_TEXT = NASTY_TEXT.filter(lambda text: "\x00" not in text and "\udcff" not in text
                             and len(text) < 5000) | st.text(max_size=10).filter(
    lambda text: "\x00" not in text and not any("\ud800" <= c <= "\udfff" for c in text))
CLI_NUMBER = st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e309", "2", "0.5", "x", ""])
CLI_COMMANDS = {  # command -> the positional arguments it takes
    ("store",): 2, ("recall", "--keyword-only"): 2, ("get",): 1, ("delete",): 1,
    ("restore",): 1, ("users", "show"): 1,
}
CLI_OPTIONS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["--importance", "--ttl", "--top-k"]), CLI_NUMBER),
    st.tuples(st.sampled_from(["--agent", "--namespace", "--tag", "--metadata", "--key",
                               "--conversation", "--user"]), CLI_TEXT),
), max_size=3)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(CLI_COMMANDS)), data=st.data(), options=CLI_OPTIONS)
def test_cli_answers_bad_arguments_with_a_message_never_a_traceback(
        tmp_path: Path, command: tuple[str, ...], data: st.DataObject,
        options: list[tuple[str, str]]):
    path = tmp_path / "cli.sqlite3"
    if not path.exists():
        migrate_sqlite(path)
    positional = data.draw(st.lists(CLI_TEXT, min_size=CLI_COMMANDS[command],
                                    max_size=CLI_COMMANDS[command]))
    flags = [part for option in options for part in option]
    done = subprocess.run(
        [sys.executable, "-m", "app", *command, *flags, "--", *positional],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, MEMORY_SQLITE_PATH=str(path), MEMORY_DRIVER="sqlite"),
    )
    assert done.returncode in (0, 1, 2), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode == 2:
        assert done.stderr.strip(), "a refusal must say why"


VALID_DUMPED_MEMORY = {
    "type": "memory", "id": "mem_1", "user_id": "alice", "agent_id": None,
    "conversation_id": None, "namespace": "default", "key": None, "content": "a note",
    "tags": [], "metadata": {}, "importance": 0.5, "access_count": 0, "last_accessed_at": None,
    "expires_at": None, "deleted_at": None, "created_at": "2026-01-01T00:00:00+00:00",
    "updated_at": "2026-01-01T00:00:00+00:00", "embedding": None,
}
DUMPED_NASTY = st.one_of(NASTY, st.sampled_from([
    10**30, -(10**30), 2**31, 2**63, "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00", "2026-02-30T00:00:00+00:00",
    "AAAA", "////" * 400, "AACAfw==" * 384, nested_list(1_200),
]))


SCALED_VECTOR = base64.b64encode(np.array([1e30], dtype="<f4").tobytes()).decode("ascii")


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(VALID_DUMPED_MEMORY)), value=DUMPED_NASTY,
       dimension=st.sampled_from([None, 1, 384]))
@example(field="access_count", value=10**30, dimension=None)
@example(field="created_at", value="0001-01-01T00:00:00+14:00", dimension=None)
@example(field="embedding", value=SCALED_VECTOR, dimension=1)
@example(field="id", value=nested_list(1_200), dimension=None)
def test_dumped_records_are_checked_or_refused_never_crash(field: str, value: Any,
                                                           dimension: int | None):
    from app.core.memory.portable import parse_record

    try:
        record = parse_record({**VALID_DUMPED_MEMORY, field: value}, dimension)
    except InvalidInputError as error:
        assert str(error)
        return
    vector = record["embedding"]  # type: ignore[typeddict-item]
    if vector is not None:
        assert len(vector) == dimension and abs(float(np.linalg.norm(vector)) - 1) < 1e-3
    assert 0 <= record["access_count"] < 2**31  # type: ignore[typeddict-item]


@pytest.mark.parametrize("cursor", ["9999999999999999999", "²", "١٢", "-1", "1e3", " 1", "",
                                    "MTIz", "x" * 600])
def test_a_cursor_that_was_never_issued_is_invalid_input(cursor: str):
    from app.core.memory.cursors import decode_cursor, listing_scope
    from app.core.memory.validation import prepare_filters

    with pytest.raises(InvalidInputError, match="cursor"):
        decode_cursor(cursor, listing_scope(prepare_filters("alice"), include_deleted=False))
