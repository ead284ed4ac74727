"""The automem driver against what the real AutoMem server does (``AUTOMEM_API.md``, "What the real
server does that a client must survive"; issue 14, items 1-11), each reproduced by the double
(``tests/automem_double.py``) with that one behaviour switched on. Every test here failed on the
driver before issue 14 (see ``notes/issue-14.md`` for how that was checked).

The double is a real HTTP server on 127.0.0.1; its delays are scaled down (enrichment 0.1 s
instead of ~0.2 s, queued embedding 0.4 s instead of 0.3-2.3 s, batches 20 ms per item instead
of ~55 ms against a 0.5 s read timeout instead of 25 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from app.core.memory import BackendUnavailableError
from app.core.memory.drivers.automem_driver import AutomemDriver
from tests.automem_double import AutomemDouble

TOKEN = "real-server-token"
ENRICHMENT_SECONDS = 0.1


@pytest.fixture
def double() -> Iterator[AutomemDouble]:
    service = AutomemDouble(token=TOKEN)
    service.start()
    yield service
    service.stop()


def make_driver(double: AutomemDouble, **options: object) -> AutomemDriver:
    assert double.server is not None
    settings: dict[str, object] = {"token": TOKEN, "connect_timeout": 0.5, "read_timeout": 2.0,
                                   "max_tries": 3, "backoff_seconds": 0.02,
                                   "enrichment_window": 3.5 * ENRICHMENT_SECONDS,
                                   # Access counts written by close() or an explicit flush, not
                                   # by a background write that could take a fault a test injects
                                   # for the call it makes.
                                   "access_flush_seconds": 60}
    settings.update(options)
    url = f"http://127.0.0.1:{double.server.server_address[1]}"
    return AutomemDriver(url=url, **settings)  # type: ignore[arg-type]


# -- 1. enrichment writes back tags and metadata from a snapshot --------------------------------


def test_a_delete_right_after_a_store_stays_deleted(double):
    double.enrichment_seconds = ENRICHMENT_SECONDS
    driver = make_driver(double)
    memory = driver.store("alice", "Prefers dark mode")
    assert driver.delete(memory["id"], "alice") is True
    double.settle()  # the enrichment job has written back what it read at the store
    assert driver.get(memory["id"], "alice") is None
    assert driver.recall("alice") == []
    assert driver.recall("alice", query="dark mode") == []
    hidden = driver.get(memory["id"], "alice", include_deleted=True)
    assert hidden is not None and hidden["deleted_at"] is not None
    driver.close()


def test_an_upsert_right_after_a_store_keeps_its_new_tags_and_metadata(double):
    double.enrichment_seconds = ENRICHMENT_SECONDS
    driver = make_driver(double)
    first = driver.store("alice", "Favourite colour: red", key="colour", tags=["old"],
                         metadata={"v": 1})
    second = driver.store("alice", "Favourite colour: green", key="colour", tags=["new"],
                          metadata={"v": 2})
    assert second["id"] == first["id"]
    double.settle()
    stored = driver.get(first["id"], "alice")
    assert stored is not None
    assert (stored["content"], stored["tags"], stored["metadata"]) == (
        "Favourite colour: green", ["new"], {"v": 2})
    assert [m["id"] for m in driver.recall("alice", tags=["new"])] == [first["id"]]
    assert driver.recall("alice", tags=["old"]) == []
    driver.close()


def test_expiry_restore_profile_and_access_counts_set_right_after_a_write_hold(double):
    double.enrichment_seconds = ENRICHMENT_SECONDS
    driver = make_driver(double)
    expiring = driver.store("alice", "temporary note")
    assert driver.update(expiring["id"], "alice", ttl=3600) is not None
    restored = driver.store("alice", "deleted then restored")
    assert driver.delete(restored["id"], "alice") and driver.restore(restored["id"], "alice")
    driver.create_user("bob", display_name="Bob")
    driver.set_profile("bob", {"tz": "UTC"})
    counted = driver.store("carol", "counted once")
    assert driver.recall("carol")[0]["access_count"] == 1
    double.settle()
    after = driver.get(expiring["id"], "alice")
    assert after is not None and after["expires_at"] is not None
    assert driver.get(restored["id"], "alice") is not None
    assert driver.get_profile("bob") == {"tz": "UTC"}
    assert driver.get_user("bob")["display_name"] == "Bob"  # type: ignore[index]
    again = driver.get(counted["id"], "carol")
    assert again is not None and again["access_count"] == 1
    driver.close()


# -- 2, 3. POST /memory embeds in the background ----------------------------------------------


def test_a_stored_memory_is_found_by_meaning_when_store_returns(double):
    double.embedding_model = True
    double.embedding_queue_seconds = 0.4
    driver = make_driver(double)
    memory = driver.store("alice", "Prefers dark mode in every editor")
    # "preferences" shares no word with the memory: only its vector can find it.
    assert [m["id"] for m in driver.recall("alice", query="preferences")] == [memory["id"]]
    driver.close()


def test_a_content_update_right_after_a_store_is_searched_by_its_new_meaning(double):
    double.embedding_model = True
    double.embedding_queue_seconds = 0.4
    driver = make_driver(double)
    memory = driver.store("alice", "Drives a red bicycle")
    driver.update(memory["id"], "alice", content="Owns a grand piano")
    driver.store("alice", "Walks the dog")
    double.settle()  # any queued embedding job has run by now
    assert [m["id"] for m in driver.recall("alice", query="pianos", top_k=1)] == [memory["id"]]
    driver.close()


# -- 4, 10. exclude_tags matches by prefix; caller tags share the server's tag space -------------


def test_excluding_a_tag_excludes_exactly_that_tag(double):
    double.prefix_exclude = True
    driver = make_driver(double)
    preference = driver.store("alice", "likes tea", tags=["preference"])
    pref = driver.store("alice", "short tag", tags=["pref"])
    plain = driver.store("alice", "no tags")
    assert {m["id"] for m in driver.recall("alice", exclude_tags=["pref"])} == {
        preference["id"], plain["id"]}
    everything = {preference["id"], pref["id"], plain["id"]}
    for prefix in ("user", "agent", "mem", "memory-layer", "n", "a", "ml"):
        assert {m["id"] for m in driver.recall("alice", exclude_tags=[prefix])} == everything
    driver.close()


def test_caller_tags_cannot_collide_with_the_drivers_own(double):
    driver = make_driver(double)
    memory = driver.store("alice", "tagged like a marker",
                          tags=["memory-layer:deleted", "user:bob", "memory-layer:knowledge"])
    assert [m["id"] for m in driver.recall("alice")] == [memory["id"]]
    assert [m["id"] for m in driver.recall("alice", tags=["memory-layer:deleted"])] == [
        memory["id"]]
    assert driver.recall("bob") == []
    assert driver.recall_global_knowledge("marker") == []
    driver.close()


# -- 5. the server matches tags case-insensitively and cuts at limit (100 at most) -------------


def test_another_users_memories_in_other_case_do_not_starve_a_recall(double):
    assert double.case_insensitive_tags
    driver = make_driver(double)
    mine = driver.store("carol_x", "the only memory of carol_x")
    driver.store_many([{"user_id": "Carol_x", "content": f"Carol_x note {i}"} for i in range(40)])
    assert [m["id"] for m in driver.recall("carol_x")] == [mine["id"]]
    assert [m["id"] for m in driver.recall("carol_x", query="memory")] == [mine["id"]]
    driver.close()


def test_min_importance_is_not_starved_by_the_servers_cut(double):
    driver = make_driver(double)
    major = driver.store("alice", "the one that matters", importance=0.95)
    driver.store_many([{"user_id": "alice", "content": f"minor {i}", "importance": 0.5}
                       for i in range(40)])
    assert [m["id"] for m in driver.recall("alice", min_importance=0.9)] == [major["id"]]
    driver.close()


def test_top_k_above_the_servers_cap_is_not_silently_capped(double):
    assert double.recall_limit_cap == 100
    driver = make_driver(double)
    driver.store_many([{"user_id": "alice", "content": f"fact {i}"} for i in range(130)])
    newest = driver.recall("alice", top_k=130)
    assert len(newest) == 130 and len({m["id"] for m in newest}) == 130
    assert [m["content"] for m in newest[:2]] == ["fact 129", "fact 128"]
    ranked = driver.recall("alice", query="fact", top_k=130)
    assert len({m["id"] for m in ranked}) == 130
    scores = [m["score"] for m in ranked]
    assert scores == sorted(scores, reverse=True)
    driver.close()


# -- 6. access counts: recorded by the recall, written by a background flusher -----------------


def server_count(double: AutomemDouble, memory_id: str) -> int:
    """The access count stored on the server (what another process reads)."""
    with double.lock:
        layer = double.memories[memory_id]["metadata"]["memory_layer"]
    return int(layer["access_count"])


def test_a_recall_sends_no_access_count_request(double):
    driver = make_driver(double, access_flush_seconds=60)
    driver.store_many([{"user_id": "alice", "content": f"note {i}"} for i in range(10)])
    time.sleep(3.5 * ENRICHMENT_SECONDS)
    before = double.requests
    results = driver.recall("alice", top_k=10)
    assert double.requests - before == 1  # the search alone
    assert double.patched == []
    assert len(results) == 10 and all(m["access_count"] == 1 for m in results)
    assert all(m["last_accessed_at"] is not None for m in results)
    driver.close()


def test_recalls_of_one_memory_cost_one_patch_per_flush(double):
    driver = make_driver(double, access_flush_seconds=60)
    memory = driver.store("alice", "counted five times")
    time.sleep(3.5 * ENRICHMENT_SECONDS)
    assert [driver.recall("alice")[0]["access_count"] for _ in range(5)] == [1, 2, 3, 4, 5]
    seen = driver.get(memory["id"], "alice")
    assert seen is not None and seen["access_count"] == 5  # this driver sees its counts at once
    assert server_count(double, memory["id"]) == 0
    assert driver.flush_access_counts() == 1
    assert double.patched == [f"/memory/{memory['id']}"]
    assert server_count(double, memory["id"]) == 5
    listed = driver.list_memories("alice")["items"]
    assert [m["access_count"] for m in listed] == [5]  # not added twice once written
    assert driver.flush_access_counts() == 0  # nothing left to write
    driver.close()


def test_the_flusher_thread_writes_within_the_interval(double):
    driver = make_driver(double, access_flush_seconds=0.1)
    memory = driver.store("alice", "counted in the background")
    time.sleep(3.5 * ENRICHMENT_SECONDS)
    driver.recall("alice")
    deadline = time.monotonic() + 5
    while server_count(double, memory["id"]) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_count(double, memory["id"]) == 1
    driver.close()


def test_a_result_deleted_before_the_flush_fails_nothing(double):
    driver = make_driver(double, access_flush_seconds=60)
    gone = driver.store("alice", "about to be forgotten")
    kept = driver.store("alice", "stays")
    time.sleep(3.5 * ENRICHMENT_SECONDS)
    vanish = {gone["id"]}

    def another_client_deletes(ids: list[str]) -> None:
        with double.lock:
            for memory_id in vanish & set(ids):
                del double.memories[memory_id]

    double.after_recall = another_client_deletes
    found = driver.recall("alice")  # what the search found, deleted since: no failure
    assert {m["id"] for m in found} == {gone["id"], kept["id"]}
    assert driver.flush_access_counts() == 1
    assert server_count(double, kept["id"]) == 1
    driver.close()  # nothing left to write for the gone one either


def test_an_unreachable_service_keeps_counts_for_the_next_flush(double):
    driver = make_driver(double, access_flush_seconds=60, max_tries=1)
    memory = driver.store("alice", "counted later")
    time.sleep(3.5 * ENRICHMENT_SECONDS)
    driver.recall("alice")
    double.fail_next(1, status=500)
    assert driver.flush_access_counts() == 0  # no exception
    assert driver.flush_access_counts() == 1
    assert server_count(double, memory["id"]) == 1
    driver.close()


def test_close_flushes_after_the_enrichment_window(double):
    double.enrichment_seconds = ENRICHMENT_SECONDS
    driver = make_driver(double, access_flush_seconds=60)
    memory = driver.store("alice", "counted then closed")
    assert driver.recall("alice")[0]["access_count"] == 1  # within the enrichment window
    assert driver.flush_access_counts() == 0  # enrichment could still undo it: not yet
    driver.close()
    double.settle()  # the enrichment job has written back what it read at the store
    assert server_count(double, memory["id"]) == 1
    other = make_driver(double)
    seen = other.get(memory["id"], "alice")
    assert seen is not None and seen["access_count"] == 1 and seen["last_accessed_at"]
    other.close()


def test_an_update_and_a_flush_of_the_same_memory_keep_both(double):
    driver = make_driver(double, access_flush_seconds=0.01)
    memory = driver.store("alice", "updated while counted")
    time.sleep(3.5 * ENRICHMENT_SECONDS)
    for version in range(20):
        driver.recall("alice")
        driver.update(memory["id"], "alice", metadata={"v": version})
    driver.close()
    other = make_driver(double)
    stored = other.get(memory["id"], "alice")
    other.close()
    assert stored is not None
    assert stored["metadata"] == {"v": 19} and stored["access_count"] == 20


def test_an_upsert_keeps_the_counts_flushed_since_its_lookup(double):
    driver = make_driver(double, access_flush_seconds=0.01)
    first = driver.store("alice", "Favourite colour: red", key="colour")
    time.sleep(3.5 * ENRICHMENT_SECONDS)
    for version in range(10):
        driver.recall("alice")
        driver.store("alice", f"Favourite colour: {version}", key="colour")
    driver.close()
    assert server_count(double, first["id"]) == 10


# -- 7. /health says healthy while nothing works ---------------------------------------------


def test_health_is_down_when_every_read_fails_though_health_says_healthy(double):
    driver = make_driver(double, max_tries=1)
    assert driver.health_check()["status"] == "ok"
    double.graph_down = True
    report = driver.health_check()
    assert report["status"] == "down"
    assert report["checks"]["service"]["status"] == "healthy"  # what /health itself said
    driver.close()


# -- 8. batches are slow ----------------------------------------------------------------------


def test_batches_are_sized_to_the_read_timeout(double):
    double.batch_seconds_per_item = 0.02
    driver = make_driver(double, read_timeout=0.5)
    stored = driver.store_many([{"user_id": "alice", "content": f"fact {i}"} for i in range(60)])
    assert len(stored) == 60
    assert len(double.memories) == 60
    driver.close()


def test_a_batch_that_outlasts_the_read_timeout_is_undone(double):
    double.batch_seconds_per_item = 0.02
    # The driver expects 1 ms per item, so it sends one batch of 40: 0.8 s, past 0.5 s.
    driver = make_driver(double, read_timeout=0.5, batch_item_seconds=0.001)
    with pytest.raises(BackendUnavailableError):
        driver.store_many([{"user_id": "alice", "content": f"fact {i}"} for i in range(40)])
    time.sleep(0.5)  # the server has finished the batch the driver gave up on
    assert double.memories == {}
    driver.close()


# -- 9. long content may be replaced by a summary ----------------------------------------------


def test_long_content_is_stored_as_given_or_not_at_all(double):
    double.summarise_over = 500
    driver = make_driver(double)
    long_text = " ".join(f"word{i}" for i in range(130))  # about 900 characters
    memory = driver.store("alice", long_text)
    assert memory["content"] == long_text
    assert driver.get(memory["id"])["content"] == long_text  # type: ignore[index]
    [batch] = driver.store_many([{"user_id": "alice", "content": long_text + " again"}])
    assert driver.get(batch["id"])["content"] == long_text + " again"  # type: ignore[index]
    driver.close()


def test_long_content_the_server_will_not_keep_is_refused_and_undone(double):
    double.summarise_over = 500
    double.summarise_patches = True  # putting it back does not help either
    driver = make_driver(double)
    long_text = " ".join(f"word{i}" for i in range(130))
    kept = driver.store("alice", "short and kept")
    with pytest.raises(BackendUnavailableError, match="summary"):
        driver.store("alice", long_text)
    with pytest.raises(BackendUnavailableError, match="summary"):
        driver.store_many([{"user_id": "alice", "content": "short"},
                           {"user_id": "alice", "content": long_text}])
    assert [m["id"] for m in driver.list_memories("alice")["items"]] == [kept["id"]]
    driver.close()


def test_knowledge_chunks_fit_under_the_summarising_limit(double):
    double.summarise_over = 500
    driver = make_driver(double)
    text = " ".join(f"Section {i}: the warehouse in zone {i} stores spare parts."
                    for i in range(60))
    document = driver.store_global_knowledge(text, "operations", doc_id="warehouses")
    chunks = [m["content"] for m in double.memories.values()]
    assert len(chunks) == document["chunk_count"] > 1
    assert not any(chunk.startswith("Summary:") for chunk in chunks)
    assert all(word in " ".join(chunks) for word in text.split())
    driver.close()


# -- 11. JSON answers that are not objects ---------------------------------------------------


@pytest.mark.parametrize("answer", [[], "ok"])
def test_json_that_is_not_an_object_is_a_backend_error_not_a_crash(double, answer):
    driver = make_driver(double, read_timeout=0.5)
    memory = driver.store("alice", "Prefers dark mode")
    double.non_object_next(1, answer)
    assert [m["id"] for m in driver.recall("alice")] == [memory["id"]]  # retried
    for call in (lambda: driver.recall("alice"), lambda: driver.get(memory["id"]),
                 lambda: driver.store("alice", "another")):
        double.non_object_next(3, answer)
        with pytest.raises(BackendUnavailableError):
            call()
    double.non_object_next(1, answer)
    assert driver.health_check()["status"] == "down"
    driver.close()


# -- records written by the driver before issue 14 --------------------------------------------


def legacy_item(user_id: str, content: str, *, tags: list[str] | None = None,
                key: str | None = None, deleted: bool = False) -> dict[str, object]:
    """A memory as the driver before issue 14 wrote it (its ``_server_item``, restated)."""
    now = datetime.now(UTC).isoformat()
    server_tags = ["memory-layer:memory", f"user:{user_id}", "namespace:default"]
    server_tags += [f"key:{key}"] if key else []
    server_tags += (tags or []) + (["memory-layer:deleted"] if deleted else [])
    layer = {"kind": "memory", "user_id": user_id, "agent_id": None, "conversation_id": None,
             "namespace": "default", "key": key, "tags": tags or [], "access_count": 0,
             "last_accessed_at": None, "expires_at": None,
             "deleted_at": now if deleted else None, "created_at": now, "updated_at": now}
    return {"content": content, "tags": server_tags, "importance": 0.5, "timestamp": now,
            "metadata": {"memory_layer": layer, "data": {}}}


def test_records_of_the_previous_driver_are_found_after_upgrading_them(double):
    driver = make_driver(double)
    now = datetime.now(UTC).isoformat()
    with double.lock:
        kept, gone, other = (double._create(item) for item in (
            legacy_item("alice", "likes green tea", tags=["pref"], key="drink"),
            legacy_item("alice", "was deleted", deleted=True),
            legacy_item("Alice", "another user")))
        double._create({"content": "Refunds take 14 days.", "importance": 0.5,
                        "tags": ["memory-layer:knowledge", "category:ops", "document:refunds"],
                        "metadata": {"memory_layer": {
                            "kind": "knowledge", "doc_id": "refunds", "category": "ops",
                            "title": None, "chunk_index": 0, "chunk_count": 1,
                            "document_metadata": {}, "updated_at": now}}})
        double._create({"content": "User record bob", "importance": 0.5,
                        "tags": ["memory-layer:user", "user:bob"],
                        "metadata": {"memory_layer": {
                            "kind": "user", "user_id": "bob", "display_name": "Bob",
                            "profile": {"tz": "UTC"}, "created_at": now, "updated_at": now}}})
    assert driver.recall("alice") == []  # the new mapping does not see the old records
    assert driver.upgrade_legacy_records() == 5
    assert driver.upgrade_legacy_records() == 0
    assert [m["id"] for m in driver.recall("alice")] == [kept]
    assert [m["id"] for m in driver.recall("alice", tags=["pref"])] == [kept]
    assert [m["id"] for m in driver.recall("Alice")] == [other]
    assert driver.get(gone, "alice") is None
    assert driver.restore(gone, "alice") is True
    assert driver.store("alice", "likes black tea", key="drink")["id"] == kept
    assert [k["doc_id"] for k in driver.recall_global_knowledge("refunds")] == ["refunds"]
    assert driver.get_profile("bob") == {"tz": "UTC"}
    driver.close()
