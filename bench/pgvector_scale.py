"""PGVector at scale: store throughput and recall latency at N memories across many users.

    python -m bench.pgvector_scale [--memories 100000] [--users 100] [--queries 200]

Creates its own database on ``MEMORY_BENCH_PG_ADMIN_URL`` (default: the local server's
``postgres`` database), drops it at the end. The model's cost is measured apart: the vectors of
2,000 real texts are computed once, and the N stored vectors are those plus small noise
(re-normalised), so the database sees realistic clustered embeddings while the timings below are
the driver's and PostgreSQL's alone (an ``Embedder`` that returns the precomputed vectors stands in
for the model). Recall latency is measured without the query embedding, against the exact top 10
computed with numpy on the same vectors.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from collections.abc import Sequence

import numpy as np
import psycopg
from psycopg.conninfo import make_conninfo

from app.core.database.migrator import Migrator, migrations_dir
from app.core.database.postgres_migration import PostgresMigrationDatabase
from app.core.memory.drivers.pgvector_driver import PgvectorDriver
from app.core.memory.embeddings import get_default_embedder
from app.core.memory.ranking import FusionWeights

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TOPICS = ["cooking", "cycling", "databases", "piano", "gardening", "travel", "finance", "dogs",
          "films", "repairs", "languages", "running"]


class PrecomputedEmbedder:
    """Hands out vectors computed beforehand, so that timings exclude the model."""

    model_name = "all-MiniLM-L6-v2"
    dimension = 384

    def __init__(self) -> None:
        self.documents: list[np.ndarray] = []
        self.queries: dict[str, np.ndarray] = {}

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        batch, self.documents = self.documents[: len(texts)], self.documents[len(texts):]
        return np.stack(batch)

    def embed_query(self, text: str) -> np.ndarray:
        return self.queries[text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    args = parser.parse_args()

    rng = np.random.default_rng(7)
    model = get_default_embedder()
    base_texts = [f"Thoughts on {TOPICS[i % 12]} number {i}, written in week {i % 52}"
                  for i in range(2_000)]
    started = time.perf_counter()
    base = model.embed_documents(base_texts)
    encode_rate = len(base_texts) / (time.perf_counter() - started)
    noise = rng.normal(0, 0.04, size=(args.memories, 384)).astype(np.float32)
    vectors = base[np.arange(args.memories) % len(base)] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    name = f"memory_bench_{secrets.token_hex(4)}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(args.admin_url, dbname=name)
    try:
        db = PostgresMigrationDatabase(url)
        Migrator(db, migrations_dir("pgvector"), out=lambda line: None).migrate()
        db.close()
        run(url, args, vectors, base_texts, encode_rate, rng)
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(url: str, args: argparse.Namespace, vectors: np.ndarray, texts: list[str],
        encode_rate: float, rng: np.random.Generator) -> None:
    embedder = PrecomputedEmbedder()
    embedder.documents = list(vectors)
    users = [i % args.users for i in range(args.memories)]
    driver = PgvectorDriver(url=url, embedder=embedder,
                            weights=FusionWeights(vector=1.0, keyword=0.0, importance=0.0))
    started = time.perf_counter()
    for start in range(0, args.memories, 1_000):
        driver.store_many([{"user_id": f"user{users[i]}", "content": texts[i % len(texts)]}
                           for i in range(start, min(args.memories, start + 1_000))])
    store_rate = args.memories / (time.perf_counter() - started)
    # Autovacuum would get here on its own a little later; without it, the index-only count
    # that sizes each recall's scope still visits the heap, which is a loading transient.
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE memories")

    single = []
    for i in range(50):
        embedder.documents = [vectors[i]]
        began = time.perf_counter()
        driver.store("single", texts[i])
        single.append((time.perf_counter() - began) * 1000)

    index_only = PgvectorDriver(url=url, embedder=embedder, exact_scan_max_rows=0,
                                weights=FusionWeights(vector=1.0, keyword=0.0, importance=0.0))
    user_of = np.array(users)
    latencies: dict[str, list[float]] = {"exact scan": [], "hnsw iterative": []}
    agree: dict[str, int] = {"exact scan": 0, "hnsw iterative": 0}
    with psycopg.connect(url) as connection:
        ids: dict[int, str] = dict(connection.execute("SELECT pk, id FROM memories").fetchall())
    for q in range(args.queries):
        user = int(rng.integers(args.users))
        query_vector = vectors[int(rng.integers(len(vectors)))] + rng.normal(0, 0.05, 384)
        query_vector = (query_vector / np.linalg.norm(query_vector)).astype(np.float32)
        text = f"query {q}"
        embedder.queries[text] = query_vector
        own = np.flatnonzero(user_of == user)
        best = own[np.argsort(-(vectors[own] @ query_vector))[:10]]
        expected = {ids[int(i) + 1] for i in best}  # pks are 1-based insertion order
        for label, chosen in (("exact scan", driver), ("hnsw iterative", index_only)):
            began = time.perf_counter()
            found = chosen.recall(f"user{user}", query=text, top_k=10)
            latencies[label].append((time.perf_counter() - began) * 1000)
            agree[label] += {m["id"] for m in found} == expected

    print(f"\nPGVector, {args.memories:,} memories over {args.users} users "
          f"({args.memories // args.users:,} each)")
    print(f"  model encode (for reference): {encode_rate:,.0f} texts/s")
    print(f"  store_many (batches of 1,000, without the model): {store_rate:,.0f} memories/s")
    print(f"  store, single (without the model): median {statistics.median(single):.2f} ms")
    for label, values in latencies.items():
        values.sort()
        p95 = values[int(0.95 * (len(values) - 1))]
        print(f"  recall top-10 without embedding, {label}: p50 {statistics.median(values):.2f} ms,"
              f" p95 {p95:.2f} ms, top-10 identical to exact for "
              f"{100 * agree[label] / args.queries:.0f}% of {args.queries} queries")
    driver.close()
    index_only.close()


if __name__ == "__main__":
    main()
