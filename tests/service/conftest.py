"""Live services for the service tests: real uvicorn servers on 127.0.0.1 on free ports.

``sqlite_service`` and ``pgvector_service`` run the app in this process (a uvicorn server on a
thread of its own, over a driver built here with the run's shared model, so starting one is
quick);
``service`` is either, for tests that run on both. ``start_process`` runs ``python -m app serve``
as a real process, for what only a process shows (start-up refusals, SIGTERM, load).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.keys import KeyStore
from app.core.keys.sqlite_key_store import SqliteKeyStore
from app.core.memory.aio import AsyncMemoryDriver
from app.core.memory.embeddings import SentenceTransformerEmbedder
from app.service.keys import create_key
from tests.conftest import PROJECT_ROOT, migrate_postgres, migrate_sqlite, temporary_database


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Service:
    """A running server and the keys made for it: ``admin``, ``alice``, ``bob``."""

    driver: str
    url: str
    keys: dict[str, str]
    key_ids: dict[str, str]
    store: KeyStore
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, who: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def add_key(self, who: str, user_id: str | None) -> str:
        record, key = create_key(self.store, user_id=user_id, name=who)
        self.keys[who], self.key_ids[who] = key, record.id
        return key


def _make_keys(store: KeyStore) -> tuple[dict[str, str], dict[str, str]]:
    keys: dict[str, str] = {}
    ids: dict[str, str] = {}
    for who, user in (("admin", None), ("alice", "alice"), ("bob", "bob")):
        record, key = create_key(store, user_id=user, name=who)
        keys[who], ids[who] = key, record.id
    return keys, ids


class ThreadServer:
    """``create_app`` under a real uvicorn server, on a thread of this process."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{port}",
                                       daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def _serve_in_thread(driver_name: str, driver: AsyncMemoryDriver,
                     store: KeyStore) -> Iterator[Service]:
    from app.service.http_api import create_app

    keys, ids = _make_keys(store)
    port = free_port()
    app = create_app(driver=driver, key_store=store, auth=True, max_body_bytes=64 * 1024)
    with ThreadServer(app, port):
        yield Service(driver_name, f"http://127.0.0.1:{port}", keys, ids, store)


@pytest.fixture(scope="session")
def sqlite_service(tmp_path_factory: pytest.TempPathFactory,
                   embedder: SentenceTransformerEmbedder) -> Iterator[Service]:
    from app.core.memory.drivers.sqlite_driver import SqliteDriver

    path = migrate_sqlite(tmp_path_factory.mktemp("service") / "memory.sqlite3")
    driver = AsyncMemoryDriver(SqliteDriver(path=path, embedder=embedder), max_workers=8)
    yield from _serve_in_thread("sqlite", driver, SqliteKeyStore(path))


@pytest.fixture(scope="session")
def service_pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database of the service tests' own, dropped at the end."""
    with temporary_database("memory_service_") as url:
        yield migrate_postgres(url)


@pytest.fixture(scope="session")
def pgvector_service(service_pg_url: str,
                     embedder: SentenceTransformerEmbedder) -> Iterator[Service]:
    from app.core.keys.postgres_key_store import PostgresKeyStore
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    driver = AsyncMemoryDriver(PgvectorDriver(url=service_pg_url, embedder=embedder,
                                              pool_max_size=8), max_workers=8)
    yield from _serve_in_thread("pgvector", driver, PostgresKeyStore(service_pg_url))


@pytest.fixture(params=["sqlite", "pgvector"])
def service(request: pytest.FixtureRequest) -> Service:
    """The in-process server on each driver in turn."""
    return request.getfixturevalue(f"{request.param}_service")  # type: ignore[no-any-return]


def unique(prefix: str) -> str:
    """A user id no other test uses (the servers are shared by the whole run)."""
    return f"{prefix}_{secrets.token_hex(4)}"


# -- `python -m app serve` as a real process -------------------------------------------------------


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status (the process is killed if it does not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def service_env(tmp_path: Path, driver: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1",
           "MEMORY_DRIVER": driver, "MEMORY_SQLITE_PATH": str(tmp_path / "memory.sqlite3"),
           **extra}
    env.pop("MEMORY_KEYS_DATABASE", None)
    return env


def start_process(tmp_path: Path, env: dict[str, str], *args: str,
                  wait: bool = True) -> ServeProcess:
    """``python -m app serve --port <free>`` with ``env``; waits for /health unless told not to."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port), *args],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    served = ServeProcess(process, f"http://127.0.0.1:{port}", log)
    if wait:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}:\n{served.log_text()}")
            try:
                if httpx.get(served.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                served.stop()
                raise RuntimeError("serve did not answer /health in time")
            time.sleep(0.25)
    return served
