"""Tenancy, property-based: random sequences of every verb by several users and agents, on every
driver, checked after each step against a model of what each user should see.

Hypothesis drives a state machine: store, store_many, recall (vector and keyword), get, update,
delete, restore, list, stats and forget_user, each by a random user and often aimed at another
user's memory. After every step, no verb may have returned, changed or revealed another user's
data, and each user's ``list_memories`` must equal the model's set exactly.

Ranking is not under test here, so SQLite and PGVector embed with ``WordHashEmbedder`` (a
deterministic bag-of-words hash, a test double standing in for the model only to keep hundreds of
steps fast); everything else is real: a SQLite file, PostgreSQL with pgvector, the AutoMem double
over HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.core.memory.base import BaseMemoryDriver
from app.core.memory.drivers.automem_driver import AutomemDriver
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from tests.automem_double import AutomemDouble
from tests.conftest import migrate_sqlite
from tests.word_hash_embedder import WordHashEmbedder

USERS = ["alice", "bob", "carol"]
AGENTS = [None, "planner", "coder"]
WORDS = ["apple", "river", "violin", "quartz", "harbor", "tulip", "falcon", "copper"]
STEPS = 30
EXAMPLES = 30


@dataclass
class Expected:
    """What the model believes about one memory."""

    user: str
    agent: str | None
    content: str
    deleted: bool = False
    tags: list[str] = field(default_factory=list)


class TenancyMachine(RuleBasedStateMachine):
    """Subclassed per driver with ``make_driver`` set; see the module docstring."""

    make_driver: Callable[[], BaseMemoryDriver]

    def __init__(self) -> None:
        super().__init__()
        self.driver = type(self).make_driver()
        self.memories: dict[str, Expected] = {}

    def teardown(self) -> None:
        self.driver.close()

    # -- helpers -------------------------------------------------------------------------------

    def owned_by(self, user: str, *, deleted: bool | None = False) -> set[str]:
        return {memory_id for memory_id, m in self.memories.items()
                if m.user == user and (deleted is None or m.deleted == deleted)}

    def check_owned(self, records: list[dict], user: str) -> None:
        for record in records:
            assert record["user_id"] == user, f"{user} was shown {record['user_id']}'s memory"
            assert record["id"] in self.owned_by(user), f"{user} was shown an unknown memory"

    # -- rules ---------------------------------------------------------------------------------

    @initialize()
    def start_empty(self) -> None:
        for user in USERS:
            self.driver.forget_user(user)

    @rule(user=st.sampled_from(USERS), agent=st.sampled_from(AGENTS),
          words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3),
          tag=st.sampled_from(["", "work", "home"]))
    def store(self, user: str, agent: str | None, words: list[str], tag: str) -> None:
        content = f"{user} noted {' '.join(words)}"
        tags = [tag] if tag else []
        memory = self.driver.store(user, content, agent_id=agent, tags=tags)
        assert memory["user_id"] == user and memory["content"] == content
        self.memories[memory["id"]] = Expected(user, agent, content, tags=tags)

    @rule(items=st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(WORDS)),
                         min_size=1, max_size=4))
    def store_many(self, items: list[tuple[str, str]]) -> None:
        stored = self.driver.store_many([{"user_id": user, "content": f"{user} batch {word}"}
                                         for user, word in items])
        assert [m["user_id"] for m in stored] == [user for user, _ in items]
        for memory, (user, word) in zip(stored, items, strict=True):
            self.memories[memory["id"]] = Expected(user, None, f"{user} batch {word}")

    @rule(user=st.sampled_from(USERS), word=st.sampled_from(WORDS), use_vector=st.booleans(),
          agent=st.sampled_from(AGENTS))
    def recall(self, user: str, word: str, use_vector: bool, agent: str | None) -> None:
        found = self.driver.recall(user, query=word, top_k=50, use_vector=use_vector,
                                   agent_id=agent)
        self.check_owned(found, user)
        for memory in found:
            expected = self.memories[memory["id"]]
            assert not expected.deleted, "recall returned a deleted memory"
            assert agent is None or expected.agent == agent

    @rule(data=st.data(), asker=st.sampled_from(USERS))
    @precondition(lambda self: bool(self.memories))
    def get(self, data: st.DataObject, asker: str) -> None:
        memory_id = data.draw(st.sampled_from(sorted(self.memories)))
        expected = self.memories[memory_id]
        found = self.driver.get(memory_id, asker)
        if expected.user != asker or expected.deleted:
            assert found is None, f"{asker} could read {expected.user}'s memory"
        else:
            assert found is not None and found["content"] == expected.content

    @rule(data=st.data(), asker=st.sampled_from(USERS), word=st.sampled_from(WORDS))
    @precondition(lambda self: bool(self.memories))
    def update(self, data: st.DataObject, asker: str, word: str) -> None:
        memory_id = data.draw(st.sampled_from(sorted(self.memories)))
        expected = self.memories[memory_id]
        content = f"{asker} changed it to {word}"
        changed = self.driver.update(memory_id, asker, content=content)
        if expected.user != asker or expected.deleted:
            assert changed is None, f"{asker} could change {expected.user}'s memory"
        else:
            assert changed is not None and changed["content"] == content
            expected.content = content

    @rule(data=st.data(), asker=st.sampled_from(USERS))
    @precondition(lambda self: bool(self.memories))
    def delete(self, data: st.DataObject, asker: str) -> None:
        memory_id = data.draw(st.sampled_from(sorted(self.memories)))
        expected = self.memories[memory_id]
        allowed = expected.user == asker and not expected.deleted
        assert self.driver.delete(memory_id, asker) is allowed
        expected.deleted = expected.deleted or allowed

    @rule(data=st.data(), asker=st.sampled_from(USERS))
    @precondition(lambda self: bool(self.memories))
    def restore(self, data: st.DataObject, asker: str) -> None:
        memory_id = data.draw(st.sampled_from(sorted(self.memories)))
        expected = self.memories[memory_id]
        allowed = expected.user == asker and expected.deleted
        assert self.driver.restore(memory_id, asker) is allowed
        expected.deleted = expected.deleted and not allowed

    @rule(user=st.sampled_from(USERS))
    def forget_user(self, user: str) -> None:
        erased = self.driver.forget_user(user)
        assert erased == len(self.owned_by(user, deleted=None))
        for memory_id in self.owned_by(user, deleted=None):
            del self.memories[memory_id]

    # -- after every step ----------------------------------------------------------------------

    @invariant()
    def each_user_sees_exactly_their_own(self) -> None:
        for user in USERS:
            page = self.driver.list_memories(user, limit=500)
            self.check_owned(page["items"], user)
            assert {m["id"] for m in page["items"]} == self.owned_by(user)
            for memory in page["items"]:
                assert memory["content"] == self.memories[memory["id"]].content

    @invariant()
    def stats_count_only_their_own(self) -> None:
        for user in USERS:
            counts = self.driver.stats(user)["memories"]
            assert counts["visible"] == len(self.owned_by(user))


RUN = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def run_machine(make: Callable[[], BaseMemoryDriver]) -> None:
    machine = type("Machine", (TenancyMachine,), {"make_driver": staticmethod(make)})
    run_state_machine_as_test(machine, settings=RUN)


def test_sqlite_tenancy(tmp_path):
    path = migrate_sqlite(tmp_path / "tenancy.sqlite3")
    run_machine(lambda: SqliteDriver(path=path, embedder=WordHashEmbedder()))


def test_pgvector_tenancy(empty_pg):
    run_machine(lambda: PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder()))


@pytest.fixture
def automem_url() -> Iterator[str]:
    double = AutomemDouble(token="tenancy-token")
    yield double.start()
    double.stop()


def test_automem_tenancy(automem_url):
    run_machine(lambda: AutomemDriver(url=automem_url, token="tenancy-token",
                                      backoff_seconds=0.01))
