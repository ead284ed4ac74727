"""``memory_counts``: how many memories each user holds that are not soft-deleted, kept by triggers.

A recall over all of a user's memories (no filter beyond the user) needs the number of visible
memories in its scope, the keyword statistics' N (``ranking.KeywordStats``). Counted from the
(user_id, deleted_at, expires_at) index it cost ~0.6 ms at 10k memories, ~15% of the recall,
and grows with the user. With this table it is ``live`` less the user's expired memories (an
index range over the expired ones only): a constant cost. Recalls with filters still count.

The triggers cover every way a row changes: insert, hard delete (``forget_user``, ``purge``), and
``deleted_at`` set or cleared (delete, restore, a key upsert over a deleted memory). A memory
never changes its user. ``down`` drops the table and its triggers; nothing else reads them.
"""

from __future__ import annotations

from typing import Any

_COUNT_ONE = ("INSERT INTO memory_counts (user_id, live) VALUES (NEW.user_id, 1) "
              "ON CONFLICT (user_id) DO UPDATE SET live = live + 1;")
_UNCOUNT_ONE = "UPDATE memory_counts SET live = live - 1 WHERE user_id = OLD.user_id;"

STATEMENTS = [
    "CREATE TABLE memory_counts (user_id TEXT PRIMARY KEY, live INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO memory_counts (user_id, live) "
    "SELECT user_id, COUNT(*) FROM memories WHERE deleted_at IS NULL GROUP BY user_id",
    "CREATE TRIGGER memory_counts_after_insert AFTER INSERT ON memories "
    f"WHEN NEW.deleted_at IS NULL BEGIN {_COUNT_ONE} END",
    "CREATE TRIGGER memory_counts_after_delete AFTER DELETE ON memories "
    f"WHEN OLD.deleted_at IS NULL BEGIN {_UNCOUNT_ONE} END",
    "CREATE TRIGGER memory_counts_after_soft_delete AFTER UPDATE OF deleted_at ON memories "
    f"WHEN OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL BEGIN {_UNCOUNT_ONE} END",
    "CREATE TRIGGER memory_counts_after_restore AFTER UPDATE OF deleted_at ON memories "
    f"WHEN OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS NULL BEGIN {_COUNT_ONE} END",
]


def up(db: Any) -> None:
    for statement in STATEMENTS:
        db.execute(statement)


def down(db: Any) -> None:
    for trigger in ("after_restore", "after_soft_delete", "after_delete", "after_insert"):
        db.execute(f"DROP TRIGGER IF EXISTS memory_counts_{trigger}")
    db.execute("DROP TABLE IF EXISTS memory_counts")
