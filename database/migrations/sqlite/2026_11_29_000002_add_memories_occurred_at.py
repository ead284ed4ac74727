"""``occurred_at`` on every memory (issue 17): when the remembered thing was said or happened.

UTC epoch seconds (REAL) like the other times. Existing memories get their ``created_at``: what
they were stored at is the best the store knows of when they happened. SQLite can add a NOT NULL
column to a table that has rows only with a constant default, so the column is declared with
``DEFAULT 0`` and filled at once; the driver writes it on every insert and never relies on the
default.

Indexes: (user_id, conversation_id, occurred_at) serves a conversation's memories in time order
(the neighbours of a recalled memory) and replaces ``memories_user_conversation``, its prefix;
(user_id, occurred_at) serves a time window over all of a user's memories. (user_id,
deleted_at, expires_at) lets recall count a user's visible memories from the index alone (the
user's own keyword statistics, ``ranking.KeywordStats``): read from the rows, that count took
~10 ms at 10k memories, more than the rest of the recall.
"""

from __future__ import annotations

from typing import Any


def up(db: Any) -> None:
    db.execute("ALTER TABLE memories ADD COLUMN occurred_at REAL NOT NULL DEFAULT 0")
    db.execute("UPDATE memories SET occurred_at = created_at")
    db.execute("DROP INDEX IF EXISTS memories_user_conversation")
    db.execute("CREATE INDEX memories_user_conversation_occurred "
               "ON memories (user_id, conversation_id, occurred_at)")
    db.execute("CREATE INDEX memories_user_occurred ON memories (user_id, occurred_at)")
    db.execute("CREATE INDEX memories_user_visible ON memories (user_id, deleted_at, expires_at)")


def down(db: Any) -> None:
    db.execute("DROP INDEX IF EXISTS memories_user_visible")
    db.execute("DROP INDEX IF EXISTS memories_user_occurred")
    db.execute("DROP INDEX IF EXISTS memories_user_conversation_occurred")
    db.execute("CREATE INDEX IF NOT EXISTS memories_user_conversation "
               "ON memories (user_id, conversation_id)")
    db.execute("ALTER TABLE memories DROP COLUMN occurred_at")
