"""503s over HTTP: a database without the schema, and a PostgreSQL that is not there. /health
still answers (it never fails), and the error names what to do."""

from __future__ import annotations

from pathlib import Path

import httpx

from app.core.memory.aio import AsyncMemoryDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from tests.service.conftest import ThreadServer, free_port


def test_unmigrated_database_is_503_naming_migrate(tmp_path: Path,
                                                   embedder: SentenceTransformerEmbedder) -> None:
    from app.core.memory.drivers.sqlite_driver import SqliteDriver
    from app.service.http_api import create_app

    driver = AsyncMemoryDriver(SqliteDriver(path=tmp_path / "empty.sqlite3", embedder=embedder))
    port = free_port()
    with ThreadServer(create_app(driver=driver, auth=False, mcp=False), port):
        url = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{url}/v1/memories", json={"user_id": "u1", "content": "x"})
        assert answer.status_code == 503 and answer.headers["retry-after"].isdigit()
        error = answer.json()["error"]
        assert error["type"] == "schema_not_migrated" and "migrate.py" in error["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] != "ok"


def test_unreachable_postgres_is_503(embedder: SentenceTransformerEmbedder) -> None:
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver
    from app.service.http_api import create_app

    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/memory"
    driver = AsyncMemoryDriver(PgvectorDriver(url=nowhere, embedder=embedder, pool_timeout=1,
                                              connect_timeout=1))
    port = free_port()
    with ThreadServer(create_app(driver=driver, auth=False, mcp=False), port):
        url = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{url}/v1/memories/search", json={"user_id": "u1", "query": "x"},
                            timeout=30)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["type"] == "backend_unavailable"
        assert "Traceback" not in answer.text
        health = httpx.get(f"{url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "down"
