"""Worker processes for the concurrency and crash tests (run as ``python -m tests.workers``).

    python -m tests.workers mixed SQLITE_PATH PROCESS_NO OUTPUT_JSON
        Two threads, each storing STORES_PER_THREAD memories one by one under a user of its
        own, recalling every 10th store and deleting every 20th; writes the acknowledged ids,
        the deleted ids and every error to OUTPUT_JSON.
    python -m tests.workers batches DRIVER LOCATION
        store_many of BATCH memories at a time, forever, printing ``ack N`` after batch N
        returns, until the test kills it (DRIVER is sqlite with a file path, or pgvector with a
        URL).
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from typing import Any

from app.core.memory.base import BaseMemoryDriver
from tests.word_hash_embedder import WordHashEmbedder

STORES_PER_THREAD = 1_000
THREADS = 2
BATCH = 2_000


def open_driver(kind: str, location: str) -> BaseMemoryDriver:
    if kind == "sqlite":
        from app.core.memory.drivers.sqlite_driver import SqliteDriver

        return SqliteDriver(path=location, embedder=WordHashEmbedder())
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    return PgvectorDriver(url=location, embedder=WordHashEmbedder())


def mixed(path: str, process: str, output: str) -> None:
    driver = open_driver("sqlite", path)
    result: dict[str, Any] = {"stored": [], "deleted": [], "errors": []}
    lock = threading.Lock()

    def work(thread: int) -> None:
        user = f"p{process}t{thread}"
        mine: list[str] = []
        try:
            for i in range(STORES_PER_THREAD):
                memory = driver.store(user, f"{user} remembers item {i} about harbor {i % 7}")
                mine.append(memory["id"])
                with lock:
                    result["stored"].append(memory["id"])
                if i % 10 == 9:
                    found = driver.recall(user, query=f"harbor {i % 7}", top_k=5)
                    assert all(m["user_id"] == user for m in found), "another user's memory"
                if i % 20 == 19 and driver.delete(mine[i - 10], user):
                    with lock:
                        result["deleted"].append(mine[i - 10])
        except Exception:  # noqa: BLE001 - every error is the test's finding, reported whole
            with lock:
                result["errors"].append(traceback.format_exc())

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    driver.close()
    with open(output, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def batches(kind: str, location: str) -> None:
    driver = open_driver(kind, location)
    number = 0
    while True:
        driver.store_many([{"user_id": "crash", "content": f"batch {number} item {i}"}
                           for i in range(BATCH)])
        print(f"ack {number}", flush=True)
        number += 1


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"mixed": mixed, "batches": batches}[command](*arguments)
