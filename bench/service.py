"""What the HTTP service adds to a search: ``POST /v1/memories/search`` against in-process recall.

    python -m bench.service [--memories 10000] [--queries 100] [--rounds 6]

One user holds ``--memories`` memories in a SQLite file (built as ``bench.perf`` builds its
corpus: real MiniLM vectors of a few hundred sentences, jittered, stored with ``store_many``).
``python -m app serve`` runs over that file as a separate process on 127.0.0.1, on the same two
cores; the benchmark is its keep-alive client (httpx, one request at a time, a user key). Beside
it, in this process, the sync driver's ``recall`` over the same file is the baseline. The two are
measured in interleaved blocks of ``--queries`` searches (top 10, hybrid), ``--rounds`` times, so
that both see the same machine load.

Both sides embed each query text with the real model once (a warm-up pass), after which the
query vector comes from the model's cache on both sides: the figures compare recall plus
transport, not the model. Both sides also write (recall counts accesses).

Targets (issue 12): the HTTP path adds at most 1.5 ms at p50, and serves at least 0.8x the
in-process calls per second. Output: a small table, and a JSON file in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
from bench.workload import BenchEmbedder, base_sentences, make_corpus

RESULTS = PROJECT_ROOT / "bench" / "results"
USER = "bench_user"
BASE_SENTENCES = 400
LOAD_BATCH = 1_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__)
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=100, help="searches per block")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved blocks per side")
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
            figures = _measure(driver, server["url"], key, queries, args.rounds)
        finally:
            server["process"].terminate()
            server["process"].wait(timeout=60)
            driver.close()
    figures.update(memories=args.memories, queries_per_block=args.queries, rounds=args.rounds,
                   cpus=os.cpu_count(), when=datetime.now(UTC).isoformat(timespec="seconds"))
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


def _measure(driver: SqliteDriver, url: str, key: str, queries: list[str],
             rounds: int) -> dict[str, Any]:
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def over_http(query: str) -> None:
        answer = client.post("/v1/memories/search", json={"query": query, "top_k": 10})
        answer.raise_for_status()
        assert len(answer.json()["results"]) == 10

    def in_process(query: str) -> None:
        assert len(driver.recall(USER, query=query, top_k=10)) == 10

    sides: dict[str, Callable[[str], None]] = {"in_process": in_process, "http": over_http}
    for call in sides.values():  # warm-up: model caches, the driver's in-memory vectors
        for query in queries:
            call(query)
    times: dict[str, list[float]] = {name: [] for name in sides}
    walls: dict[str, float] = dict.fromkeys(sides, 0.0)
    for _ in range(rounds):
        for name, call in sides.items():
            block_start = time.perf_counter()
            for query in queries:
                start = time.perf_counter()
                call(query)
                times[name].append(time.perf_counter() - start)
            walls[name] += time.perf_counter() - block_start
    client.close()
    figures: dict[str, Any] = {}
    for name, samples in times.items():
        ordered = sorted(samples)
        figures[name] = {
            "p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3),
            "calls_per_s": round(len(samples) / walls[name], 1),
            "calls": len(samples),
        }
    figures["added_p50_ms"] = round(figures["http"]["p50_ms"] - figures["in_process"]["p50_ms"],
                                    3)
    figures["http_vs_in_process"] = round(figures["http"]["calls_per_s"]
                                          / figures["in_process"]["calls_per_s"], 3)
    return figures


def _report(figures: dict[str, Any]) -> None:
    lines = [f"search at {figures['memories']:,} memories, one user, top 10, "
             f"{figures['rounds']} interleaved blocks of {figures['queries_per_block']}",
             "", "| path | p50 ms | p99 ms | calls/s |", "|---|---|---|---|"]
    for name in ("in_process", "http"):
        row = figures[name]
        lines.append(f"| {name.replace('_', '-')} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{row['calls_per_s']} |")
    added, ratio = figures["added_p50_ms"], figures["http_vs_in_process"]
    lines += ["", f"HTTP adds {added} ms at p50 (target <= 1.5: "
                  f"{'met' if added <= 1.5 else 'NOT met'}); serves {ratio}x the in-process "
                  f"calls/s (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})"]
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"service-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    target.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print(f"\nwritten to {target.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
