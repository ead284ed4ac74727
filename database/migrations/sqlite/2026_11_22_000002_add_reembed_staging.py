"""Staging for ``reembed``: new vectors are written beside the old ones, then swapped in at once.

``next_embedding`` holds a row's vector from the model being switched to; ``reembed_target``
records which model that is (one row while a re-embed is under way, none otherwise), so that an
interrupted run resumes where it stopped and a run for another model starts over. Recall keeps
using ``embedding`` until the swap. A row whose vector changes during the run (new content, an
upsert) loses its staged vector through the trigger, so the swap never installs a vector of old
content. Knowledge chunks are never updated in place (a re-ingest deletes and inserts them), so
they need no such trigger.
"""

from __future__ import annotations

from typing import Any

STATEMENTS = [
    "ALTER TABLE memories ADD COLUMN next_embedding BLOB",
    "ALTER TABLE knowledge_chunks ADD COLUMN next_embedding BLOB",
    """
    CREATE TABLE reembed_target (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        model TEXT NOT NULL,
        dimension INTEGER NOT NULL,
        started_at REAL NOT NULL
    )
    """,
    """
    CREATE TRIGGER memories_staged_vector_outdated AFTER UPDATE OF embedding ON memories
    WHEN NEW.next_embedding IS NOT NULL BEGIN
        UPDATE memories SET next_embedding = NULL WHERE pk = NEW.pk;
    END
    """,
]


def up(db: Any) -> None:
    for statement in STATEMENTS:
        db.execute(statement)


def down(db: Any) -> None:
    db.execute("DROP TRIGGER IF EXISTS memories_staged_vector_outdated")
    db.execute("DROP TABLE IF EXISTS reembed_target")
    db.execute("ALTER TABLE knowledge_chunks DROP COLUMN next_embedding")
    db.execute("ALTER TABLE memories DROP COLUMN next_embedding")
