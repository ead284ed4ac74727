"""What the HTTP service adds to a search: ``POST /v1/memories/search`` against in-process recall.

    python -m bench.service [--memories 10000] [--queries 100] [--rounds 6] [--clients 4]

One user holds ``--memories`` memories in a SQLite file (built as ``bench.perf`` builds its
corpus: real MiniLM vectors of a few hundred sentences, jittered, stored with ``store_many``).
``python -m app serve`` runs over that file as a separate process on 127.0.0.1, on the same two
cores, with a user key. Beside it, in this process, the sync driver's ``recall`` over the same
file is the baseline. Each round measures, in turn and so under the same machine load:

- **one caller**: ``--queries`` searches (top 10, hybrid) one after another, in-process, then
  over HTTP through one keep-alive connection. p50/p99 and calls/s come from these.
- **``--clients`` callers at once**: the same searches shared among ``--clients`` threads, each
  calling ``recall`` in-process, then each with a keep-alive connection of its own to the
  server. Calls/s is the block's searches over its wall time: how much each side serves when
  several agents ask at once (like for like: the same number of concurrent callers on both).

The HTTP client is the standard library's ``http.client`` (one persistent connection per
caller; the body is encoded and the answer decoded with ``json`` on every call): the figures are
the service's cost, not a client library's. httpx costs ~0.35 ms more per request on this
machine on the client side alone (measured against a server answering fixed bytes), which
would be counted against the service.

Both sides embed each query text with the real model once (a warm-up pass), after which the
query vector comes from the model's cache on both sides: the figures compare recall plus
transport, not the model. Both sides also write (recall counts accesses).

Targets (issue 12): the HTTP path adds at most 1.5 ms at p50 (one caller), and serves at least
0.8x the in-process calls per second (``--clients`` callers; the one-caller ratio is printed
too). Output: a small table, and a JSON file in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from app.core.database.migrator import PROJECT_ROOT, Migrator, SqliteMigrationDatabase
from app.core.database.migrator import migrations_dir as _migrations_dir
from app.core.keys.sqlite_key_store import SqliteKeyStore
from app.core.memory.drivers.sqlite_driver import SqliteDriver
from app.core.memory.embeddings import get_default_embedder
from app.service.keys import create_key
from bench.results import write_results
from bench.workload import BenchEmbedder, base_sentences, make_corpus

USER = "bench_user"
BASE_SENTENCES = 400
LOAD_BATCH = 1_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__)
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=100, help="searches per block")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved blocks per side")
    parser.add_argument("--clients", type=int, default=4,
                        help="concurrent callers of the throughput blocks")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-service-") as folder:
        path = Path(folder) / "memory.sqlite3"
        _migrate(path)
        model = get_default_embedder()
        queries = _load(path, model, args.memories, args.queries)
        store = SqliteKeyStore(path)
        _, key = create_key(store, user_id=USER, name="bench")
        store.close()
        driver = SqliteDriver(path=path, embedder=model)
        server = _start_server(path, folder)
        try:
            figures = _measure(driver, server["url"], key, queries, args.rounds,
                               args.clients)
        finally:
            server["process"].terminate()
            server["process"].wait(timeout=60)
            driver.close()
    figures.update(memories=args.memories, queries_per_block=args.queries, rounds=args.rounds,
                   clients=args.clients, cpus=os.cpu_count(),
                   when=datetime.now(UTC).isoformat(timespec="seconds"))
    _report(figures)
    return 0


def _migrate(path: Path) -> None:
    db = SqliteMigrationDatabase(path)
    try:
        Migrator(db, _migrations_dir("sqlite"), out=lambda line: None).migrate()
    finally:
        db.close()


def _load(path: Path, model: Any, memories: int, queries: int) -> list[str]:
    """Store the corpus for ``USER`` (preset vectors: the model is not what is measured here)."""
    base = model.embed_documents(base_sentences(BASE_SENTENCES))
    corpus = make_corpus(base, memories, queries)
    embedder = BenchEmbedder(model)
    loader = SqliteDriver(path=path, embedder=embedder)
    try:
        for start in range(0, memories, LOAD_BATCH):
            stop = min(start + LOAD_BATCH, memories)
            embedder.preset_documents(corpus.vectors[start:stop])
            loader.store_many([{"user_id": USER, "content": corpus.texts[i]}
                               for i in range(start, stop)])
    finally:
        loader.close()
    return corpus.query_texts


def _start_server(path: Path, folder: str) -> dict[str, Any]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MEMORY_DRIVER": "sqlite", "MEMORY_SQLITE_PATH": str(path),
           "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"}
    log = open(Path(folder) / "serve.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port),
                                "--log-level", "warning"], env=env, cwd=folder, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited: {(Path(folder) / 'serve.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return {"process": process, "url": url}
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("serve did not start")
        time.sleep(0.25)


class _Connection:
    """One keep-alive HTTP/1.1 connection to the server, searching with a user key."""

    def __init__(self, url: str, key: str) -> None:
        address = httpx.URL(url)
        self.connection = http.client.HTTPConnection(address.host, address.port, timeout=60)
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def search(self, query: str) -> None:
        body = json.dumps({"query": query, "top_k": 10}).encode("utf-8")
        try:
            self.connection.request("POST", "/v1/memories/search", body=body,
                                    headers=self.headers)
            answer = self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closes a keep-alive connection idle for 5 s (uvicorn's default), as
            # the callers' connections are while the other side is measured: open it again.
            self.connection.close()
            self.connection.request("POST", "/v1/memories/search", body=body,
                                    headers=self.headers)
            answer = self.connection.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"search answered {answer.status}: {data[:200]!r}")
        assert len(json.loads(data)["results"]) == 10

    def close(self) -> None:
        self.connection.close()


def _measure(driver: SqliteDriver, url: str, key: str, queries: list[str],
             rounds: int, clients: int) -> dict[str, Any]:
    connections = [_Connection(url, key) for _ in range(clients)]

    def in_process(query: str, caller: int = 0) -> None:
        assert len(driver.recall(USER, query=query, top_k=10)) == 10

    def over_http(query: str, caller: int = 0) -> None:
        connections[caller].search(query)

    sides: dict[str, Callable[..., None]] = {"in_process": in_process, "http": over_http}
    for call in sides.values():  # warm-up: model caches, the driver's in-memory vectors
        for query in queries:
            call(query)
    times: dict[str, list[float]] = {name: [] for name in sides}
    walls: dict[str, float] = dict.fromkeys(sides, 0.0)
    shared_walls: dict[str, float] = dict.fromkeys(sides, 0.0)
    pool = ThreadPoolExecutor(max_workers=clients)

    def share(call: Callable[..., None]) -> float:
        """``queries`` searched by ``clients`` callers at once; the block's wall time."""
        def caller(index: int) -> None:
            for query in queries[index::clients]:
                call(query, index)

        start = time.perf_counter()
        for done in [pool.submit(caller, index) for index in range(clients)]:
            done.result()
        return time.perf_counter() - start

    for _ in range(rounds):
        for name, call in sides.items():
            block_start = time.perf_counter()
            for query in queries:
                start = time.perf_counter()
                call(query)
                times[name].append(time.perf_counter() - start)
            walls[name] += time.perf_counter() - block_start
        for name, call in sides.items():
            shared_walls[name] += share(call)
    pool.shutdown()
    for connection in connections:
        connection.close()
    figures: dict[str, Any] = {}
    for name, samples in times.items():
        ordered = sorted(samples)
        figures[name] = {
            "p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3),
            "calls_per_s": round(len(samples) / walls[name], 1),
            "calls_per_s_concurrent": round(len(samples) / shared_walls[name], 1),
            "calls": len(samples),
        }
    figures["added_p50_ms"] = round(figures["http"]["p50_ms"] - figures["in_process"]["p50_ms"],
                                    3)
    figures["http_vs_in_process"] = round(figures["http"]["calls_per_s_concurrent"]
                                          / figures["in_process"]["calls_per_s_concurrent"], 3)
    figures["http_vs_in_process_one_caller"] = round(figures["http"]["calls_per_s"]
                                                     / figures["in_process"]["calls_per_s"], 3)
    return figures


def _report(figures: dict[str, Any]) -> None:
    clients = figures["clients"]
    lines = [f"search at {figures['memories']:,} memories, one user, top 10, "
             f"{figures['rounds']} interleaved rounds of {figures['queries_per_block']}",
             "", f"| path | p50 ms | p99 ms | calls/s, one caller | calls/s, {clients} callers |",
             "|---|---|---|---|---|"]
    for name in ("in_process", "http"):
        row = figures[name]
        lines.append(f"| {name.replace('_', '-')} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{row['calls_per_s']} | {row['calls_per_s_concurrent']} |")
    added, ratio = figures["added_p50_ms"], figures["http_vs_in_process"]
    lines += ["", f"HTTP adds {added} ms at p50 (target <= 1.5: "
                  f"{'met' if added <= 1.5 else 'NOT met'}); with {clients} callers it serves "
                  f"{ratio}x the in-process calls/s (target >= 0.8: "
                  f"{'met' if ratio >= 0.8 else 'NOT met'}); one caller: "
                  f"{figures['http_vs_in_process_one_caller']}x"]
    print("\n".join(lines))
    target = write_results("service", figures)
    print(f"\nwritten to {target.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
