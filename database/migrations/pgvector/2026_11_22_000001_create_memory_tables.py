"""The PostgreSQL + pgvector schema of the memory layer: memories, knowledge, users, identity.

Vectors are ``vector(384)`` (all-MiniLM-L6-v2) with HNSW indexes over cosine distance; keywords are
a generated ``tsvector`` (english configuration) with a GIN index; tags are ``text[]`` with a GIN
index (``tags @> ARRAY[...]`` and ``&&`` use it); btree indexes serve the tenancy filters and the
keyset pagination. Times are ``timestamptz``. ``memories`` leaves 15% of each page free
(fillfactor 85) so that the access-count update every recall makes stays a HOT update, which
touches no index (an HNSW insertion per recalled row would cost milliseconds). ``pk`` (bigint
identity) is the internal key; public ids are text, as in the SQLite schema.
"""

from __future__ import annotations

from typing import Any

STATEMENTS = [
    "CREATE EXTENSION IF NOT EXISTS vector",
    """
    CREATE TABLE embedding_identity (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        model TEXT NOT NULL,
        dimension INTEGER NOT NULL,
        recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE memories (
        pk BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        agent_id TEXT,
        conversation_id TEXT,
        namespace TEXT NOT NULL DEFAULT 'default',
        key TEXT,
        content TEXT NOT NULL,
        tags TEXT[] NOT NULL DEFAULT '{}',
        metadata JSONB NOT NULL DEFAULT '{}',
        importance REAL NOT NULL DEFAULT 0.5 CHECK (importance BETWEEN 0 AND 1),
        access_count INTEGER NOT NULL DEFAULT 0,
        last_accessed_at TIMESTAMPTZ,
        expires_at TIMESTAMPTZ,
        deleted_at TIMESTAMPTZ,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        embedding vector(384) NOT NULL,
        content_tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED
    ) WITH (fillfactor = 85)
    """,
    "CREATE INDEX memories_user_pk ON memories (user_id, pk)",
    "CREATE INDEX memories_user_created ON memories (user_id, created_at)",
    "CREATE INDEX memories_user_conversation ON memories (user_id, conversation_id)",
    "CREATE INDEX memories_user_agent ON memories (user_id, agent_id)",
    "CREATE INDEX memories_expires ON memories (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE INDEX memories_deleted ON memories (deleted_at) WHERE deleted_at IS NOT NULL",
    """
    CREATE UNIQUE INDEX memories_upsert_key
        ON memories (user_id, COALESCE(agent_id, ''), namespace, key) WHERE key IS NOT NULL
    """,
    "CREATE INDEX memories_tags ON memories USING gin (tags)",
    "CREATE INDEX memories_content_tsv ON memories USING gin (content_tsv)",
    "CREATE INDEX memories_embedding ON memories USING hnsw (embedding vector_cosine_ops)",
    """
    CREATE TABLE knowledge_documents (
        pk BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        doc_id TEXT NOT NULL UNIQUE,
        category TEXT NOT NULL,
        title TEXT,
        metadata JSONB NOT NULL DEFAULT '{}',
        chunk_count INTEGER NOT NULL DEFAULT 0,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL
    )
    """,
    "CREATE INDEX knowledge_documents_category ON knowledge_documents (category)",
    """
    CREATE TABLE knowledge_chunks (
        pk BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        document_pk BIGINT NOT NULL REFERENCES knowledge_documents (pk) ON DELETE CASCADE,
        chunk_index INTEGER NOT NULL,
        content TEXT NOT NULL,
        embedding vector(384) NOT NULL,
        content_tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,
        UNIQUE (document_pk, chunk_index)
    )
    """,
    "CREATE INDEX knowledge_chunks_content_tsv ON knowledge_chunks USING gin (content_tsv)",
    """
    CREATE INDEX knowledge_chunks_embedding
        ON knowledge_chunks USING hnsw (embedding vector_cosine_ops)
    """,
    """
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        display_name TEXT,
        profile JSONB NOT NULL DEFAULT '{}',
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL
    )
    """,
]

TABLES = ["users", "knowledge_chunks", "knowledge_documents", "memories", "embedding_identity"]


def up(db: Any) -> None:
    for statement in STATEMENTS:
        db.execute(statement)


def down(db: Any) -> None:
    # The vector extension stays: other schemas in the database may use it.
    for table in TABLES:
        db.execute(f"DROP TABLE IF EXISTS {table}")
