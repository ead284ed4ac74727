"""``occurred_at`` on every memory (issue 17): when the remembered thing was said or happened.

``TIMESTAMPTZ NOT NULL`` like ``created_at``, with no default: the driver writes it on every
insert, and a writer that forgot it fails rather than inventing a time. Existing memories get
their ``created_at``: what they were stored at is the best the store knows of when they
happened. The backfill updates every row (one pass over the table, with index maintenance for
rows whose new version does not fit their page): on a large table run it when writes can wait.

Indexes: (user_id, conversation_id, occurred_at) serves a conversation's memories in time order
(the neighbours of a recalled memory) and replaces ``memories_user_conversation``, its prefix;
(user_id, occurred_at) serves a time window over all of a user's memories. (user_id,
deleted_at, expires_at) lets recall count a user's visible memories with an index-only scan
(the user's own keyword statistics, ``ranking.KeywordStats``): read from the table, the count
was a sequential scan of ~20 ms at 10k memories, more than the rest of the recall. Recall's
access-count write touches none of these columns, so it stays a HOT update.
"""

from __future__ import annotations

from typing import Any


def up(db: Any) -> None:
    db.execute("ALTER TABLE memories ADD COLUMN occurred_at TIMESTAMPTZ")
    db.execute("UPDATE memories SET occurred_at = created_at")
    db.execute("ALTER TABLE memories ALTER COLUMN occurred_at SET NOT NULL")
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
