"""PGVector under load: 16 threads mixing every verb through a pool smaller than the thread
count, on a real PostgreSQL; then the same with a pool of one and a short timeout, where waiting
threads must get a clear ``BackendUnavailableError`` in bounded time, never hang."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from app.core.memory import BackendUnavailableError
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from tests.word_hash_embedder import WordHashEmbedder

THREADS = 16
ROUNDS = 40


def mixed_work(driver: PgvectorDriver, thread: int, outcome: dict[str, Any]) -> None:
    """Every verb, under a user of this thread's own; counts what was acknowledged."""
    user = f"load{thread}"
    kept: list[str] = []
    for i in range(ROUNDS):
        memory = driver.store(user, f"{user} fact {i} about copper {i % 5}", tags=[f"t{i % 3}"])
        kept.append(memory["id"])
        outcome["stored"][user] += 1
        found = driver.recall(user, query=f"copper {i % 5}", top_k=5)
        assert all(m["user_id"] == user for m in found)
        assert driver.get(memory["id"], user)["content"] == memory["content"]
        driver.update(memory["id"], user, importance=0.9)
        if i % 4 == 3:
            assert driver.delete(kept[i - 2], user)
            outcome["deleted"][user] += 1
        if i % 8 == 7:
            assert driver.restore(kept[i - 6], user)
            outcome["deleted"][user] -= 1
        if i % 10 == 0:
            driver.store_many([{"user_id": user, "content": f"{user} batch {i} {n}"}
                               for n in range(5)])
            outcome["stored"][user] += 5
            driver.list_memories(user, limit=20)
            driver.stats(user)
            driver.set_profile(user, {"round": i}, merge=True)
            driver.recall_global_knowledge("copper", top_k=3)


def test_sixteen_threads_mix_every_verb_through_a_small_pool(empty_pg: str):
    driver = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder(), pool_max_size=6,
                            pool_timeout=30.0)
    driver.store_global_knowledge("Copper conducts heat and electricity well.", "science")
    outcome: dict[str, Any] = {"stored": Counter(), "deleted": Counter(), "errors": []}

    def run(thread: int) -> None:
        try:
            mixed_work(driver, thread, outcome)
        except Exception as error:  # noqa: BLE001 - reported whole by the assertion below
            outcome["errors"].append(repr(error))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert outcome["errors"] == []
    for t in range(THREADS):
        user = f"load{t}"
        counts = driver.stats(user)["memories"]
        assert counts["visible"] == outcome["stored"][user] - outcome["deleted"][user]
        assert counts["deleted"] == outcome["deleted"][user]
        assert driver.get_profile(user) == {"round": 30}
    driver.close()
    print(f"{THREADS} threads x {ROUNDS} rounds in {time.monotonic() - started:.1f} s")


def test_threads_beyond_an_exhausted_pool_get_a_clear_error_in_bounded_time(empty_pg: str):
    driver = PgvectorDriver(url=empty_pg, embedder=WordHashEmbedder(), pool_min_size=1,
                            pool_max_size=1, pool_timeout=0.5)
    driver.store("alice", "one connection for everyone")
    results: list[str] = []

    def call() -> None:
        began = time.monotonic()
        try:
            driver.recall("alice", query="connection")
            results.append("ok")
        except BackendUnavailableError as error:
            assert "0.5" in str(error)  # the message names the timeout that ran out
            results.append(f"timeout after {time.monotonic() - began:.2f}")

    with driver._pool.connection():  # held elsewhere for the whole burst
        threads = [threading.Thread(target=call) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert len(results) == THREADS and all(r.startswith("timeout") for r in results), results
    assert all(float(r.split()[-1]) < 5 for r in results)
    assert driver.recall("alice", query="connection")  # and the pool serves again afterwards
    driver.close()
