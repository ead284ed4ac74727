"""``RecallTimeAndContextContract``: recall's time window, context neighbours, repeatability and
one user's ranking from one user's data (issue 17), for every driver.

A driver's contract class inherits it beside ``MemoryDriverContract`` (same ``driver`` fixture).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.core.memory import BaseMemoryDriver, InvalidInputError

MAY = datetime(2023, 5, 10, 12, tzinfo=UTC)
JUNE = datetime(2023, 6, 10, 12, tzinfo=UTC)
JULY = datetime(2023, 7, 10, 12, tzinfo=UTC)

#: Words user A's memories and queries use; other users' memories draw on the same words.
WORDS = ["zebra", "garden", "piano", "tomato", "budget", "hiking", "lesson", "report", "paris",
         "sister", "birthday", "guitar"]


def _ranked(memories: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(memory["id"], memory["score"]) for memory in memories]


class RecallTimeAndContextContract:
    # -- start, end ------------------------------------------------------------------------------

    def test_start_and_end_keep_only_what_occurred_between_them(
            self, driver: BaseMemoryDriver) -> None:
        made = {when: driver.store("alice", f"went hiking with my sister ({when:%B})",
                                   occurred_at=when) for when in (MAY, JUNE, JULY)}
        between = {"start": MAY + timedelta(days=1), "end": JULY - timedelta(days=1)}
        for query in ("hiking with my sister", None):
            found = driver.recall("alice", query=query, **between)
            assert [memory["id"] for memory in found] == [made[JUNE]["id"]], query
        # Both ends are included.
        found = driver.recall("alice", query="hiking", start=JUNE, end=JUNE)
        assert [memory["id"] for memory in found] == [made[JUNE]["id"]]
        assert {m["id"] for m in driver.recall("alice", query="hiking", start=JUNE)} == {
            made[JUNE]["id"], made[JULY]["id"]}

    def test_without_a_query_what_occurred_last_comes_first(
            self, driver: BaseMemoryDriver) -> None:
        july = driver.store("alice", "told in July", occurred_at=JULY)
        may = driver.store("alice", "told in May, stored last", occurred_at=MAY)
        june = driver.store("alice", "told in June", occurred_at=JUNE)
        assert [m["id"] for m in driver.recall("alice")] == [july["id"], june["id"], may["id"]]

    def test_bad_time_arguments_are_refused_by_name(self, driver: BaseMemoryDriver) -> None:
        with pytest.raises(InvalidInputError, match="start must not be after end"):
            driver.recall("alice", query="x", start=JULY, end=MAY)
        with pytest.raises(InvalidInputError, match="end must be timezone-aware"):
            driver.recall("alice", query="x", end=datetime(2023, 5, 1))
        with pytest.raises(InvalidInputError, match="reference_time must be a datetime"):
            driver.recall("alice", query="x", reference_time="yesterday")
        for bad in (-1, 21, True, 1.5):
            with pytest.raises(InvalidInputError, match="context must be"):
                driver.recall("alice", query="x", context=bad)

    # -- a time named in the query ---------------------------------------------------------------

    def test_a_query_naming_a_time_lifts_what_occurred_then(
            self, driver: BaseMemoryDriver) -> None:
        may = driver.store("alice", "We painted the garden fence", occurred_at=MAY)
        july = driver.store("alice", "We painted the garden fence", occurred_at=JULY)
        for query, first in (("painted the garden fence in May 2023", may),
                             ("what did we paint in July 2023", july),
                             ("painted the fence on 10 July, 2023", july)):
            found = driver.recall("alice", query=query, top_k=2)
            assert found[0]["id"] == first["id"], query
            assert found[0]["score"] > found[1]["score"], query
        # Relative phrases are read from reference_time.
        found = driver.recall("alice", query="garden fence last month", top_k=2,
                              reference_time=JUNE + timedelta(days=3))
        assert found[0]["id"] == may["id"]
        # A boost, not a filter: a query naming another time still finds both.
        assert len(driver.recall("alice", query="garden fence in 2019", top_k=5)) == 2

    # -- context ---------------------------------------------------------------------------------

    def test_context_brings_the_visible_neighbours_of_the_same_conversation(
            self, driver: BaseMemoryDriver) -> None:
        start = datetime(2024, 3, 1, 9, tzinfo=UTC)
        turns = driver.store_many([
            {"user_id": "alice", "conversation_id": "trip", "content": text,
             "occurred_at": start + timedelta(minutes=i)}
            for i, text in enumerate(["We should plan the trip", "Where to?",
                                      "Paris, to see the tower", "Book the train tonight",
                                      "Which hotel?", "The one by the river"])])
        driver.store("alice", "Paris tower tickets are sold out", conversation_id="other",
                     occurred_at=start + timedelta(minutes=2, seconds=30))
        driver.store("bob", "Bob's own message in a conversation of the same name",
                     conversation_id="trip", occurred_at=start + timedelta(minutes=2, seconds=10))
        driver.delete(turns[1]["id"], "alice")
        expired = driver.store("alice", "a note that has expired", conversation_id="trip",
                               occurred_at=start + timedelta(minutes=3, seconds=30),
                               expires_at=datetime.now(UTC) - timedelta(seconds=1))
        assert driver.get(expired["id"]) is None

        found = driver.recall("alice", query="Paris, to see the tower", top_k=1, context=2,
                              conversation_id="trip")
        assert found[0]["id"] == turns[2]["id"]
        assert [m["id"] for m in found[0]["context"]] == [
            turns[0]["id"], turns[3]["id"], turns[4]["id"]]
        assert all(m["user_id"] == "alice" and m["conversation_id"] == "trip"
                   for m in found[0]["context"])

        plain = driver.recall("alice", query="Paris, to see the tower", top_k=1,
                              conversation_id="trip")
        assert "context" not in plain[0]
        alone = driver.store("alice", "A thought outside any conversation about Paris")
        hits = driver.recall("alice", query="thought outside any conversation", top_k=1,
                             context=3)
        assert hits[0]["id"] == alone["id"] and hits[0]["context"] == []

    # -- repeatability and one user's own statistics ---------------------------------------------

    def test_the_same_query_on_the_same_data_gives_the_same_list(
            self, driver: BaseMemoryDriver) -> None:
        # One batch: the rows share their timestamps, so equal scores need the id to part them.
        driver.store_many([{"user_id": "alice", "content": f"{WORDS[i % 12]} {WORDS[(i * 5) % 12]}"}
                           for i in range(40)])
        for query in ("zebra garden", "piano lesson", "budget"):
            for use_vector in (True, False):
                first = driver.recall("alice", query=query, top_k=15, use_vector=use_vector)
                again = driver.recall("alice", query=query, top_k=15, use_vector=use_vector)
                assert _ranked(first) == _ranked(again), (query, use_vector)
                scores = [memory["score"] for memory in first]
                assert scores == sorted(scores, reverse=True)

    # One test method, run by each driver's class (a different executor each): intended.
    @settings(max_examples=4, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.differing_executors])
    @given(others=st.lists(st.tuples(st.sampled_from(["bob", "carol"]),
                                     st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
                                     st.sampled_from(["keep", "update", "delete"])),
                           min_size=5, max_size=40))
    def test_other_users_memories_never_change_a_users_recall(
            self, driver: BaseMemoryDriver,
            others: list[tuple[str, list[str], str]]) -> None:
        if not driver.list_memories("alice", limit=1)["items"]:
            driver.store_many([{"user_id": "alice",
                                "content": f"{WORDS[i]} and {WORDS[(i + 3) % 12]} notes"}
                               for i in range(12)])
        queries = ["zebra notes", "piano garden", "tomato budget report"]
        before = {(q, v): _ranked(driver.recall("alice", query=q, top_k=8, use_vector=v))
                  for q in queries for v in (True, False)}
        for user, words, fate in others:
            memory = driver.store(user, " ".join(words * 3))
            if fate == "update":
                driver.update(memory["id"], user, content=" ".join(reversed(words)))
            elif fate == "delete":
                driver.delete(memory["id"], user)
        after = {(q, v): _ranked(driver.recall("alice", query=q, top_k=8, use_vector=v))
                 for q in queries for v in (True, False)}
        assert after == before
