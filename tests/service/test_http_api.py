"""The HTTP API over a real uvicorn server on 127.0.0.1, on SQLite and on PostgreSQL: every
endpoint, the key rules (401/403/404), the error shape and the body limit."""

from __future__ import annotations

import time
from typing import Any

import httpx

from app.service.http_api import KEY_CACHE_SECONDS
from tests.service.conftest import Service, unique


def error_of(response: httpx.Response, status: int, kind: str) -> str:
    """Assert the one error shape; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    assert "Traceback" not in response.text
    return str(body["error"]["message"])


def test_every_memory_endpoint(service: Service) -> None:
    user = unique("carol")
    service.add_key(user, user)
    with service.client(user) as http:
        stored = http.post("/v1/memories", json={
            "content": "Prefers dark mode in every editor", "tags": ["ui"],
            "metadata": {"source": "chat"}, "importance": 0.9, "conversation_id": "c1",
            "occurred_at": "2023-05-07T14:30:00+02:00"})
        assert stored.status_code == 201, stored.text
        memory = stored.json()
        assert memory["user_id"] == user and memory["tags"] == ["ui"]
        assert memory["occurred_at"] == "2023-05-07T12:30:00Z"  # ISO 8601, in UTC
        assert "score" not in memory  # records as the library returns them

        batch = http.post("/v1/memories/batch", json={"items": [
            {"content": "Cycles to work along the river", "tags": ["personal"],
             "occurred_at": "2031-01-01T00:00:00Z"},
            {"content": "Is allergic to peanuts", "key": "diet"}]})
        assert batch.status_code == 201, batch.text
        assert [m["user_id"] for m in batch.json()["items"]] == [user, user]
        dated, undated = batch.json()["items"]
        assert dated["occurred_at"] == "2031-01-01T00:00:00Z"
        assert undated["occurred_at"] == undated["created_at"]
        naive = http.post("/v1/memories", json={"content": "x", "occurred_at": "2023-05-07T14:30"})
        message = error_of(naive, 422, "invalid_input")
        assert "occurred_at" in message
        assert "ISO 8601 time with a UTC offset" in message  # the rule as JSON writes it

        found = http.post("/v1/memories/search", json={"query": "editor colour theme",
                                                        "top_k": 1})
        assert found.status_code == 200, found.text
        results = found.json()["results"]
        assert [m["id"] for m in results] == [memory["id"]] and 0 <= results[0]["score"] <= 1
        keyword = http.post("/v1/memories/search", json={"query": "peanuts",
                                                          "use_vector": False,
                                                          "exclude_tags": ["ui"]})
        assert [m["content"] for m in keyword.json()["results"]] == ["Is allergic to peanuts"]
        windowed = http.post("/v1/memories/search", json={
            "query": "editor theme", "start": "2023-01-01T00:00:00Z",
            "end": "2023-12-31T00:00:00+00:00", "context": 1})
        assert windowed.status_code == 200, windowed.text
        assert [(m["id"], m["context"]) for m in windowed.json()["results"]] == [
            (memory["id"], [])]  # the only memory of 2023, alone in its conversation
        assert "context" not in results[0]
        naive = http.post("/v1/memories/search", json={"query": "x", "start": "2023-01-01"})
        assert "start" in error_of(naive, 422, "invalid_input")

        first = http.get("/v1/memories", params={"limit": 2})
        assert first.status_code == 200 and len(first.json()["items"]) == 2
        rest = http.get("/v1/memories", params={"limit": 2,
                                                "cursor": first.json()["next_cursor"]})
        assert len(rest.json()["items"]) == 1 and rest.json()["next_cursor"] is None
        tagged = http.get("/v1/memories", params={"tag": "ui"}).json()["items"]
        assert [m["id"] for m in tagged] == [memory["id"]]

        memory_url = f"/v1/memories/{memory['id']}"
        assert http.get(memory_url).json()["content"] == memory["content"]
        changed = http.patch(memory_url, json={"content": "Prefers light mode", "tags": [],
                                               "occurred_at": "2024-02-29T08:00:00Z"})
        assert changed.status_code == 200 and changed.json()["content"] == "Prefers light mode"
        assert changed.json()["occurred_at"] == "2024-02-29T08:00:00Z"
        assert http.get(memory_url).json()["occurred_at"] == "2024-02-29T08:00:00Z"
        assert changed.json()["tags"] == []
        assert http.delete(memory_url).json() == {"id": memory["id"], "done": True}
        error_of(http.get(memory_url), 404, "not_found")
        error_of(http.delete(memory_url), 404, "not_found")
        assert http.get(memory_url, params={"include_deleted": True}).status_code == 200
        assert http.post(memory_url + "/restore").status_code == 200
        assert http.get(memory_url).status_code == 200
        error_of(http.post(memory_url + "/restore"), 404, "not_found")


def test_users_profiles_and_forget(service: Service) -> None:
    user = unique("dave")
    with service.client("admin") as admin:
        created = admin.post("/v1/users", json={"user_id": user, "display_name": "Dave"})
        assert created.status_code == 201 and created.json()["user_id"] == user
        generated = admin.post("/v1/users", json={}).json()["user_id"]
        assert generated.startswith("user_") and len(generated) == 13
        error_of(admin.post("/v1/users", json={"user_id": user}), 422, "invalid_input")
        service.add_key(user, user)
    with service.client(user) as http:
        profile = http.put(f"/v1/users/{user}/profile", json={"profile": {"tz": "Europe/Lisbon"}})
        assert profile.json() == {"user_id": user, "profile": {"tz": "Europe/Lisbon"}}
        merged = http.put(f"/v1/users/{user}/profile",
                          json={"profile": {"lang": "pt"}, "merge": True})
        assert merged.json()["profile"] == {"tz": "Europe/Lisbon", "lang": "pt"}
        assert http.get(f"/v1/users/{user}/profile").json()["profile"]["lang"] == "pt"
        http.post("/v1/memories", json={"content": "Likes tea"})
        shown = http.get(f"/v1/users/{user}").json()
        assert shown["display_name"] == "Dave" and shown["stats"]["memories"] == 1
        erased = http.delete(f"/v1/users/{user}")  # a user key may erase its own user
        assert erased.json() == {"user_id": user, "erased_memories": 1}
        error_of(http.get(f"/v1/users/{user}"), 404, "not_found")


def test_knowledge_stats_and_keys(service: Service) -> None:
    doc = unique("refunds")
    with service.client("admin") as admin:
        stored = admin.post("/v1/knowledge", json={
            "content": "Refunds are paid within 14 days of the return.", "category": "policies",
            "doc_id": doc, "title": "Refunds"})
        assert stored.status_code == 201 and stored.json()["chunk_count"] == 1
        stats = admin.get("/v1/stats")
        assert stats.status_code == 200 and stats.json()["knowledge"]["documents"] >= 1
        made = admin.post("/v1/keys", json={"user_id": "erin", "name": "erin's agent"})
        assert made.status_code == 201
        new_key = made.json()["key"]
        listed = admin.get("/v1/keys").json()["keys"]
        assert made.json()["id"] in [k["id"] for k in listed]
        assert new_key not in str(listed) and all("hash" not in k for k in listed)
        error_of(admin.post("/v1/keys", json={"user_id": "erin", "admin": True}), 422,
                 "invalid_input")
    with service.client("alice") as alice:
        found = alice.post("/v1/knowledge/search", json={"query": "when do I get my money back",
                                                          "top_k": 1})
        assert found.status_code == 200 and found.json()["results"][0]["doc_id"] == doc
    with httpx.Client(base_url=service.url,
                      headers={"Authorization": f"Bearer {new_key}"}) as erin:
        assert erin.post("/v1/memories", json={"content": "x"}).json()["user_id"] == "erin"
        with service.client("admin") as admin:
            assert admin.delete(f"/v1/keys/{made.json()['id']}").status_code == 200
            error_of(admin.delete(f"/v1/keys/{made.json()['id']}"), 404, "not_found")
        error_of(erin.post("/v1/memories", json={"content": "y"}), 401, "unauthorized")
    with service.client("admin") as admin:
        assert admin.delete(f"/v1/knowledge/{doc}").status_code == 200
        error_of(admin.delete(f"/v1/knowledge/{doc}"), 404, "not_found")


def test_keys_decide_who_may_do_what(service: Service) -> None:
    with service.client("bob") as bob:
        bobs = bob.post("/v1/memories", json={"content": "Bob's secret plan"}).json()
    with httpx.Client(base_url=service.url) as anonymous:
        missing = anonymous.post("/v1/memories/search", json={"query": "plan"})
        error_of(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        for header in ("Bearer mem_not-a-real-key", "Basic abc", "Bearer", "mem_x"):
            error_of(anonymous.get("/v1/memories", headers={"Authorization": header}), 401,
                     "unauthorized")
        assert anonymous.get("/health").status_code == 200  # no key needed
    revoked_user = unique("frank")
    key = service.add_key(revoked_user, revoked_user)
    assert service.store.revoke(service.key_ids[revoked_user])
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}) as gone:
        error_of(gone.get("/v1/memories"), 401, "unauthorized")
    # A key in use, revoked by another process (`keys revoke`): refused once the server's memory
    # of active keys has lapsed (KEY_CACHE_SECONDS). Revoking through the API is immediate (the
    # erin key in test_knowledge_stats_and_keys).
    used_user = unique("gina")
    key = service.add_key(used_user, used_user)
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}) as used:
        assert used.get("/v1/memories").status_code == 200
        assert service.store.revoke(service.key_ids[used_user])
        time.sleep(KEY_CACHE_SECONDS + 0.2)
        error_of(used.get("/v1/memories"), 401, "unauthorized")

    with service.client("alice") as alice:
        # Naming another user: 403. Another user's memory by id: 404, as if it did not exist.
        error_of(alice.post("/v1/memories", json={"content": "x", "user_id": "bob"}), 403,
                 "forbidden")
        error_of(alice.post("/v1/memories/search", json={"query": "plan", "user_id": "bob"}),
                 403, "forbidden")
        error_of(alice.get("/v1/memories", params={"user_id": "bob"}), 403, "forbidden")
        error_of(alice.post("/v1/memories/batch", json={"items": [
            {"content": "mine"}, {"content": "theirs", "user_id": "bob"}]}), 403, "forbidden")
        for call in (alice.get(f"/v1/memories/{bobs['id']}"),
                     alice.patch(f"/v1/memories/{bobs['id']}", json={"content": "mine now"}),
                     alice.delete(f"/v1/memories/{bobs['id']}"),
                     alice.post(f"/v1/memories/{bobs['id']}/restore")):
            error_of(call, 404, "not_found")
        error_of(alice.get(f"/v1/memories/{bobs['id']}", params={"user_id": "bob"}), 403,
                 "forbidden")
        searched = alice.post("/v1/memories/search", json={"query": "secret plan"}).json()
        assert bobs["id"] not in str(searched)
        error_of(alice.get("/v1/users/bob"), 403, "forbidden")
        error_of(alice.put("/v1/users/bob/profile", json={"profile": {}}), 403, "forbidden")
        error_of(alice.delete("/v1/users/bob"), 403, "forbidden")
        error_of(alice.post("/v1/users", json={"user_id": "bob"}), 403, "forbidden")
        error_of(alice.get("/v1/stats"), 403, "forbidden")
        error_of(alice.post("/v1/knowledge", json={"content": "x", "category": "c"}), 403,
                 "forbidden")
        error_of(alice.delete("/v1/knowledge/anything"), 403, "forbidden")
        error_of(alice.get("/v1/keys"), 403, "forbidden")
        error_of(alice.post("/v1/keys", json={"admin": True}), 403, "forbidden")
    with service.client("bob") as bob:
        assert bob.get(f"/v1/memories/{bobs['id']}").json()["content"] == "Bob's secret plan"
    with service.client("admin") as admin:
        # An admin names the user; by id without one it is an operator's call on the id alone.
        error_of(admin.post("/v1/memories/search", json={"query": "plan"}), 422, "invalid_input")
        assert admin.get(f"/v1/memories/{bobs['id']}").status_code == 200
        error_of(admin.get(f"/v1/memories/{bobs['id']}", params={"user_id": "alice"}), 404,
                 "not_found")
        hits = admin.post("/v1/memories/search", json={"query": "secret plan", "user_id": "bob"})
        assert bobs["id"] in [m["id"] for m in hits.json()["results"]]


def test_error_shapes_and_body_limit(service: Service) -> None:
    with service.client("alice") as alice:
        message = error_of(alice.post("/v1/memories/search", json={"top_k": 0}), 422,
                           "invalid_input")
        assert "top_k" in message
        message = error_of(alice.post("/v1/memories", json={"content": "x", "tags": ["a,b"]}),
                           422, "invalid_input")
        assert "tags" in message
        message = error_of(alice.post("/v1/memories", json={"content": 5, "bogus": True}),
                           422, "invalid_input")
        assert "content" in message and "bogus" in message
        error_of(alice.post("/v1/memories", content=b"{not json",
                            headers={"content-type": "application/json"}), 422, "invalid_input")
        error_of(alice.get("/v1/nothing-here"), 404, "not_found")
        error_of(alice.put("/v1/memories"), 405, "method_not_allowed")
        # The limit of these servers is 64 KiB: a declared length over it, and a streamed body
        # without a length that grows past it.
        big: dict[str, Any] = {"content": "x" * 70_000}
        error_of(alice.post("/v1/memories", json=big), 413, "payload_too_large")

        def chunks() -> Any:
            yield b'{"content": "'
            for _ in range(80):
                yield b"y" * 1024
            yield b'"}'

        streamed = alice.post("/v1/memories", content=chunks(),
                              headers={"content-type": "application/json"})
        error_of(streamed, 413, "payload_too_large")
        assert alice.post("/v1/memories", json={"content": "still fine"}).status_code == 201


def test_health_and_openapi(service: Service) -> None:
    with httpx.Client(base_url=service.url) as http:
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["model_loaded"] is True
        assert health["driver"]["driver"] == service.driver
        schema = http.get("/openapi.json").json()
        paths = schema["paths"]
        for path in ("/v1/memories", "/v1/memories/batch", "/v1/memories/search",
                     "/v1/memories/{memory_id}", "/v1/memories/{memory_id}/restore",
                     "/v1/knowledge", "/v1/knowledge/search", "/v1/knowledge/{doc_id}",
                     "/v1/users", "/v1/users/{user_id}", "/v1/users/{user_id}/profile",
                     "/v1/stats", "/health"):
            assert path in paths, path
        assert http.get("/docs").status_code == 200
