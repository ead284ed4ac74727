"""Rebuild the memories' HNSW index with a denser graph (``m = 32``, ``ef_construction = 128``),
and leave half of each new page of ``memories`` free (fillfactor 50, was 85).

With pgvector's defaults (16, 64) a search at ``hnsw.ef_search = 50`` found the exact top 10 for
87% of ``bench.pgvector_recall``'s queries on one user's 100k memories (90% at 64, 92% at 160:
searching deeper barely helps, some neighbours are badly linked); (16, 128) gave 92% at 50 and
94% at 64; (32, 128) 98% at 50 and 97% at 40, so recall reaches the exactness target without
searching deeper. The price is paid on
writes: a build or an insertion costs about twice as much, and the index is ~1.5x larger.
Knowledge chunks keep the defaults (their searches are not filtered by user, and the table is
small). On a large table this migration takes a while (an HNSW build; ~3 minutes for 100k rows
on two cores): run it when writes can wait.

Fillfactor: a memory's row is ~1.9 kB (the vector alone 1.5 kB), so the 15% (1.2 kB) that
fillfactor 85 left free could not hold the new version the access-count update of a recall
writes: half of those updates were not HOT (6,020 updates, 2,995 HOT, after 600 recalls on 10k
memories), and each such update inserted into every index, the HNSW one included, which made it
most of a recall's time. With fillfactor 50, 5,958 of 6,020 were HOT. It applies to pages
written from now on; ``VACUUM FULL memories`` (which locks the table) rewrites the old ones.
"""

from __future__ import annotations

from typing import Any


def up(db: Any) -> None:
    db.execute("ALTER TABLE memories SET (fillfactor = 50)")
    db.execute("DROP INDEX IF EXISTS memories_embedding")
    db.execute("CREATE INDEX memories_embedding ON memories USING hnsw "
               "(embedding vector_cosine_ops) WITH (m = 32, ef_construction = 128)")


def down(db: Any) -> None:
    db.execute("ALTER TABLE memories SET (fillfactor = 85)")
    db.execute("DROP INDEX IF EXISTS memories_embedding")
    db.execute("CREATE INDEX memories_embedding ON memories USING hnsw "
               "(embedding vector_cosine_ops)")
