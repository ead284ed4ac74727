"""The MCP server through the ``mcp`` SDK's own client: over stdio (spawning ``python -m app mcp``)
and over streamable HTTP at ``/mcp`` of a live server, where the key decides the user."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.service.conftest import Service, service_env, unique

TOOLS = {"store_memory", "recall_memory", "update_memory", "delete_memory", "list_memories",
         "search_knowledge"}


async def exercise(client: Client, user: str) -> None:
    """List the tools, store and recall through them, and send bad arguments."""
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 30, tool.name
        assert tool.input_schema["type"] == "object"
    assert "user_id" not in tools["store_memory"].input_schema["properties"]
    assert "content" in tools["store_memory"].input_schema["required"]

    assert "ISO 8601" in tools["store_memory"].input_schema["properties"]["occurred_at"][
        "description"]
    stored = await client.call_tool("store_memory", {"content": "Prefers dark mode everywhere",
                                                     "tags": ["ui"], "key": "theme",
                                                     "occurred_at": "2023-05-07T14:30:00+02:00"})
    assert not stored.is_error, stored.content
    memory = stored.structured_content["memory"]
    assert memory["user_id"] == user and memory["tags"] == ["ui"]
    assert memory["occurred_at"] == "2023-05-07T12:30:00Z"
    assert memory["id"] in stored.content[0].text

    recalled = await client.call_tool("recall_memory", {"query": "which colour theme?"})
    assert not recalled.is_error
    results = recalled.structured_content["results"]
    assert [r["id"] for r in results] == [memory["id"]] and results[0]["score"] > 0
    assert "dark mode" in recalled.content[0].text
    later = await client.call_tool("recall_memory", {"query": "which colour theme?", "context": 2,
                                                     "start": "2024-01-01T00:00:00Z"})
    assert not later.is_error and later.structured_content["results"] == []
    dated = await client.call_tool("recall_memory", {"query": "which colour theme?", "context": 2,
                                                     "end": "2023-12-31T00:00:00Z"})
    assert [(r["id"], r["context"]) for r in dated.structured_content["results"]] == [
        (memory["id"], [])]

    updated = await client.call_tool("update_memory", {"memory_id": memory["id"],
                                                       "content": "Prefers light mode",
                                                       "occurred_at": "2024-02-29T08:00:00Z"})
    assert updated.structured_content["memory"]["content"] == "Prefers light mode"
    assert updated.structured_content["memory"]["occurred_at"] == "2024-02-29T08:00:00Z"
    listed = await client.call_tool("list_memories", {"limit": 5})
    assert [m["id"] for m in listed.structured_content["items"]] == [memory["id"]]

    # Bad arguments: a tool error with the library's message, and the server lives on.
    bad = await client.call_tool("recall_memory", {"query": "x", "top_k": 0})
    assert bad.is_error and "top_k" in bad.content[0].text
    missing = await client.call_tool("store_memory", {"tags": ["no content"]})
    assert missing.is_error and "content" in missing.content[0].text
    wrong_type = await client.call_tool("store_memory", {"content": "x", "importance": "high"})
    assert wrong_type.is_error and "importance" in wrong_type.content[0].text
    for when in ("last Tuesday", "2023-05-07T14:30:00", "0001-01-01T00:00:00Z"):
        undated = await client.call_tool("store_memory", {"content": "x", "occurred_at": when})
        assert undated.is_error and "occurred_at" in undated.content[0].text, when
    nothing = await client.call_tool("delete_memory", {"memory_id": "no-such-memory"})
    assert nothing.is_error and "no memory" in nothing.content[0].text

    deleted = await client.call_tool("delete_memory", {"memory_id": memory["id"]})
    assert deleted.structured_content == {"id": memory["id"], "deleted": True}
    after = await client.call_tool("recall_memory", {"query": "theme"})
    assert after.structured_content == {"results": []}
    knowledge = await client.call_tool("search_knowledge", {"query": "anything"})
    assert not knowledge.is_error and "results" in knowledge.structured_content


def test_stdio(tmp_path: Path) -> None:
    from tests.conftest import migrate_sqlite

    env = service_env(tmp_path, "sqlite")
    migrate_sqlite(Path(env["MEMORY_SQLITE_PATH"]))
    params = StdioServerParameters(command=sys.executable, args=["-m", "app", "mcp", "--user",
                                                                 "stdio_user"],
                                   env=env, cwd=str(tmp_path))

    async def main() -> None:
        with anyio.fail_after(240):
            async with Client(params) as client:
                await exercise(client, "stdio_user")

    anyio.run(main)


def http_client(service: Service, who: str | None, **headers: str) -> Client:
    if who:
        headers["Authorization"] = f"Bearer {service.keys[who]}"
    transport = streamable_http_client(f"{service.url}/mcp",
                                       http_client=httpx2.AsyncClient(headers=headers,
                                                                      timeout=60))
    return Client(transport)


@pytest.mark.parametrize("driver", ["sqlite"])
def test_streamable_http(driver: str, request: pytest.FixtureRequest) -> None:
    service: Service = request.getfixturevalue(f"{driver}_service")
    user = unique("mcp")
    service.add_key(user, user)

    async def main() -> None:
        with anyio.fail_after(120):
            async with http_client(service, user) as client:
                await exercise(client, user)
            # An admin key names the user in X-Memory-User; without it, a tool error.
            async with http_client(service, "admin", **{"X-Memory-User": user}) as admin:
                listed = await admin.call_tool("list_memories", {})
                assert not listed.is_error
            async with http_client(service, "admin") as admin:
                refused = await admin.call_tool("list_memories", {})
                assert refused.is_error and "X-Memory-User" in refused.content[0].text

    anyio.run(main)
    # No key, a wrong key: 401 in the service's error shape, before any MCP session exists.
    for headers in ({}, {"Authorization": "Bearer mem_wrong"}):
        answer = httpx.post(f"{service.url}/mcp", headers={
            **headers, "Accept": "application/json, text/event-stream"}, json={
            "jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert answer.status_code == 401
        assert answer.json()["error"]["type"] == "unauthorized"
