"""``memory_terms``: which visible memory of a user holds which lexeme, kept by triggers (issue 19).

A recall's keyword pass reads, for each query term, the user's memories that hold it: they give
the term's count (``ranking.KeywordStats``) and the keyword candidates. Through the GIN index on
``memories.content_tsv`` every one of those rows is then read from the table (the scope's columns
and the row's visibility are only there), a row of ~1.9 kB on a half-empty page: at 100k
memories of one user, five query words held by 3-5% of the rows each were ~15,000 rows, most of
a ~30 ms recall. This table holds one narrow row per (user, lexeme, memory) for the memories not
soft-deleted, with the memory's expiry; its primary key (user_id, lexeme, pk) INCLUDE
(expires_at) answers "which of this user's visible rows hold this lexeme" from the index alone.
Recalls with filters (agent, conversation, namespace, tags, importance, time) still go through
the GIN index, which can test those columns on the rows it reads.

The triggers cover every way a row's lexemes, visibility or expiry change: insert (and
``COPY``) and hard delete, one statement-level trigger each over the statement's transition
table; an update that changes ``content``, ``deleted_at`` or ``expires_at`` (update, delete,
restore, a key upsert, an import), one row-level trigger that replaces the row's entries. The
access-count writes change none of those columns and fire nothing. A memory never changes its
user. No lock is shared between two memories' entries (each has its own keys), so concurrent
writers never wait for each other here. ``down`` drops the table, its triggers and their
functions; the functions are created with ``OR REPLACE`` (``migrate.py fresh`` drops tables
only).
"""

from __future__ import annotations

from typing import Any

_TRIGGERS = ("memory_terms_after_insert", "memory_terms_after_update",
             "memory_terms_after_delete")
_FUNCTIONS = ("memory_terms_add_rows", "memory_terms_replace_row", "memory_terms_remove_rows")

STATEMENTS = [
    "CREATE TABLE memory_terms (user_id TEXT NOT NULL, lexeme TEXT NOT NULL, "
    "pk BIGINT NOT NULL, expires_at TIMESTAMPTZ, "
    "PRIMARY KEY (user_id, lexeme, pk) INCLUDE (expires_at))",
    "INSERT INTO memory_terms (user_id, lexeme, pk, expires_at) "
    "SELECT m.user_id, l.lexeme, m.pk, m.expires_at FROM memories m "
    "CROSS JOIN LATERAL unnest(tsvector_to_array(m.content_tsv)) AS l (lexeme) "
    "WHERE m.deleted_at IS NULL",
    "CREATE OR REPLACE FUNCTION memory_terms_add_rows() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO memory_terms (user_id, lexeme, pk, expires_at) "
    "SELECT a.user_id, l.lexeme, a.pk, a.expires_at FROM added a "
    "CROSS JOIN LATERAL unnest(tsvector_to_array(a.content_tsv)) AS l (lexeme) "
    "WHERE a.deleted_at IS NULL; RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION memory_terms_replace_row() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN "
    "IF OLD.deleted_at IS NULL THEN DELETE FROM memory_terms WHERE user_id = OLD.user_id "
    "AND lexeme = ANY(tsvector_to_array(OLD.content_tsv)) AND pk = OLD.pk; END IF; "
    "IF NEW.deleted_at IS NULL THEN INSERT INTO memory_terms (user_id, lexeme, pk, expires_at) "
    "SELECT NEW.user_id, l.lexeme, NEW.pk, NEW.expires_at "
    "FROM unnest(tsvector_to_array(NEW.content_tsv)) AS l (lexeme); END IF; "
    "RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION memory_terms_remove_rows() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN "
    "DELETE FROM memory_terms t USING gone g WHERE g.deleted_at IS NULL "
    "AND t.user_id = g.user_id AND t.lexeme = ANY(tsvector_to_array(g.content_tsv)) "
    "AND t.pk = g.pk; RETURN NULL; END $$",
    "CREATE TRIGGER memory_terms_after_insert AFTER INSERT ON memories "
    "REFERENCING NEW TABLE AS added FOR EACH STATEMENT "
    "EXECUTE FUNCTION memory_terms_add_rows()",
    "CREATE TRIGGER memory_terms_after_update AFTER UPDATE OF content, deleted_at, expires_at "
    "ON memories FOR EACH ROW WHEN (OLD.content IS DISTINCT FROM NEW.content "
    "OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at "
    "OR OLD.expires_at IS DISTINCT FROM NEW.expires_at) "
    "EXECUTE FUNCTION memory_terms_replace_row()",
    "CREATE TRIGGER memory_terms_after_delete AFTER DELETE ON memories "
    "REFERENCING OLD TABLE AS gone FOR EACH STATEMENT "
    "EXECUTE FUNCTION memory_terms_remove_rows()",
    "ANALYZE memory_terms",
]


def up(db: Any) -> None:
    for statement in STATEMENTS:
        db.execute(statement)


def down(db: Any) -> None:
    for trigger in _TRIGGERS:
        db.execute(f"DROP TRIGGER IF EXISTS {trigger} ON memories")
    for function in _FUNCTIONS:
        db.execute(f"DROP FUNCTION IF EXISTS {function}()")
    db.execute("DROP TABLE IF EXISTS memory_terms")
