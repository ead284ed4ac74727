"""``memory_counts``: how many memories each user holds that are not soft-deleted, kept by triggers
(issue 19; the SQLite schema has the same table since its own 2026_12_04 migration).

A recall over all of a user's memories (no filter beyond the user) needs the number of visible
memories in its scope: the keyword statistics' N (``ranking.KeywordStats``) and what chooses
between an exact scan and the HNSW index. Counted from the (user_id, deleted_at, expires_at)
index it cost ~1.3 ms at 10k memories and grew with the user; worse, recall's own access-count
writes keep clearing the pages' all-visible bits, so the "index-only" scan visited the table
for a fifth of the rows. With this table it is ``live`` less the user's expired memories (an
index range over the expired ones only): a constant cost. Recalls with filters still count.

Locking: a counter row is locked by the transaction that changes it until that transaction
ends, so the insert and soft-delete triggers are constraint triggers deferred to the commit:
a long ``store_many`` (which embeds while its transaction is open) takes its users' counter
rows only while it commits, and a concurrent store for the same user waits for that commit
only. Deletes (``forget_user``, ``purge``: one statement, then the commit) are counted by one
statement-level trigger that updates the counter rows in user order, so two of them, or one and
a committing writer, cannot lock two users' counters in opposite orders.

The triggers cover every way a row changes: insert, hard delete, and ``deleted_at`` set or
cleared (delete, restore, a key upsert over a deleted memory, an import). A memory never changes
its user. ``down`` drops the table, its triggers and their functions; nothing else reads them.
The functions are created with ``OR REPLACE``: ``migrate.py fresh`` drops tables only, so after
it the functions are still there for ``up`` to meet.
"""

from __future__ import annotations

from typing import Any

_TRIGGERS = ("memory_counts_after_insert", "memory_counts_after_soft_delete",
             "memory_counts_after_restore", "memory_counts_after_delete")
_FUNCTIONS = ("memory_counts_count_one", "memory_counts_uncount_one",
              "memory_counts_uncount_deleted")

STATEMENTS = [
    "CREATE TABLE memory_counts (user_id TEXT PRIMARY KEY, live BIGINT NOT NULL)",
    "INSERT INTO memory_counts (user_id, live) "
    "SELECT user_id, COUNT(*) FROM memories WHERE deleted_at IS NULL GROUP BY user_id",
    "CREATE OR REPLACE FUNCTION memory_counts_count_one() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO memory_counts AS c (user_id, live) VALUES (NEW.user_id, 1) "
    "ON CONFLICT (user_id) DO UPDATE SET live = c.live + 1; RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION memory_counts_uncount_one() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN "
    "UPDATE memory_counts SET live = live - 1 WHERE user_id = OLD.user_id; RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION memory_counts_uncount_deleted() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ "
    "DECLARE gone_of_user record; BEGIN "
    "FOR gone_of_user IN SELECT user_id, COUNT(*) AS n FROM gone WHERE deleted_at IS NULL "
    "GROUP BY user_id ORDER BY user_id LOOP "
    "UPDATE memory_counts SET live = live - gone_of_user.n "
    "WHERE user_id = gone_of_user.user_id; END LOOP; RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER memory_counts_after_insert AFTER INSERT ON memories "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.deleted_at IS NULL) "
    "EXECUTE FUNCTION memory_counts_count_one()",
    "CREATE CONSTRAINT TRIGGER memory_counts_after_soft_delete AFTER UPDATE OF deleted_at "
    "ON memories DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
    "WHEN (OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL) "
    "EXECUTE FUNCTION memory_counts_uncount_one()",
    "CREATE CONSTRAINT TRIGGER memory_counts_after_restore AFTER UPDATE OF deleted_at "
    "ON memories DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
    "WHEN (OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS NULL) "
    "EXECUTE FUNCTION memory_counts_count_one()",
    "CREATE TRIGGER memory_counts_after_delete AFTER DELETE ON memories "
    "REFERENCING OLD TABLE AS gone FOR EACH STATEMENT "
    "EXECUTE FUNCTION memory_counts_uncount_deleted()",
]


def up(db: Any) -> None:
    for statement in STATEMENTS:
        db.execute(statement)


def down(db: Any) -> None:
    for trigger in _TRIGGERS:
        db.execute(f"DROP TRIGGER IF EXISTS {trigger} ON memories")
    for function in _FUNCTIONS:
        db.execute(f"DROP FUNCTION IF EXISTS {function}()")
    db.execute("DROP TABLE IF EXISTS memory_counts")
