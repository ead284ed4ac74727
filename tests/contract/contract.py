"""``MemoryDriverContract``: the behaviour every driver must show, written once.

A driver's test class inherits this and supplies a ``driver`` fixture (a fresh, empty store per
test) and, where it needs one, ``capabilities``. Ranking tests use the real embedding model.
"""

from __future__ import annotations

import base64
import contextlib
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from app.core.memory import BackendUnavailableError, BaseMemoryDriver, InvalidInputError
from tests.long_memory import EARLY_QUERY, LATE_QUERY, LONG_MEMORY, UNRELATED

FTS_HOSTILE_QUERIES = ['"', '"unclosed', "*", "-", "NEAR", "OR", "AND NOT", "( )", "a:b", "^x",
                       "NEAR(a b, 2)", "'; DROP TABLE memories; --", "🙂 ünïcödé", "\\"]


def _ids(memories: list[dict[str, Any]]) -> list[str]:
    return [memory["id"] for memory in memories]


class MemoryDriverContract:
    """Inherit and provide a ``driver`` fixture yielding an empty, ready driver.

    ``ranks_by_meaning``: whether the ranking under test comes from the embedding model (true
    for drivers that rank on their own side). A driver whose service ranks (AutoMem, here its
    test double ranking by keywords) sets it false, and the tests that need meaning skip.
    """

    ranks_by_meaning = True

    def needs_meaning(self) -> None:
        if not self.ranks_by_meaning:
            pytest.skip("ranking by meaning is the service's job, not this driver's")

    # -- store and get --------------------------------------------------------------------------

    def test_store_returns_the_stored_record(self, driver: BaseMemoryDriver) -> None:
        memory = driver.store("alice", "Prefers dark mode", "c1", ["preference"],
                              {"source": "chat"}, agent_id="helper", importance=0.8)
        assert memory["id"]
        assert memory["user_id"] == "alice"
        assert memory["conversation_id"] == "c1"
        assert memory["agent_id"] == "helper"
        assert memory["namespace"] == "default"
        assert memory["key"] is None
        assert memory["content"] == "Prefers dark mode"
        assert memory["tags"] == ["preference"]
        assert memory["metadata"] == {"source": "chat"}
        assert memory["importance"] == pytest.approx(0.8)
        assert memory["access_count"] == 0
        assert memory["last_accessed_at"] is None
        assert memory["expires_at"] is None
        for field in ("created_at", "updated_at"):
            assert memory[field].tzinfo is not None
            assert abs((datetime.now(UTC) - memory[field]).total_seconds()) < 60
        assert driver.get(memory["id"]) == memory

    def test_get_answers_none_for_unknown_and_for_other_users_ids(
        self, driver: BaseMemoryDriver
    ) -> None:
        memory = driver.store("alice", "Alice's secret")
        assert driver.get("0" * 32) is None
        assert driver.get(memory["id"], "bob") is None
        assert driver.get(memory["id"], "alice") is not None
        assert driver.get(memory["id"]) is not None  # operator call: no user given

    # -- recall: ranking and ordering -------------------------------------------------------------

    def test_recall_ranks_the_relevant_memory_first(self, driver: BaseMemoryDriver) -> None:
        self.needs_meaning()
        driver.store("alice", "Prefers dark mode in every editor")
        driver.store("alice", "Is allergic to peanuts and shellfish")
        driver.store("alice", "Lives in Lisbon near the river")
        results = driver.recall("alice", query="any food allergies?", top_k=3)
        assert results[0]["content"] == "Is allergic to peanuts and shellfish"
        scores = [memory["score"] for memory in results]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= score <= 1.0 for score in scores)

    def test_recall_finds_a_paraphrase_without_shared_words(self, driver: BaseMemoryDriver) -> None:
        self.needs_meaning()
        driver.store("alice", "Prefers dark mode in every editor")
        driver.store("alice", "Has two cats called Miso and Tofu")
        results = driver.recall("alice", query="user interface theme", top_k=1)
        assert results[0]["content"] == "Prefers dark mode in every editor"

    def test_recall_finds_a_fact_at_the_end_of_a_long_memory(
        self, driver: BaseMemoryDriver
    ) -> None:
        # The model reads 256 tokens; this memory has ~600 and its fact is in the last ones.
        # Embedded in part, it ranked second, below an unrelated memory.
        self.needs_meaning()
        long = driver.store("alice", LONG_MEMORY)
        driver.store_many([{"user_id": "alice", "content": text} for text in UNRELATED])
        for query in (LATE_QUERY, EARLY_QUERY):
            results = driver.recall("alice", query=query, top_k=3)
            assert [m["content"][:40] for m in results][0] == LONG_MEMORY[:40], query
            assert results[0]["id"] == long["id"]

    def test_recall_without_query_lists_newest_first(self, driver: BaseMemoryDriver) -> None:
        stored = [driver.store("alice", f"note {i}") for i in range(4)]
        results = driver.recall("alice", top_k=3)
        assert _ids(results) == [m["id"] for m in reversed(stored)][:3]
        assert all(memory["score"] == 1.0 for memory in results)

    def test_recall_returns_at_most_top_k(self, driver: BaseMemoryDriver) -> None:
        driver.store_many([{"user_id": "alice", "content": f"pasta recipe {i}"} for i in range(8)])
        assert len(driver.recall("alice", query="pasta", top_k=5)) == 5
        assert len(driver.recall("alice", query="pasta", top_k=20)) == 8

    def test_keyword_only_recall_returns_only_keyword_matches(
        self, driver: BaseMemoryDriver
    ) -> None:
        driver.store("alice", "The invoice number is INV-4471")
        driver.store("alice", "Prefers dark mode")
        results = driver.recall("alice", query="INV-4471", use_vector=False)
        assert [m["content"] for m in results] == ["The invoice number is INV-4471"]
        assert driver.recall("alice", query="zebra", use_vector=False) == []

    @pytest.mark.parametrize("query", FTS_HOSTILE_QUERIES)
    def test_search_syntax_in_a_query_is_searched_for_never_parsed(
        self, driver: BaseMemoryDriver, query: str
    ) -> None:
        driver.store("alice", 'Quotes " and stars * and NEAR OR ( ) all appear here')
        for use_vector in (True, False):
            results = driver.recall("alice", query=query, use_vector=use_vector)
            assert isinstance(results, list)
        assert isinstance(driver.recall_global_knowledge(query), list)

    def test_recall_records_access(self, driver: BaseMemoryDriver) -> None:
        memory = driver.store("alice", "Prefers dark mode")
        first = driver.recall("alice", query="dark mode")[0]
        assert first["access_count"] == 1
        assert first["last_accessed_at"] is not None
        driver.recall("alice", query="dark mode")
        stored = driver.get(memory["id"])
        assert stored is not None and stored["access_count"] == 2

    # -- recall: scope ------------------------------------------------------------------------

    def test_recall_never_returns_another_users_memory(self, driver: BaseMemoryDriver) -> None:
        driver.store("bob", "Bob's password hint is blue falcon")
        driver.store("alice", "Alice likes tea")
        for query in (None, "password hint blue falcon"):
            for use_vector in (True, False):
                results = driver.recall("alice", query=query, use_vector=use_vector)
                assert all(memory["user_id"] == "alice" for memory in results)
                assert "Bob's password hint is blue falcon" not in [m["content"] for m in results]

    def test_recall_narrows_by_conversation_agent_and_namespace(
        self, driver: BaseMemoryDriver
    ) -> None:
        a = driver.store("alice", "coffee order: flat white", "c1", agent_id="barista")
        b = driver.store("alice", "coffee order: espresso", "c2", agent_id="barista",
                         namespace="work")
        c = driver.store("alice", "coffee order: latte", "c2", agent_id="assistant")
        assert _ids(driver.recall("alice", "c1", "coffee order")) == [a["id"]]
        assert set(_ids(driver.recall("alice", "c2", "coffee order"))) == {b["id"], c["id"]}
        assert set(_ids(driver.recall("alice", query="coffee", agent_id="barista"))) == {
            a["id"], b["id"]}
        assert _ids(driver.recall("alice", query="coffee", namespace="work")) == [b["id"]]
        assert _ids(driver.recall("alice", namespace="work")) == [b["id"]]

    def test_recall_tags_must_all_match_and_excluded_tags_must_not(
        self, driver: BaseMemoryDriver
    ) -> None:
        both = driver.store("alice", "likes green tea", tags=["drink", "preference"])
        drink = driver.store("alice", "drinks tea at 4pm", tags=["drink"])
        driver.store("alice", "tea allergy: none", tags=["health"])
        assert _ids(driver.recall("alice", query="tea", tags=["drink", "preference"])) == [
            both["id"]]
        assert set(_ids(driver.recall("alice", query="tea", tags=["drink"]))) == {
            both["id"], drink["id"]}
        excluded = driver.recall("alice", query="tea", exclude_tags=["preference", "health"])
        assert _ids(excluded) == [drink["id"]]
        assert _ids(driver.recall("alice", tags=["health"], exclude_tags=["health"])) == []

    def test_recall_min_importance(self, driver: BaseMemoryDriver) -> None:
        driver.store("alice", "minor detail about tea", importance=0.2)
        major = driver.store("alice", "major fact about tea", importance=0.9)
        assert _ids(driver.recall("alice", query="tea", min_importance=0.5)) == [major["id"]]

    # -- upsert by key ----------------------------------------------------------------------------

    def test_store_with_key_replaces_in_place(self, driver: BaseMemoryDriver) -> None:
        first = driver.store("alice", "Favourite colour: red", key="colour", tags=["old"])
        second = driver.store("alice", "Favourite colour: green", key="colour", tags=["new"])
        assert second["id"] == first["id"]
        assert second["created_at"] == first["created_at"]
        assert second["content"] == "Favourite colour: green"
        assert second["tags"] == ["new"]
        assert [m["content"] for m in driver.recall("alice")] == ["Favourite colour: green"]
        assert driver.recall("alice", query="colour red green")[0]["id"] == first["id"]

    def test_keys_are_scoped_by_user_agent_and_namespace(self, driver: BaseMemoryDriver) -> None:
        ids = {
            driver.store("alice", "v1", key="k")["id"],
            driver.store("bob", "v1", key="k")["id"],
            driver.store("alice", "v1", key="k", agent_id="a1")["id"],
            driver.store("alice", "v1", key="k", namespace="other")["id"],
        }
        assert len(ids) == 4
        assert driver.store("alice", "v2", key="k", agent_id="a1")["id"] in ids

    def test_upsert_brings_back_a_soft_deleted_memory(self, driver: BaseMemoryDriver) -> None:
        memory = driver.store("alice", "old", key="k")
        assert driver.delete(memory["id"], "alice")
        again = driver.store("alice", "new", key="k")
        assert again["id"] == memory["id"]
        assert driver.get(memory["id"], "alice") is not None

    # -- store_many ---------------------------------------------------------------------------

    def test_store_many_stores_all_in_order(self, driver: BaseMemoryDriver) -> None:
        items = [{"user_id": "alice", "content": f"fact {i}", "tags": [f"t{i}"]} for i in range(5)]
        items.append({"user_id": "bob", "content": "bob's fact", "conversation_id": "c9"})
        stored = driver.store_many(items)
        assert [m["content"] for m in stored] == [item["content"] for item in items]
        assert stored[-1]["user_id"] == "bob" and stored[-1]["conversation_id"] == "c9"
        assert len(driver.recall("alice", top_k=100)) == 5
        assert driver.store_many([]) == []

    def test_store_many_with_a_bad_item_writes_nothing(self, driver: BaseMemoryDriver) -> None:
        items: list[Any] = [{"user_id": "alice", "content": "good"},
                            {"user_id": "alice", "content": ""}]
        with pytest.raises(InvalidInputError, match=r"items\[1\].*content"):
            driver.store_many(items)
        assert driver.recall("alice") == []

    def test_store_many_upserts_keys_last_one_wins(self, driver: BaseMemoryDriver) -> None:
        stored = driver.store_many([
            {"user_id": "alice", "content": "first", "key": "k"},
            {"user_id": "alice", "content": "second", "key": "k"},
        ])
        assert stored[0]["id"] == stored[1]["id"]
        assert [m["content"] for m in driver.recall("alice")] == ["second"]

    # -- update -------------------------------------------------------------------------------

    def test_update_changes_only_given_fields_and_reembeds(self, driver: BaseMemoryDriver) -> None:
        memory = driver.store("alice", "Drives a red bicycle", tags=["a"], metadata={"x": 1})
        updated = driver.update(memory["id"], "alice", content="Owns a grand piano",
                                tags=["music"], importance=0.9)
        assert updated is not None
        assert updated["content"] == "Owns a grand piano"
        assert updated["tags"] == ["music"]
        assert updated["metadata"] == {"x": 1}
        assert updated["importance"] == pytest.approx(0.9)
        assert updated["updated_at"] >= memory["updated_at"]
        if self.ranks_by_meaning:
            driver.store("alice", "Drives a blue car")
            assert driver.recall("alice", query="musical instrument")[0]["id"] == memory["id"]

    def test_update_of_unknown_or_other_users_memory_is_none(
        self, driver: BaseMemoryDriver
    ) -> None:
        memory = driver.store("alice", "original")
        assert driver.update(memory["id"], "bob", content="hijacked") is None
        assert driver.update("f" * 32, "alice", content="x") is None
        stored = driver.get(memory["id"])
        assert stored is not None and stored["content"] == "original"

    def test_update_sets_and_clears_expiry(self, driver: BaseMemoryDriver) -> None:
        memory = driver.store("alice", "temporary")
        with_expiry = driver.update(memory["id"], "alice", ttl=3600)
        assert with_expiry is not None and with_expiry["expires_at"] is not None
        cleared = driver.update(memory["id"], "alice", clear_expiry=True)
        assert cleared is not None and cleared["expires_at"] is None

    # -- occurred_at ----------------------------------------------------------------------------

    def test_occurred_at_defaults_to_the_time_of_the_store(self, driver: BaseMemoryDriver) -> None:
        memory = driver.store("alice", "Stored without a time")
        assert memory["occurred_at"] == memory["created_at"]
        assert driver.get(memory["id"]) == memory
        batch = driver.store_many([{"user_id": "alice", "content": f"batch fact {i}"}
                                   for i in range(3)])
        for stored in batch:
            assert stored["occurred_at"] == stored["created_at"]
            assert stored["occurred_at"].tzinfo is not None

    def test_occurred_at_round_trips_through_every_read(self, driver: BaseMemoryDriver) -> None:
        lisbon_summer = timezone(timedelta(hours=1))
        said = datetime(2023, 5, 7, 15, 30, 5, 250_000, tzinfo=lisbon_summer)
        planned = datetime(2031, 3, 1, 9, 0, tzinfo=UTC)  # a planned event: in the future
        memory = driver.store("alice", "Adopted a cat named Miso", "c1", occurred_at=said)
        trip = driver.store("alice", "Trip to Kyoto is booked", "c1", occurred_at=planned)
        assert memory["occurred_at"] == said and memory["occurred_at"].utcoffset() == timedelta(0)
        assert memory["created_at"] != said
        assert trip["occurred_at"] == planned
        assert driver.get(memory["id"], "alice")["occurred_at"] == said  # type: ignore[index]
        listed = {m["id"]: m["occurred_at"] for m in driver.list_memories("alice")["items"]}
        assert listed == {memory["id"]: said, trip["id"]: planned}
        # A future occurred_at hides nothing: recall finds it with and without a query.
        assert {m["id"]: m["occurred_at"] for m in driver.recall("alice")} == listed
        found = driver.recall("alice", query="trip to Kyoto booked", use_vector=False)
        assert [(m["id"], m["occurred_at"]) for m in found] == [(trip["id"], planned)]
        found = driver.recall("alice", query="cat named Miso")
        assert found[0]["id"] == memory["id"] and found[0]["occurred_at"] == said

    def test_store_many_takes_occurred_at_per_item(self, driver: BaseMemoryDriver) -> None:
        first = datetime(2022, 1, 1, 8, 0, tzinfo=UTC)
        stored = driver.store_many([
            {"user_id": "alice", "content": "new year breakfast", "occurred_at": first},
            {"user_id": "alice", "content": "no time given"},
        ])
        assert stored[0]["occurred_at"] == first
        assert stored[1]["occurred_at"] == stored[1]["created_at"]
        assert driver.get(stored[0]["id"])["occurred_at"] == first  # type: ignore[index]

    def test_update_sets_occurred_at_and_content_alone_keeps_it(
        self, driver: BaseMemoryDriver
    ) -> None:
        memory = driver.store("alice", "Ran a marathon")
        when = datetime(2019, 10, 13, 9, 0, tzinfo=UTC)
        updated = driver.update(memory["id"], "alice", occurred_at=when)
        assert updated is not None and updated["occurred_at"] == when
        assert updated["created_at"] == memory["created_at"]
        assert updated["updated_at"] >= memory["updated_at"]
        again = driver.update(memory["id"], "alice", content="Ran the Berlin marathon")
        assert again is not None and again["occurred_at"] == when
        assert driver.get(memory["id"])["occurred_at"] == when  # type: ignore[index]

    def test_upsert_by_key_sets_occurred_at_to_its_own_time_unless_given(
        self, driver: BaseMemoryDriver
    ) -> None:
        old = datetime(2020, 2, 2, tzinfo=UTC)
        first = driver.store("alice", "Lives in Porto", key="home", occurred_at=old)
        assert first["occurred_at"] == old
        moved = driver.store("alice", "Lives in Lisbon", key="home")
        assert moved["id"] == first["id"] and moved["created_at"] == first["created_at"]
        assert moved["occurred_at"] > first["created_at"]  # the new content is a new fact
        assert abs((moved["occurred_at"] - moved["updated_at"]).total_seconds()) < 1
        when = datetime(2024, 6, 1, tzinfo=UTC)
        dated = driver.store("alice", "Lives in Faro", key="home", occurred_at=when)
        assert dated["occurred_at"] == when
        assert driver.get(first["id"])["occurred_at"] == when  # type: ignore[index]

    @pytest.mark.parametrize("value", [
        datetime(2023, 5, 7, 12, 0),  # naive: ambiguous
        "2023-05-07T12:00:00+00:00",  # a string, not a datetime
        datetime(1, 1, 1, 23, 0, tzinfo=UTC),  # before 0001-01-02
        datetime(1, 1, 2, 3, 0, tzinfo=timezone(timedelta(hours=5))),  # 0001-01-01 in UTC
        datetime(9999, 12, 31, 0, 0, tzinfo=UTC),  # after 9999-12-30
    ])
    def test_bad_occurred_at_is_refused_by_name_and_writes_nothing(
        self, driver: BaseMemoryDriver, value: Any
    ) -> None:
        rule = "timezone-aware datetime from 0001-01-02 to 9999-12-30"
        with pytest.raises(InvalidInputError, match=f"^occurred_at must be a {rule}"):
            driver.store("alice", "x", occurred_at=value)
        with pytest.raises(InvalidInputError, match=rf"^items\[1\]: occurred_at .*{rule}"):
            driver.store_many([{"user_id": "alice", "content": "fine"},
                               {"user_id": "alice", "content": "x", "occurred_at": value}])
        assert driver.stats()["memories"] == {"visible": 0, "deleted": 0, "expired": 0}
        memory = driver.store("alice", "kept as it was")
        with pytest.raises(InvalidInputError, match=f"^occurred_at must be a {rule}"):
            driver.update(memory["id"], "alice", content="changed", occurred_at=value)
        assert driver.get(memory["id"]) == memory

    # -- delete, restore, TTL, purge ------------------------------------------------------------

    def test_delete_hides_at_once_and_restore_brings_back(self, driver: BaseMemoryDriver) -> None:
        memory = driver.store("alice", "Prefers dark mode")
        assert driver.delete(memory["id"], "alice") is True
        assert driver.get(memory["id"], "alice") is None
        assert driver.recall("alice", query="dark mode") == []
        assert driver.recall("alice") == []
        assert driver.list_memories("alice")["items"] == []
        assert driver.delete(memory["id"], "alice") is False
        hidden = driver.get(memory["id"], "alice", include_deleted=True)
        assert hidden is not None and hidden["deleted_at"] is not None
        assert driver.restore(memory["id"], "alice") is True
        assert driver.restore(memory["id"], "alice") is False
        assert _ids(driver.recall("alice", query="dark mode")) == [memory["id"]]

    def test_delete_and_restore_of_other_users_memory_do_nothing(
        self, driver: BaseMemoryDriver
    ) -> None:
        memory = driver.store("alice", "mine")
        assert driver.delete(memory["id"], "bob") is False
        assert driver.get(memory["id"], "alice") is not None
        assert driver.delete(memory["id"], "alice") is True
        assert driver.restore(memory["id"], "bob") is False
        assert driver.get(memory["id"], "alice") is None

    def test_delete_without_user_is_an_operator_call(self, driver: BaseMemoryDriver) -> None:
        memory = driver.store("alice", "mine")
        assert driver.delete(memory["id"]) is True
        assert driver.get(memory["id"]) is None

    def test_expired_memories_are_invisible_to_every_read(self, driver: BaseMemoryDriver) -> None:
        # The model (or the async API's embedding process) is started first: its start must
        # not eat the half second the short memory lives.
        driver.recall("alice", query="door")
        short = driver.store("alice", "the door code is 4412", ttl=0.5)
        lasting = driver.store("alice", "the door is blue", ttl=timedelta(hours=1))
        assert short["expires_at"] is not None
        assert set(_ids(driver.recall("alice", query="door"))) == {short["id"], lasting["id"]}
        time.sleep(0.7)
        assert driver.get(short["id"], "alice") is None
        assert _ids(driver.recall("alice", query="door code")) == [lasting["id"]]
        assert _ids(driver.recall("alice", query="door code", use_vector=False)) == [lasting["id"]]
        assert _ids(driver.list_memories("alice")["items"]) == [lasting["id"]]
        assert driver.delete(short["id"], "alice") is False
        assert driver.update(short["id"], "alice", content="x") is None

    def test_expires_at_in_the_past_is_stored_but_invisible(self, driver: BaseMemoryDriver) -> None:
        past = datetime.now(UTC) - timedelta(seconds=1)
        memory = driver.store("alice", "already expired", expires_at=past)
        assert driver.get(memory["id"]) is None

    def test_purge_removes_expired_and_old_soft_deleted(self, driver: BaseMemoryDriver) -> None:
        expired = driver.store("alice", "short lived", ttl=0.2)
        deleted = driver.store("alice", "deleted")
        kept = driver.store("alice", "kept")
        driver.delete(deleted["id"], "alice")
        time.sleep(0.3)
        assert driver.purge(retention=timedelta(days=1)) == 1  # only the expired one
        assert driver.restore(deleted["id"], "alice") is True
        driver.delete(deleted["id"], "alice")
        assert driver.purge(retention=timedelta(0)) == 1
        assert driver.restore(deleted["id"], "alice") is False
        assert driver.get(expired["id"], include_deleted=True) is None
        assert _ids(driver.recall("alice")) == [kept["id"]]

    # -- list_memories ------------------------------------------------------------------------

    def test_list_memories_pages_newest_first_without_gaps(self, driver: BaseMemoryDriver) -> None:
        stored = driver.store_many([{"user_id": "alice", "content": f"m{i}"} for i in range(25)])
        driver.store("bob", "not alice's")
        seen: list[str] = []
        cursor = None
        for page_number in range(10):
            page = driver.list_memories("alice", limit=10, cursor=cursor)
            seen += _ids(page["items"])
            if page_number == 0:
                driver.store("alice", "added after the first page")
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [memory["id"] for memory in reversed(stored)]

    def test_list_memories_cursor_reveals_no_global_position(
        self, driver: BaseMemoryDriver
    ) -> None:
        # Other users' memories first: with a cursor made of the table's key, alice's second
        # newest would be "32", telling her how many memories the whole store holds.
        driver.store_many([{"user_id": "bob", "content": f"b{i}"} for i in range(30)])
        driver.store_many([{"user_id": "alice", "content": f"a{i}"} for i in range(3)])
        cursor = driver.list_memories("alice", limit=1)["next_cursor"]
        assert isinstance(cursor, str) and not cursor.strip().lstrip("-").isdigit()
        readings = [cursor]
        with contextlib.suppress(ValueError):
            readings.append(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
                            .decode("ascii", "replace"))
        tokens = {token for text in readings for token in re.split(r"[^0-9A-Za-z]+", text)}
        assert not tokens & {str(n) for n in range(1, 40)}, readings

    def test_list_memories_cursor_is_refused_by_another_listing(
        self, driver: BaseMemoryDriver
    ) -> None:
        driver.store_many([{"user_id": user, "content": f"{user}{i}", "tags": ["x"]}
                           for user in ("alice", "bob") for i in range(3)])
        cursor = driver.list_memories("alice", limit=1)["next_cursor"]
        assert cursor is not None
        assert len(driver.list_memories("alice", limit=5, cursor=cursor)["items"]) == 2
        other_listings: list[Callable[[], Any]] = [
            lambda: driver.list_memories("bob", limit=5, cursor=cursor),
            lambda: driver.list_memories("alice", tags=["x"], limit=5, cursor=cursor),
            lambda: driver.list_memories("alice", namespace="n", limit=5, cursor=cursor),
            lambda: driver.list_memories("alice", include_deleted=True, limit=5, cursor=cursor),
        ]
        for listing in other_listings:
            with pytest.raises(InvalidInputError, match="cursor"):
                listing()
        tampered = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
        with pytest.raises(InvalidInputError, match="cursor"):
            driver.list_memories("alice", limit=5, cursor=tampered)

    def test_list_memories_cursor_after_a_purged_memory_continues_or_is_refused(
        self, driver: BaseMemoryDriver
    ) -> None:
        stored = driver.store_many([{"user_id": "alice", "content": f"a{i}"} for i in range(3)])
        cursor = driver.list_memories("alice", limit=1)["next_cursor"]
        driver.delete(stored[-1]["id"], "alice")
        assert driver.purge(retention=timedelta(0)) == 1
        try:
            rest = driver.list_memories("alice", limit=5, cursor=cursor)
        except InvalidInputError as error:  # the place it continued from is gone: start over
            assert "cursor" in str(error)
        else:  # or it continues where it was, never elsewhere
            assert _ids(rest["items"]) == [stored[1]["id"], stored[0]["id"]]

    def test_list_memories_filters_and_includes_deleted_on_request(
        self, driver: BaseMemoryDriver
    ) -> None:
        a = driver.store("alice", "a", "c1", tags=["x"])
        b = driver.store("alice", "b", "c2")
        driver.delete(b["id"], "alice")
        assert _ids(driver.list_memories("alice")["items"]) == [a["id"]]
        assert _ids(driver.list_memories("alice", include_deleted=True)["items"]) == [
            b["id"], a["id"]]
        assert _ids(driver.list_memories("alice", conversation_id="c1")["items"]) == [a["id"]]
        assert _ids(driver.list_memories("alice", tags=["x"])["items"]) == [a["id"]]

    # -- forget_user ----------------------------------------------------------------------------

    def test_forget_user_erases_everything_of_that_user_only(
        self, driver: BaseMemoryDriver
    ) -> None:
        driver.create_user("alice", display_name="Alice")
        gone = driver.store("alice", "alice's memory")
        deleted = driver.store("alice", "alice's deleted memory")
        driver.delete(deleted["id"], "alice")
        bob = driver.store("bob", "bob's memory")
        assert driver.forget_user("alice") == 2
        assert driver.get(gone["id"], include_deleted=True) is None
        assert driver.get(deleted["id"], include_deleted=True) is None
        assert driver.get_user("alice") is None
        assert driver.recall("alice", query="memory") == []
        assert driver.get(bob["id"], "bob") is not None
        assert driver.forget_user("alice") == 0

    # -- knowledge ------------------------------------------------------------------------------

    def test_knowledge_is_stored_chunked_and_recalled(self, driver: BaseMemoryDriver) -> None:
        self.needs_meaning()
        long_text = " ".join(f"Section {i}: the warehouse in zone {i} stores spare parts."
                             for i in range(120))
        document = driver.store_global_knowledge(long_text, "operations", title="Warehouses",
                                                 doc_id="warehouses", metadata={"v": 1})
        assert document["doc_id"] == "warehouses"
        assert document["chunk_count"] > 1
        driver.store_global_knowledge("Refunds are paid within 14 days of the return.",
                                      "policies", doc_id="refunds")
        found = driver.recall_global_knowledge("how long until I get my money back?", top_k=1)
        assert found[0]["doc_id"] == "refunds"
        assert 0.0 <= found[0]["score"] <= 1.0
        narrowed = driver.recall_global_knowledge("refund", top_k=5, category="operations")
        assert {item["doc_id"] for item in narrowed} == {"warehouses"}

    def test_knowledge_reingest_replaces_every_chunk(self, driver: BaseMemoryDriver) -> None:
        first = driver.store_global_knowledge("Opening hours are 9 to 5. " * 200, "ops",
                                              doc_id="hours")
        second = driver.store_global_knowledge("The office is closed on Sundays.", "ops",
                                               title="Hours v2", doc_id="hours")
        assert second["chunk_count"] == 1 < first["chunk_count"]
        assert second["created_at"] == first["created_at"]
        found = driver.recall_global_knowledge("opening hours", top_k=10)
        assert [item["content"] for item in found] == ["The office is closed on Sundays."]
        assert found[0]["title"] == "Hours v2"

    def test_delete_knowledge(self, driver: BaseMemoryDriver) -> None:
        driver.store_global_knowledge("Parking is free for visitors.", "facilities", doc_id="p")
        assert driver.delete_knowledge("p") is True
        assert driver.delete_knowledge("p") is False
        assert driver.recall_global_knowledge("parking") == []

    # -- users, stats, health -------------------------------------------------------------------

    def test_create_user_generates_ids_and_refuses_duplicates(
        self, driver: BaseMemoryDriver
    ) -> None:
        generated = driver.create_user(display_name="Someone")
        assert re.fullmatch(r"user_[0-9a-f]{8}", generated["user_id"])
        assert generated["display_name"] == "Someone"
        driver.create_user("alice")
        with pytest.raises(InvalidInputError, match="user_id"):
            driver.create_user("alice")

    def test_get_user_carries_stats(self, driver: BaseMemoryDriver) -> None:
        assert driver.get_user("nobody") is None
        driver.create_user("alice", display_name="Alice", profile={"tz": "UTC"})
        driver.store("alice", "one")
        deleted = driver.store("alice", "two")
        driver.delete(deleted["id"], "alice")
        user = driver.get_user("alice")
        assert user is not None
        assert user["display_name"] == "Alice"
        assert user["profile"] == {"tz": "UTC"}
        assert user["stats"]["memories"] == 1
        assert user["stats"]["deleted"] == 1
        driver.store("carol", "known from memories only")
        carol = driver.get_user("carol")
        assert carol is not None and carol["stats"]["memories"] == 1

    def test_profile_set_get_and_merge(self, driver: BaseMemoryDriver) -> None:
        assert driver.get_profile("alice") == {}
        assert driver.set_profile("alice", {"tz": "UTC", "lang": "en"}) == {"tz": "UTC",
                                                                            "lang": "en"}
        assert driver.set_profile("alice", {"lang": "pt"}, merge=True) == {"tz": "UTC",
                                                                           "lang": "pt"}
        assert driver.set_profile("alice", {"only": 1}) == {"only": 1}
        assert driver.get_profile("alice") == {"only": 1}
        assert driver.get_profile("bob") == {}

    def test_stats_count_visible_deleted_and_expired(self, driver: BaseMemoryDriver) -> None:
        driver.store("alice", "visible")
        deleted = driver.store("alice", "deleted")
        driver.delete(deleted["id"], "alice")
        driver.store("alice", "expired", ttl=0.1)
        driver.store("bob", "bob's")
        time.sleep(0.2)
        assert driver.stats("alice")["memories"] == {"visible": 1, "deleted": 1, "expired": 1}
        overall = driver.stats()
        assert overall["memories"]["visible"] == 2
        assert overall["users"] == 2

    def test_health_check_reports_ok(self, driver: BaseMemoryDriver) -> None:
        report = driver.health_check()
        assert report["driver"] == driver.name
        assert report["status"] == "ok"
        assert isinstance(report["checks"], dict)
        assert report["latency_ms"] >= 0

    # -- bad input ------------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("call", "argument"),
        [
            (lambda d: d.store("", "x"), "user_id"),
            (lambda d: d.store("a b", "x"), "user_id"),
            (lambda d: d.store("x" * 129, "x"), "user_id"),
            (lambda d: d.store(42, "x"), "user_id"),
            (lambda d: d.store("alice", ""), "content"),
            (lambda d: d.store("alice", "   "), "content"),
            (lambda d: d.store("alice", None), "content"),
            (lambda d: d.store("alice", "nul\x00byte"), "content"),
            (lambda d: d.store("alice", "x" * 10_001), "content"),
            (lambda d: d.store("alice", "\ud800"), "content"),
            (lambda d: d.store("alice", "x", "c 1"), "conversation_id"),
            (lambda d: d.store("alice", "x", tags="preference"), "tags"),
            (lambda d: d.store("alice", "x", tags=["a,b"]), "tags"),
            (lambda d: d.store("alice", "x", tags=[""]), "tags"),
            (lambda d: d.store("alice", "x", tags=[1]), "tags"),
            (lambda d: d.store("alice", "x", tags=[f"t{i}" for i in range(33)]), "tags"),
            (lambda d: d.store("alice", "x", metadata=["not", "a", "dict"]), "metadata"),
            (lambda d: d.store("alice", "x", metadata={"v": float("nan")}), "metadata"),
            (lambda d: d.store("alice", "x", metadata={"v": object()}), "metadata"),
            (lambda d: d.store("alice", "x", metadata={"v": "x" * 20_000}), "metadata"),
            (lambda d: d.store("alice", "x", agent_id="a/b"), "agent_id"),
            (lambda d: d.store("alice", "x", namespace=""), "namespace"),
            (lambda d: d.store("alice", "x", key="k k"), "key"),
            (lambda d: d.store("alice", "x", importance=1.5), "importance"),
            (lambda d: d.store("alice", "x", importance=float("inf")), "importance"),
            (lambda d: d.store("alice", "x", importance=float("nan")), "importance"),
            (lambda d: d.store("alice", "x", importance="high"), "importance"),
            (lambda d: d.store("alice", "x", importance=True), "importance"),
            (lambda d: d.store("alice", "x", ttl=0), "ttl"),
            (lambda d: d.store("alice", "x", ttl=-5), "ttl"),
            (lambda d: d.store("alice", "x", ttl=float("inf")), "ttl"),
            (lambda d: d.store("alice", "x", ttl="1h"), "ttl"),
            (lambda d: d.store("alice", "x", expires_at=datetime(2030, 1, 1)), "expires_at"),
            (lambda d: d.store("alice", "x", expires_at="2030-01-01"), "expires_at"),
            (lambda d: d.store("alice", "x", ttl=5,
                               expires_at=datetime(2030, 1, 1, tzinfo=UTC)), "ttl"),
            (lambda d: d.store_many("not a list"), "items"),
            (lambda d: d.store_many([{"user_id": "alice"}]), "items[0]"),
            (lambda d: d.store_many([{"user_id": "alice", "content": "x", "bogus": 1}]),
             "items[0]"),
            (lambda d: d.store_many(["x"]), "items[0]"),
            (lambda d: d.recall("bad id"), "user_id"),
            (lambda d: d.recall("alice", query=123), "query"),
            (lambda d: d.recall("alice", query="x" * 4001), "query"),
            (lambda d: d.recall("alice", query="nul\x00"), "query"),
            (lambda d: d.recall("alice", top_k=0), "top_k"),
            (lambda d: d.recall("alice", top_k=1001), "top_k"),
            (lambda d: d.recall("alice", top_k=2.5), "top_k"),
            (lambda d: d.recall("alice", top_k=True), "top_k"),
            (lambda d: d.recall("alice", use_vector="no"), "use_vector"),
            (lambda d: d.recall("alice", exclude_tags="x"), "exclude_tags"),
            (lambda d: d.recall("alice", tags=["a,b"]), "tags"),
            (lambda d: d.recall("alice", conversation_id=""), "conversation_id"),
            (lambda d: d.recall("alice", min_importance=2), "min_importance"),
            (lambda d: d.recall_global_knowledge(""), "query"),
            (lambda d: d.recall_global_knowledge("x", top_k=-1), "top_k"),
            (lambda d: d.recall_global_knowledge("x", category="a b"), "category"),
            (lambda d: d.store_global_knowledge("", "cat"), "content"),
            (lambda d: d.store_global_knowledge("x", ""), "category"),
            (lambda d: d.store_global_knowledge("x", "cat", title=5), "title"),
            (lambda d: d.store_global_knowledge("x", "cat", doc_id="a b"), "doc_id"),
            (lambda d: d.store_global_knowledge("x", "cat", metadata=5), "metadata"),
            (lambda d: d.get(""), "memory_id"),
            (lambda d: d.get("x", "a b"), "user_id"),
            (lambda d: d.delete(None), "memory_id"),
            (lambda d: d.restore("x y"), "memory_id"),
            (lambda d: d.update("x", content=""), "content"),
            (lambda d: d.update("x", importance=-0.1), "importance"),
            (lambda d: d.update("x", ttl=5, clear_expiry=True), "clear_expiry"),
            (lambda d: d.list_memories("alice", limit=0), "limit"),
            (lambda d: d.list_memories("alice", cursor="abc"), "cursor"),
            (lambda d: d.forget_user(""), "user_id"),
            (lambda d: d.purge(retention=5), "retention"),
            (lambda d: d.delete_knowledge(""), "doc_id"),
            (lambda d: d.stats("a b"), "user_id"),
            (lambda d: d.create_user("a b"), "user_id"),
            (lambda d: d.create_user(profile=[1]), "profile"),
            (lambda d: d.get_user(""), "user_id"),
            (lambda d: d.get_profile(None), "user_id"),
            (lambda d: d.set_profile("alice", "x"), "profile"),
            (lambda d: d.set_profile("alice", {"v": float("nan")}), "profile"),
        ],
    )
    def test_bad_input_is_refused_by_name_and_writes_nothing(
        self, driver: BaseMemoryDriver, call: Callable[[BaseMemoryDriver], Any], argument: str
    ) -> None:
        with pytest.raises(InvalidInputError) as raised:
            call(driver)
        assert argument in str(raised.value)
        assert driver.stats()["memories"] == {"visible": 0, "deleted": 0, "expired": 0}
        assert driver.stats()["users"] == 0
        assert driver.stats()["knowledge"]["documents"] == 0

    def test_close_is_idempotent_and_final(self, driver: BaseMemoryDriver) -> None:
        driver.close()
        driver.close()
        with pytest.raises(BackendUnavailableError, match="closed"):
            driver.recall("alice")
