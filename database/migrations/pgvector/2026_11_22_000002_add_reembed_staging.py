"""Staging for ``reembed``: new vectors are written beside the old ones, then swapped in at once.

``next_embedding`` (a ``vector`` of any size: the new model's may differ) holds a row's vector
from the model being switched to; ``reembed_target`` records which model that is (one row while a
re-embed is under way), so that an interrupted run resumes and a run for another model starts
over. Recall keeps using ``embedding`` until the swap. A row whose vector changes during the run
(new content, an upsert) loses its staged vector through the trigger, so the swap never installs
a vector of old content. Knowledge chunks are never updated in place (a re-ingest deletes and
inserts them), so they need no trigger. The function is created with OR REPLACE because
``migrate fresh`` drops tables, not functions.
"""

from __future__ import annotations

from typing import Any

STATEMENTS = [
    "ALTER TABLE memories ADD COLUMN next_embedding vector",
    "ALTER TABLE knowledge_chunks ADD COLUMN next_embedding vector",
    """
    CREATE TABLE reembed_target (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        model TEXT NOT NULL,
        dimension INTEGER NOT NULL,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE OR REPLACE FUNCTION memories_staged_vector_outdated() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.next_embedding IS NOT NULL AND NEW.embedding IS DISTINCT FROM OLD.embedding THEN
            NEW.next_embedding := NULL;
        END IF;
        RETURN NEW;
    END
    $$
    """,
    # No column list and no WHEN clause: either would make the trigger depend on the columns,
    # and PostgreSQL then refuses the ALTER ... TYPE with which reembed swaps vectors in.
    """
    CREATE TRIGGER memories_staged_vector_outdated BEFORE UPDATE ON memories
    FOR EACH ROW EXECUTE FUNCTION memories_staged_vector_outdated()
    """,
]


def up(db: Any) -> None:
    for statement in STATEMENTS:
        db.execute(statement)


def down(db: Any) -> None:
    db.execute("DROP TRIGGER IF EXISTS memories_staged_vector_outdated ON memories")
    db.execute("DROP FUNCTION IF EXISTS memories_staged_vector_outdated()")
    db.execute("DROP TABLE IF EXISTS reembed_target")
    db.execute("ALTER TABLE knowledge_chunks DROP COLUMN IF EXISTS next_embedding")
    db.execute("ALTER TABLE memories DROP COLUMN IF EXISTS next_embedding")
