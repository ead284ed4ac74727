"""The SQLite schema of the memory layer: memories, knowledge, users, embedding identity.

Times are UTC epoch seconds (REAL); vectors are float32 blobs (``numpy.tobytes``); tags and
metadata are JSON text. Each table has an INTEGER ``pk`` (AUTOINCREMENT, so it only grows) for
joins, FTS and keyset pagination, and public ids are text.

Vector spaces: the SQLite driver keeps each user's vectors (and the knowledge vectors) in memory
and must notice writes made by any connection, in any process. ``vector_spaces`` holds, per space
(``memory:<user_id>``, ``knowledge``), a sequence that triggers bump whenever a vector is added or
changed, and stamp on the row as ``vec_seq``. ``vector_removals`` counts rows removed from each
table (``memories``, ``knowledge_chunks``). A reader compares both numbers with its copy and reads
only the rows whose ``vec_seq`` is newer, or reloads after removals (rare: purge, forget_user,
re-ingest). Removals are counted per table rather than per space so that ``forget_user`` can
delete the user's ``vector_spaces`` row and leave no trace of the id. Triggers, not driver code,
keep these numbers exact whoever writes.
"""

from __future__ import annotations

from typing import Any

STATEMENTS = [
    """
    CREATE TABLE vector_spaces (
        space TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE vector_removals (
        scope TEXT PRIMARY KEY,
        removed INTEGER NOT NULL DEFAULT 0
    )
    """,
    "INSERT INTO vector_removals (scope, removed) VALUES ('memories', 0), ('knowledge_chunks', 0)",
    """
    CREATE TABLE embedding_identity (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        model TEXT NOT NULL,
        dimension INTEGER NOT NULL,
        recorded_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE memories (
        pk INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        agent_id TEXT,
        conversation_id TEXT,
        namespace TEXT NOT NULL DEFAULT 'default',
        key TEXT,
        content TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        importance REAL NOT NULL DEFAULT 0.5 CHECK (importance BETWEEN 0 AND 1),
        access_count INTEGER NOT NULL DEFAULT 0,
        last_accessed_at REAL,
        expires_at REAL,
        deleted_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        embedding BLOB NOT NULL,
        vec_seq INTEGER NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX memories_user_created ON memories (user_id, created_at)",
    "CREATE INDEX memories_user_vec_seq ON memories (user_id, vec_seq)",
    "CREATE INDEX memories_user_conversation ON memories (user_id, conversation_id)",
    "CREATE INDEX memories_user_agent ON memories (user_id, agent_id)",
    "CREATE INDEX memories_expires ON memories (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE INDEX memories_deleted ON memories (deleted_at) WHERE deleted_at IS NOT NULL",
    """
    CREATE UNIQUE INDEX memories_upsert_key
        ON memories (user_id, COALESCE(agent_id, ''), namespace, key) WHERE key IS NOT NULL
    """,
    """
    CREATE VIRTUAL TABLE memories_fts USING fts5(
        content, content='memories', content_rowid='pk',
        tokenize='porter unicode61 remove_diacritics 2'
    )
    """,
    """
    CREATE TRIGGER memories_after_insert AFTER INSERT ON memories BEGIN
        INSERT INTO memories_fts (rowid, content) VALUES (NEW.pk, NEW.content);
        INSERT INTO vector_spaces (space, last_seq) VALUES ('memory:' || NEW.user_id, 1)
            ON CONFLICT (space) DO UPDATE SET last_seq = last_seq + 1;
        UPDATE memories SET vec_seq =
            (SELECT last_seq FROM vector_spaces WHERE space = 'memory:' || NEW.user_id)
            WHERE pk = NEW.pk;
    END
    """,
    """
    CREATE TRIGGER memories_after_content_update AFTER UPDATE OF content ON memories BEGIN
        INSERT INTO memories_fts (memories_fts, rowid, content)
            VALUES ('delete', OLD.pk, OLD.content);
        INSERT INTO memories_fts (rowid, content) VALUES (NEW.pk, NEW.content);
    END
    """,
    """
    CREATE TRIGGER memories_after_embedding_update AFTER UPDATE OF embedding ON memories BEGIN
        INSERT INTO vector_spaces (space, last_seq) VALUES ('memory:' || NEW.user_id, 1)
            ON CONFLICT (space) DO UPDATE SET last_seq = last_seq + 1;
        UPDATE memories SET vec_seq =
            (SELECT last_seq FROM vector_spaces WHERE space = 'memory:' || NEW.user_id)
            WHERE pk = NEW.pk;
    END
    """,
    """
    CREATE TRIGGER memories_after_delete AFTER DELETE ON memories BEGIN
        INSERT INTO memories_fts (memories_fts, rowid, content)
            VALUES ('delete', OLD.pk, OLD.content);
        UPDATE vector_removals SET removed = removed + 1 WHERE scope = 'memories';
    END
    """,
    """
    CREATE TABLE knowledge_documents (
        pk INTEGER PRIMARY KEY AUTOINCREMENT,
        doc_id TEXT NOT NULL UNIQUE,
        category TEXT NOT NULL,
        title TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        chunk_count INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
    "CREATE INDEX knowledge_documents_category ON knowledge_documents (category)",
    """
    CREATE TABLE knowledge_chunks (
        pk INTEGER PRIMARY KEY AUTOINCREMENT,
        document_pk INTEGER NOT NULL REFERENCES knowledge_documents (pk) ON DELETE CASCADE,
        chunk_index INTEGER NOT NULL,
        content TEXT NOT NULL,
        embedding BLOB NOT NULL,
        vec_seq INTEGER NOT NULL DEFAULT 0,
        UNIQUE (document_pk, chunk_index)
    )
    """,
    "CREATE INDEX knowledge_chunks_vec_seq ON knowledge_chunks (vec_seq)",
    """
    CREATE VIRTUAL TABLE knowledge_fts USING fts5(
        content, content='knowledge_chunks', content_rowid='pk',
        tokenize='porter unicode61 remove_diacritics 2'
    )
    """,
    """
    CREATE TRIGGER knowledge_chunks_after_insert AFTER INSERT ON knowledge_chunks BEGIN
        INSERT INTO knowledge_fts (rowid, content) VALUES (NEW.pk, NEW.content);
        INSERT INTO vector_spaces (space, last_seq) VALUES ('knowledge', 1)
            ON CONFLICT (space) DO UPDATE SET last_seq = last_seq + 1;
        UPDATE knowledge_chunks SET vec_seq =
            (SELECT last_seq FROM vector_spaces WHERE space = 'knowledge')
            WHERE pk = NEW.pk;
    END
    """,
    """
    CREATE TRIGGER knowledge_chunks_after_delete AFTER DELETE ON knowledge_chunks BEGIN
        INSERT INTO knowledge_fts (knowledge_fts, rowid, content)
            VALUES ('delete', OLD.pk, OLD.content);
        UPDATE vector_removals SET removed = removed + 1 WHERE scope = 'knowledge_chunks';
    END
    """,
    """
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        display_name TEXT,
        profile TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
]

TABLES = ["users", "knowledge_fts", "knowledge_chunks", "knowledge_documents", "memories_fts",
          "memories", "embedding_identity", "vector_removals", "vector_spaces"]


def up(db: Any) -> None:
    for statement in STATEMENTS:
        db.execute(statement)


def down(db: Any) -> None:
    # Dropping a table drops its indexes and triggers with it.
    for table in TABLES:
        db.execute(f"DROP TABLE IF EXISTS {table}")
