"""PGVector recall against the floor of any vector search on PostgreSQL, in one run, one table.

    python -m bench.pgvector_recall [--sizes 1000,10000,100000] [--users 100] [--per-user 1000]
                                    [--queries 200] [--rounds 2] [--explain]

For each scenario (one user holding 1k, 10k, 100k memories; then ``--users`` x ``--per-user`` in
a fresh database) the memories are bulk-loaded with ``COPY`` (the HNSW index is dropped for the
load and rebuilt from its own definition afterwards, which is ~10x faster than inserting into it
row by row; then ``VACUUM ANALYZE``, what autovacuum does after a bulk load). Then, per query,
interleaved, ``--rounds`` times:

- ``hnsw``: the baseline, a bare ``SELECT id FROM memories WHERE user_id = $1 ORDER BY embedding
  <=> $2 LIMIT 10`` through the HNSW index (forced with ``enable_sort = off``; pgvector's defaults,
  ``hnsw.ef_search = 40``, plus ``hnsw.iterative_scan = relaxed_order`` so that a user holding 1%
  of the table still gets 10 rows), a prepared statement on a connection of its own;
- ``recall``: ``PgvectorDriver.recall(user, query=text, top_k=10)``, hybrid, with the query's
  vector handed over precomputed (the query embedding is not timed);
- ``exact``: the share of queries whose top 10 is exactly the top 10 of a numpy scan over the
  user's vectors: for the driver ranking by cosine alone, and for the baseline.

``store_many`` is timed at the one-user sizes up to 10k: 256 new texts in one call with the model,
against the model encoding the same kind of texts just before (interleaved, ``--rounds`` times).
``--explain`` prints ``EXPLAIN (ANALYZE, BUFFERS)`` of the driver's recall query and of the
baseline for the first query of each scenario. ``bench.perf`` calls ``hnsw_baseline`` for its
``hnsw p50`` column.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import numpy as np

from app.core.memory.drivers.pgvector_driver import _BinaryVector, _register_vector_dumper
from app.core.memory.embeddings import get_default_embedder
from app.core.memory.ranking import FusionWeights
from bench.backends import open_backend
from bench.workload import BenchEmbedder, Corpus, base_sentences, make_corpus

VECTOR_ONLY = FusionWeights(vector=1.0, keyword=0.0, importance=0.0, neighbour=0.0)
TOP_K = 10
STORE_MANY_TEXTS = 256
BASELINE_SQL = ("SELECT id FROM memories WHERE user_id = %s "
                "ORDER BY embedding <=> %s::vector LIMIT 10")
BASELINE_SETTINGS = ("SET enable_sort = off; SET hnsw.iterative_scan = relaxed_order; "
                     "SET hnsw.ef_search = 40")
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--per-user", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--no-store", action="store_true", help="skip the store_many figures")
    args = parser.parse_args(argv)
    model = get_default_embedder()
    base_vectors = model.embed_documents(base_sentences())
    sizes = [int(size) for size in args.sizes.split(",") if size]
    rows: list[dict[str, Any]] = []
    if sizes:
        with open_backend("pgvector") as backend:
            corpus = make_corpus(base_vectors, max(sizes), args.queries)
            embedder = BenchEmbedder(model)
            loaded = 0
            for size in sizes:
                began = time.perf_counter()
                bulk_load(backend.location, corpus, ["solo"], loaded, size)
                print(f"one user, {size:,}: loaded in {time.perf_counter() - began:.0f} s",
                      file=sys.stderr, flush=True)
                loaded = size
                row = {"scenario": "one user", "memories": size}
                row |= measure_recall(backend.location, embedder, corpus, ["solo"], size,
                                      args.rounds, args.explain)
                if not args.no_store and size <= 10_000:
                    row |= measure_store_many(backend.location, embedder, corpus, size,
                                              args.rounds)
                rows.append(row)
                print(render([row]), file=sys.stderr, flush=True)
    if args.users:
        with open_backend("pgvector") as backend:
            total = args.users * args.per_user
            corpus = make_corpus(base_vectors, total, args.queries, seed=11)
            users = [f"user{i:03d}" for i in range(args.users)]
            bulk_load(backend.location, corpus, users, 0, total)
            row = {"scenario": f"{args.users} users", "memories": total}
            row |= measure_recall(backend.location, BenchEmbedder(model), corpus, users, total,
                                  args.rounds, args.explain)
            rows.append(row)
    print(render(rows))
    return 0


# -- loading ------------------------------------------------------------------------------------

def bulk_load(url: str, corpus: Corpus, users: list[str], start: int, end: int) -> None:
    """Memories ``start..end`` of ``corpus`` (memory i to user ``i % len(users)``, id ``m<i>``,
    created one second after memory i-1) by ``COPY``, the HNSW index rebuilt afterwards."""
    import psycopg

    _register_vector_dumper()
    with psycopg.connect(url, autocommit=True) as conn:
        definition = conn.execute("SELECT indexdef FROM pg_indexes "
                                  "WHERE indexname = 'memories_embedding'").fetchone()
        assert definition is not None, "the memories_embedding index is missing"
        conn.execute("DROP INDEX memories_embedding")
        with conn.cursor() as cursor, cursor.copy(
                "COPY memories (id, user_id, content, created_at, updated_at, occurred_at, "
                "embedding) "
                "FROM STDIN (FORMAT BINARY)") as copy:
            for i in range(start, end):
                created = _EPOCH + timedelta(seconds=i)
                copy.write_row((f"m{i}", users[i % len(users)], corpus.texts[i], created,
                                created, created, _BinaryVector(corpus.vectors[i])))
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute(definition[0])
        conn.execute("VACUUM ANALYZE")


# -- measuring ----------------------------------------------------------------------------------

@contextmanager
def baseline_connection(url: str) -> Iterator[Any]:
    """A connection of its own, in autocommit, set up for the bare HNSW query."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(BASELINE_SETTINGS)
        yield conn


def hnsw_baseline(conn: Any, user_id: str, vector: np.ndarray) -> list[str]:
    """The bare HNSW query's top 10 ids for ``user_id`` (on a ``baseline_connection``)."""
    return [row[0] for row in conn.execute(BASELINE_SQL, (user_id, _BinaryVector(vector)),
                                           prepare=True).fetchall()]


def measure_recall(url: str, embedder: BenchEmbedder, corpus: Corpus, users: list[str],
                   stage: int, rounds: int, explain: bool) -> dict[str, Any]:
    """Recall and baseline timings, interleaved per query, and both exact shares."""
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    driver = PgvectorDriver(url=url, embedder=embedder)
    by_cosine = PgvectorDriver(url=url, embedder=embedder, weights=VECTOR_ONLY)
    count = len(corpus.query_texts)
    embedder.preset_queries(corpus.query_texts, corpus.query_vectors)
    owner = [users[q % len(users)] for q in range(count)]
    recall_ms: list[float] = []
    hnsw_ms: list[float] = []
    exact_recall = exact_hnsw = 0
    with baseline_connection(url) as conn:
        if explain:
            print(explain_plans(driver, conn, owner[0], corpus.query_texts[0],
                                corpus.query_vectors[0]), file=sys.stderr)
        for user in sorted(set(owner)):  # warm: a first recall is a cold start
            driver.recall(user, query=corpus.query_texts[0])
            by_cosine.recall(user, query=corpus.query_texts[0])
            hnsw_baseline(conn, user, corpus.query_vectors[0])
        for _ in range(rounds):
            for q in range(count):
                text, vector = corpus.query_texts[q], corpus.query_vectors[q]
                hnsw_ms.append(1000 * timed(partial(hnsw_baseline, conn, owner[q], vector)))
                recall_ms.append(1000 * timed(partial(driver.recall, owner[q], query=text,
                                                       top_k=TOP_K)))
        for q in range(count):
            own = np.arange(users.index(owner[q]), stage, len(users))
            scores = corpus.vectors[own] @ corpus.query_vectors[q]
            expected = {f"m{own[i]}" for i in np.argsort(-scores, kind="stable")[:TOP_K]}
            found = by_cosine.recall(owner[q], query=corpus.query_texts[q], top_k=TOP_K)
            exact_recall += {memory["id"] for memory in found} == expected
            exact_hnsw += set(hnsw_baseline(conn, owner[q], corpus.query_vectors[q])) == expected
    embedder.clear_queries()
    driver.close()
    by_cosine.close()
    return {"recall_ms": percentiles(recall_ms), "hnsw_ms": percentiles(hnsw_ms),
            "exact_recall": exact_recall / count, "exact_hnsw": exact_hnsw / count}


def measure_store_many(url: str, embedder: BenchEmbedder, corpus: Corpus, stage: int,
                       rounds: int) -> dict[str, Any]:
    """``store_many`` of 256 new texts with the model against the model's encode alone."""
    from app.core.memory.drivers.pgvector_driver import PgvectorDriver

    driver = PgvectorDriver(url=url, embedder=embedder)
    encode, store = [], []
    for r in range(rounds):
        texts = [f"{text} (stage {stage}, round {r})" for text in
                 corpus.texts[:STORE_MANY_TEXTS]]
        encode.append(STORE_MANY_TEXTS / timed(partial(
            embedder.model.embed_documents, [f"{text} encoded" for text in texts])))
        store.append(STORE_MANY_TEXTS / timed(partial(
            driver.store_many, [{"user_id": "writer", "content": text} for text in texts])))
    driver.close()
    return {"encode_per_s": statistics.median(encode),
            "store_many_per_s": statistics.median(store)}


def explain_plans(driver: Any, conn: Any, user_id: str, text: str, vector: np.ndarray) -> str:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of the driver's recall query and of the baseline."""
    sql, values = driver.explain_recall(user_id, text, vector, TOP_K)
    lines = ["-- driver recall: the candidate statement (it sets its own settings)"]
    with conn.transaction():
        conn.execute("RESET ALL")
        lines += [_short(row[0]) for row in
                  conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, values)]
        conn.execute(BASELINE_SETTINGS)
    lines.append("-- bare HNSW")
    lines += [_short(row[0]) for row in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + BASELINE_SQL,
                                                     (user_id, _BinaryVector(vector)))]
    return "\n".join(lines)


def _short(line: str) -> str:
    """A plan line with its 384-number vector literals elided."""
    return re.sub(r"'\[[^\]]{80,}\]'", "'[...]'", line)


def timed(action: Callable[[], Any]) -> float:
    """The seconds ``action()`` takes."""
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def percentiles(values: list[float]) -> dict[str, float]:
    """The median and 95th percentile of ``values``."""
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[int(0.95 * (len(ordered) - 1))]}


def render(rows: list[dict[str, Any]]) -> str:
    """The figures as a markdown table."""
    lines = ["| scenario | memories | recall p50 / p95 ms | bare HNSW p50 / p95 ms | x HNSW | "
             "top-10 exact: recall / HNSW | store_many /s (x encode) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        recall, hnsw = row["recall_ms"], row["hnsw_ms"]
        store = (f"{row['store_many_per_s']:.0f} "
                 f"({row['store_many_per_s'] / row['encode_per_s']:.2f})"
                 if "store_many_per_s" in row else "")
        lines.append(
            f"| {row['scenario']} | {row['memories']:,} | {recall['p50']:.2f} / "
            f"{recall['p95']:.2f} | {hnsw['p50']:.2f} / {hnsw['p95']:.2f} | "
            f"{recall['p50'] / hnsw['p50']:.2f} | {100 * row['exact_recall']:.0f}% / "
            f"{100 * row['exact_hnsw']:.0f}% | {store} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())


# -- the columns bench.perf adds for pgvector ---------------------------------------------------

def baseline_figures(url: str, corpus: Corpus, users: list[str], ids: list[str]) -> dict[str, Any]:
    """The bare HNSW query over the table ``bench.perf`` just measured the driver on (memory i is
    ``ids[i]``, of user ``i % len(users)``): its p50/p95 and its exact share, per query."""
    stage = len(ids)
    count = len(corpus.query_texts)
    times, exact = [], 0
    with baseline_connection(url) as conn:
        for user in sorted({users[q % len(users)] for q in range(count)}):
            hnsw_baseline(conn, user, corpus.query_vectors[0])
        for q in range(count):
            owner, vector = users[q % len(users)], corpus.query_vectors[q]
            times.append(1000 * timed(partial(hnsw_baseline, conn, owner, vector)))
            own = np.arange(users.index(owner), stage, len(users))
            scores = corpus.vectors[own] @ vector
            expected = {ids[int(own[i])] for i in np.argsort(-scores, kind="stable")[:TOP_K]}
            exact += set(hnsw_baseline(conn, owner, vector)) == expected
    return {"hnsw_ms": percentiles(times), "hnsw_exact_share": exact / count}


def render_baseline(report: dict[str, Any]) -> list[str]:
    """``bench.perf``'s lines comparing the pgvector driver's recall with the bare HNSW query."""
    runs = [run for run in report["drivers"].get("pgvector", {}).get("runs", [])
            if "hnsw_ms" in run]
    if not runs:
        return []
    lines = ["", "PGVector hybrid recall (without the query embedding) against a bare HNSW "
             "`ORDER BY embedding <=> $1 LIMIT 10` over the same user's rows, same table "
             "(see bench/pgvector_recall.py):", "",
             "| scenario | memories | recall p50 ms | bare HNSW p50 ms | x HNSW | "
             "top-10 exact: recall / HNSW |", "|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        recall, hnsw = run["recall_ms"]["p50"], run["hnsw_ms"]["p50"]
        lines.append(f"| {run['scenario']} | {run['memories']:,} | {recall:.2f} | {hnsw:.2f} | "
                     f"{recall / hnsw:.2f} | {100 * run['exact_share']:.0f}% / "
                     f"{100 * run['hnsw_exact_share']:.0f}% |")
    return lines
