"""How the async API treats the event loop and how much concurrency buys: ``python -m bench.aio``.

Two figures per driver (``--drivers``, default ``sqlite,pgvector``), on fresh storage seeded with
``--seed`` memories of one user:

- **Loop lag.** A new process (so the embedding model is not loaded yet) opens the store with
  ``get_async_memory_driver()`` and runs a ticker coroutine that sleeps ``TICK`` seconds and
  records how late it wakes, while ``--recalls`` concurrent recalls (distinct queries, so each
  embeds) and ``--batches`` concurrent ``store_many`` of ``--batch-size`` memories run. The first
  of them loads the model. Printed: the ticker's lateness, p50 and max, per run (``--lag-runs``
  processes) and the worst max, next to the baseline: the same ticker's max over
  ``IDLE_SECONDS`` with nothing running, in the same process just before (on a shared machine
  the scheduler alone makes it late). Also the worst lateness less the time the loop's thread
  spent waiting for a CPU meanwhile (Linux's run-queue wait): the part this process caused
  (the GIL, the loop's own work), which the machine's other load does not move. Target: max at
  most 20 ms.
- **Concurrency** (warm model): the same ``--recalls`` recalls awaited one after another, then
  all at once with ``asyncio.gather``, interleaved for ``--rounds`` rounds; the first round warms
  up and is dropped. Printed: median seconds of each, and the median of the per-round ratios
  concurrent / sequential. Target on pgvector: at most 0.6. Run twice: with query vectors cached
  (agents repeat queries; the database and the ranking are what overlap) and with new queries
  every round (each recall also embeds; the model uses every core for one query already).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from app.core.memory.aio import AsyncMemoryDriver
from app.core.memory.records import MemoryInput
from bench.backends import open_backend
from bench.workload import base_sentences

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TICK = 0.005
IDLE_SECONDS = 2.0
USER = "bench-user"
LAG_TARGET_MS = 20.0
RATIO_TARGET = 0.6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drivers", default="sqlite,pgvector")
    parser.add_argument("--seed", type=int, default=2_000)
    parser.add_argument("--recalls", type=int, default=100)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lag-runs", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--lag-child", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lag_child:
        print(json.dumps(asyncio.run(measure_lag(args))))
        return 0

    report: dict[str, Any] = {"cores": os.cpu_count(), "recalls": args.recalls, "drivers": {}}
    for name in args.drivers.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        report["drivers"][name] = measure_driver(name, args)
    print(render(report))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def measure_driver(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with open_backend(name) as backend:
        seed(backend.driver(), args.seed)
        backend.settle()
        env = dict(os.environ, MEMORY_DRIVER=name, PYTHONPATH=str(PROJECT_ROOT))
        env["MEMORY_SQLITE_PATH" if name == "sqlite" else "DATABASE_URL"] = backend.location
        lag = [lag_child(name, args, env) for _ in range(args.lag_runs)]
        concurrency = {
            "cached queries": asyncio.run(measure_concurrency(backend.driver(), args, False)),
            "new queries": asyncio.run(measure_concurrency(backend.driver(), args, True)),
        }
        layering = asyncio.run(measure_layering(backend.location, args)) \
            if name == "pgvector" else None
    return {"lag": lag, "concurrency": concurrency, "layering": layering}


def seed(driver: Any, count: int) -> None:
    sentences = base_sentences(count)
    for start in range(0, count, 500):
        driver.store_many([{"user_id": USER, "content": text}
                           for text in sentences[start:start + 500]])
    driver.close()


def lag_child(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.aio", "--lag-child", name,
            "--recalls", str(args.recalls), "--batches", str(args.batches),
            "--batch-size", str(args.batch_size)]
    done = subprocess.run(argv, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


async def measure_lag(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: the ticker's lateness while the workload runs, model load included."""
    from app.core.memory import get_async_memory_driver

    memory = get_async_memory_driver()
    if args.warm:
        await memory.recall(USER, query="load the model before the clock starts")
    lateness: list[float] = []
    #: Per tick, the lateness less the time the loop's thread waited for a CPU meanwhile: what
    #: this process itself caused (the GIL, the loop's own work), not the machine's load.
    own: list[float] = []
    running = True
    cpu_wait = run_queue_clock()

    async def ticker() -> None:
        while running:
            began, waited = time.perf_counter(), cpu_wait()
            await asyncio.sleep(TICK)
            late = time.perf_counter() - began - TICK
            lateness.append(late)
            own.append(late - (cpu_wait() - waited))

    queries = [f"what about {text.lower()}" for text in base_sentences(args.recalls)]
    batches: list[list[MemoryInput]] = [
        [{"user_id": f"writer-{b}", "content": f"batch {b} item {i}: {text}"}
         for i, text in enumerate(base_sentences(args.batch_size))]
        for b in range(args.batches)]
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(IDLE_SECONDS)  # the baseline: the machine's own noise, nothing running
    idle = sorted(lateness)
    lateness.clear()
    own.clear()
    began = time.perf_counter()
    await asyncio.gather(*(memory.recall(USER, query=query) for query in queries),
                         *(memory.store_many(batch) for batch in batches))
    seconds = time.perf_counter() - began
    running = False
    await tick
    await memory.aclose()
    ordered = sorted(lateness)
    return {"idle_p50_ms": 1000 * statistics.median(idle), "idle_max_ms": 1000 * idle[-1],
            "ticks": len(ordered), "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
            "max_ms": 1000 * ordered[-1], "own_max_ms": 1000 * max(own), "workload_s": seconds}


def run_queue_clock() -> Callable[[], float]:
    """Seconds the calling thread has spent runnable but waiting for a CPU (Linux's
    ``/proc/thread-self/schedstat``); a clock stuck at 0 elsewhere."""
    try:
        stats = open("/proc/thread-self/schedstat", "rb", buffering=0)  # noqa: SIM115
    except OSError:
        return lambda: 0.0

    def waited() -> float:
        stats.seek(0)
        return int(stats.read().split()[1]) / 1e9

    return waited


async def measure_concurrency(driver: Any, args: argparse.Namespace,
                              new_queries: bool) -> dict[str, Any]:
    """Sequential vs concurrent: the same recalls, interleaved rounds, warm-up dropped."""
    memory = AsyncMemoryDriver(driver)
    sequential: list[float] = []
    concurrent: list[float] = []
    try:
        await memory.recall(USER, query="warm the model up")
        for round_ in range(args.rounds + 1):
            for mode in (("sequential", "concurrent") if round_ % 2 else
                         ("concurrent", "sequential")):
                tag = f" (round {round_} {mode})" if new_queries else ""
                queries = [f"who {verb} it{tag}" for verb in base_sentences(args.recalls)]
                calls = [functools.partial(memory.recall, USER, query=query)
                         for query in queries]
                seconds = await (run_sequential(calls) if mode == "sequential"
                                 else run_concurrent(calls))
                if round_:
                    (sequential if mode == "sequential" else concurrent).append(seconds)
    finally:
        await memory.aclose()
    ratios = [c / s for c, s in zip(concurrent, sequential, strict=True)]
    return {"sequential_s": statistics.median(sequential),
            "concurrent_s": statistics.median(concurrent),
            "ratio": statistics.median(ratios), "workers": memory.max_workers}


#: The database half of a recall (the nearest 10 of the user's vectors), for ``measure_layering``.
NEAREST_SQL = ("SELECT id FROM memories WHERE user_id = %s "
               "ORDER BY embedding <=> %s::vector LIMIT 10")


async def measure_layering(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The layering question on PostgreSQL: the same ``--recalls`` nearest-vector queries through
    psycopg's sync pool on 8 worker threads (what ``AsyncMemoryDriver`` does) and through its
    ``AsyncConnectionPool`` of 8 on the loop (native async), interleaved rounds; seconds and the
    ticker's max lateness for each."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    rng = np.random.default_rng(3)
    vectors = ["[" + ",".join(f"{x:.4f}" for x in rng.normal(size=384)) + "]"
               for _ in range(args.recalls)]
    sync_pool = ConnectionPool(url, min_size=8, max_size=8, open=True)
    async_pool = AsyncConnectionPool(url, min_size=8, max_size=8, open=False)
    await async_pool.open(wait=True)
    executor = ThreadPoolExecutor(max_workers=8)
    loop = asyncio.get_running_loop()

    def nearest_sync(vector: str) -> list[Any]:
        with sync_pool.connection() as conn:
            return conn.execute(NEAREST_SQL, (USER, vector)).fetchall()

    async def nearest_async(vector: str) -> list[Any]:
        async with async_pool.connection() as conn:
            return await (await conn.execute(NEAREST_SQL, (USER, vector))).fetchall()

    async def threads() -> None:
        await asyncio.gather(*(loop.run_in_executor(executor, nearest_sync, v)
                               for v in vectors))

    async def native() -> None:
        await asyncio.gather(*(nearest_async(v) for v in vectors))

    figures: dict[str, dict[str, list[float]]] = {"threads": {"s": [], "lag": []},
                                                  "native": {"s": [], "lag": []}}
    try:
        for round_ in range(args.rounds + 1):
            for mode in (("threads", "native") if round_ % 2 else ("native", "threads")):
                seconds, lag = await with_ticker(threads if mode == "threads" else native)
                if round_:
                    figures[mode]["s"].append(seconds)
                    figures[mode]["lag"].append(lag)
    finally:
        executor.shutdown()
        sync_pool.close()
        await async_pool.close()
    return {mode: {"seconds": statistics.median(f["s"]), "max_lag_ms": max(f["lag"])}
            for mode, f in figures.items()}


async def with_ticker(work: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Seconds ``work`` takes and the ticker's max lateness (ms) meanwhile."""
    lateness = [0.0]
    running = True

    async def ticker() -> None:
        while running:
            began = time.perf_counter()
            await asyncio.sleep(TICK)
            lateness.append(time.perf_counter() - began - TICK)

    tick = asyncio.create_task(ticker())
    began = time.perf_counter()
    await work()
    seconds = time.perf_counter() - began
    running = False
    await tick
    return seconds, 1000 * max(lateness)


async def run_sequential(calls: Sequence[Callable[[], Awaitable[Any]]]) -> float:
    began = time.perf_counter()
    for call in calls:
        await call()
    return time.perf_counter() - began


async def run_concurrent(calls: Sequence[Callable[[], Awaitable[Any]]]) -> float:
    began = time.perf_counter()
    await asyncio.gather(*(call() for call in calls))
    return time.perf_counter() - began


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['cores']} cores. Loop lag: a {TICK * 1000:.0f} ms ticker's lateness "
             f"(target: max <= {LAG_TARGET_MS:.0f} ms). Concurrency: concurrent / sequential "
             f"(target on pgvector <= {RATIO_TARGET}).", "",
             "| driver | loop lag p50 / p99 / max (ms), per cold run | worst max | "
             "worst max less CPU wait | idle max (baseline) | "
             "cached queries: seq / conc (s), ratio | new queries: seq / conc (s), ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, figures in report["drivers"].items():
        runs = ", ".join(f"{run['p50_ms']:.1f} / {run['p99_ms']:.1f} / {run['max_ms']:.1f}"
                         for run in figures["lag"])
        worst = max(run["max_ms"] for run in figures["lag"])
        cells = [f"{c['sequential_s']:.2f} / {c['concurrent_s']:.2f}, **{c['ratio']:.2f}**"
                 for c in figures["concurrency"].values()]
        own = max(run["own_max_ms"] for run in figures["lag"])
        idle = max(run["idle_max_ms"] for run in figures["lag"])
        lines.append(f"| {name} | {runs} | **{worst:.1f}** | {own:.1f} | {idle:.1f} | "
                     f"{cells[0]} | {cells[1]} |")
    for name, figures in report["drivers"].items():
        if figures.get("layering"):
            t, n = figures["layering"]["threads"], figures["layering"]["native"]
            lines += ["", f"Layering on {name} ({report['recalls']} concurrent nearest-vector "
                      "queries, 8 connections): sync pool on 8 threads "
                      f"{t['seconds']:.3f} s (max lag {t['max_lag_ms']:.1f} ms) vs "
                      f"AsyncConnectionPool {n['seconds']:.3f} s "
                      f"(max lag {n['max_lag_ms']:.1f} ms)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
