"""Rebuild the memories' HNSW index with a denser graph: ``m = 32``, ``ef_construction = 128``.

With pgvector's defaults (16, 64) a search at ``hnsw.ef_search = 50`` found the exact top 10 for
92% of ``bench.pgvector_recall``'s queries on one user's 100k memories (94% at 64, and no better
than 92% up to 160: some neighbours are simply badly linked); with (32, 128) 98% at 50 and 97% at
40, so recall reaches the exactness target without searching deeper. The price is paid on
writes: a build or an insertion costs about twice as much, and the index is ~1.5x larger.
Knowledge chunks keep the defaults (their searches are not filtered by user, and the table is
small). On a large table this migration takes a while (an HNSW build; ~3 minutes for 100k rows
on two cores): run it when writes can wait.
"""

from __future__ import annotations

from typing import Any


def up(db: Any) -> None:
    db.execute("DROP INDEX IF EXISTS memories_embedding")
    db.execute("CREATE INDEX memories_embedding ON memories USING hnsw "
               "(embedding vector_cosine_ops) WITH (m = 32, ef_construction = 128)")


def down(db: Any) -> None:
    db.execute("DROP INDEX IF EXISTS memories_embedding")
    db.execute("CREATE INDEX memories_embedding ON memories USING hnsw "
               "(embedding vector_cosine_ops)")
