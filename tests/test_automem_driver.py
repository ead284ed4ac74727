"""The automem driver against faults caused for real over HTTP (a port nobody listens on, a
server that hangs, 5xx answers, garbage bodies, a wrong token) and against a service that returns
more than it was asked for; plus the API details the driver must get right."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from app.core.memory import BackendUnavailableError, InvalidInputError
from app.core.memory.drivers.automem_driver import AutomemDriver
from app.core.memory.drivers.automem_mapping import caller_tag, user_tag
from tests.automem_double import AutomemDouble

TOKEN = "s3cret-token-value"


@pytest.fixture
def service() -> Iterator[tuple[AutomemDouble, str]]:
    # Every behaviour of the real server on (enrichment, queued embedding, prefix exclusion,
    # slow batches, summaries): the faults below must hold through all of them.
    double = AutomemDouble.realistic(token=TOKEN)
    url = double.start()
    yield double, url
    double.stop()


def make_driver(url: str, **options: object) -> AutomemDriver:
    settings: dict[str, object] = {"token": TOKEN, "connect_timeout": 0.5, "read_timeout": 0.5,
                                   "max_tries": 3, "backoff_seconds": 0.05,
                                   "enrichment_window": 0.25,
                                   # Access counts written by close() or an explicit flush, not
                                   # by a background write that could take a fault a test injects
                                   # for the call it makes.
                                   "access_flush_seconds": 60}
    settings.update(options)
    return AutomemDriver(url=url, **settings)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_server_not_listening_ends_in_backend_unavailable_quickly():
    driver = make_driver(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="after 3 tries"):
        driver.recall("alice", query="anything")
    assert time.monotonic() - started < 3
    report = driver.health_check()
    assert report["status"] == "down"
    driver.close()


def test_a_hanging_server_times_out_within_the_configured_time(service):
    double, url = service
    driver = make_driver(url, max_tries=2)
    stored = driver.store("alice", "before the hang")
    double.hang_seconds = 2.0
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="after 2 tries"):
        driver.get(stored["id"], "alice")
    assert time.monotonic() - started < 2.5  # 2 x 0.5 s read timeout + 0.05 s backoff
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="may or may not"):
        driver.store("alice", "a store is not repeated after a timeout")
    # Not repeated: one timeout, then the undo gives the server two read timeouts to finish.
    assert time.monotonic() - started < 4.0
    assert driver.health_check()["status"] == "down"
    double.hang_seconds = 0.0
    driver.close()


def test_5xx_answers_are_retried_until_success(service):
    double, url = service
    driver = make_driver(url)
    driver.store("alice", "Prefers dark mode")
    double.fail_next(2, status=503)
    before = double.requests
    results = driver.recall("alice", query="dark mode", use_vector=False)
    assert [m["content"] for m in results] == ["Prefers dark mode"]
    assert double.requests - before == 3  # two failures, then the answer (no access writes)
    double.fail_next(3, status=500)
    with pytest.raises(BackendUnavailableError, match="HTTP 500"):
        driver.recall("alice", query="dark mode")
    driver.close()


def test_garbage_bodies_are_retried_then_reported(service):
    double, url = service
    driver = make_driver(url)
    driver.store("alice", "Prefers dark mode")
    double.garbage_next(1)
    assert len(driver.recall("alice")) == 1
    double.garbage_next(3)
    with pytest.raises(BackendUnavailableError, match="unreadable"):
        driver.recall("alice")
    double.garbage_next(1)
    assert driver.health_check()["status"] == "down"
    driver.close()


def test_a_wrong_token_is_reported_without_revealing_any_token(service):
    _, url = service
    driver = make_driver(url, token="wrong-token-value")
    with pytest.raises(BackendUnavailableError, match="AUTOMEM_API_TOKEN") as raised:
        driver.recall("alice")
    assert "wrong-token-value" not in str(raised.value)
    report = driver.health_check()
    assert report["status"] == "down" and report["checks"]["auth"]["status"] == "unauthorized"
    assert "wrong-token-value" not in repr(report) and TOKEN not in repr(report)
    driver.close()


def test_tenancy_holds_when_the_service_returns_more_than_asked(service):
    double, url = service
    driver = make_driver(url)
    driver.store("bob", "Bob's password hint is blue falcon", tags=["user:alice"])
    driver.store("Alice", "Capital-A Alice is another user")
    mine = driver.store("alice", "Alice likes tea")
    double.leak_other_scopes = True
    for query in (None, "password hint blue falcon", "Alice user"):
        results = driver.recall("alice", query=query, top_k=10)
        assert [m["id"] for m in results] == [mine["id"]]
    # The server matches tags case-insensitively; forgetting "alice" must spare "Alice".
    assert driver.forget_user("alice") == 1
    assert [m["content"] for m in driver.recall("Alice")] == ["Capital-A Alice is another user"]
    assert len(driver.recall("bob")) == 1
    driver.close()


def test_content_over_the_server_limit(service):
    double, url = service
    driver = make_driver(url)
    with pytest.raises(InvalidInputError, match="2000 characters"):
        driver.store("alice", "x" * 2001)
    with pytest.raises(InvalidInputError, match=r"items\[1\]"):
        driver.store_many([{"user_id": "alice", "content": "fine"},
                           {"user_id": "alice", "content": "y" * 2001}])
    assert double.memories == {}
    document = driver.store_global_knowledge("z" * 5000, "misc", doc_id="long-word")
    assert document["chunk_count"] == 10  # within the server's 500-character summarising limit
    assert all(len(m["content"]) <= 500 for m in double.memories.values())
    driver.close()


def test_store_many_stores_in_batches_and_leaves_nothing_on_failure(service):
    double, url = service
    driver = make_driver(url)
    stored = driver.store_many([{"user_id": "alice", "content": f"fact {i}"} for i in range(300)])
    assert len(stored) == 300 and len({m["id"] for m in stored}) == 300
    assert [m["content"] for m in stored[:3]] == ["fact 0", "fact 1", "fact 2"]
    driver.forget_user("alice")
    kept = driver.store("alice", "kept", key="k")
    items = [{"user_id": "alice", "content": "replaces kept", "key": "k"}]
    items += [{"user_id": "alice", "content": f"new {i}"} for i in range(150)]

    original_route = double.route
    calls = {"batches": 0}

    def second_batch_fails(method, path, query, body):
        if path == "/memory/batch":
            calls["batches"] += 1
            if calls["batches"] >= 2:  # the second batch fails on every try
                from tests.automem_double import HttpError

                raise HttpError(500, "storage failed")
        return original_route(method, path, query, body)

    double.route = second_batch_fails  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailableError):
        driver.store_many(items)
    double.route = original_route  # type: ignore[method-assign]
    remaining = driver.list_memories("alice", limit=1000)["items"]
    assert [m["content"] for m in remaining] == ["kept"]
    assert remaining[0]["id"] == kept["id"]
    driver.close()


def test_recall_speaks_the_api_as_documented(service):
    double, url = service
    driver = make_driver(url)
    driver.store("alice", "tagged", tags=["a", "b"])
    seen: list[dict[str, list[str]]] = []
    original_route = double.route

    def record(method, path, query, body):
        if path == "/recall":
            seen.append(query)
        return original_route(method, path, query, body)

    double.route = record  # type: ignore[method-assign]
    driver.recall("alice", query="tagged", tags=["a", "b"], exclude_tags=["c"])
    double.route = original_route  # type: ignore[method-assign]
    asked = seen[0]
    assert asked["tags"] == ["memory-layer:memory", user_tag("alice"), caller_tag("a"),
                             caller_tag("b")]  # repeated, not a,b
    assert asked["tag_mode"] == ["all"] and asked["tag_match"] == ["exact"]
    assert asked["exclude_tags"] == [caller_tag("c")]
    driver.close()


def test_the_real_server_settings_are_read_from_the_environment():
    from config.settings import Settings

    settings = Settings.from_env({"AUTOMEM_ENRICHMENT_WINDOW": "1.5", "AUTOMEM_BATCH_SIZE": "40",
                                  "AUTOMEM_CONTENT_SOFT_LIMIT": "800"})
    assert (settings.automem_enrichment_window, settings.automem_batch_size,
            settings.automem_content_soft_limit) == (1.5, 40, 800)
    defaults = Settings.from_env({})
    assert (defaults.automem_enrichment_window, defaults.automem_batch_size,
            defaults.automem_content_soft_limit) == (0.5, 100, 500)
    flush = Settings.from_env({"AUTOMEM_ACCESS_FLUSH_SECONDS": "2.5"}).automem_access_flush_seconds
    assert (flush, defaults.automem_access_flush_seconds) == (2.5, 1.0)
