"""The SQL side of export, import and re-embed for the PGVector driver.

Every function takes a connection inside the caller's transaction. Export reads through
server-side cursors in one ``REPEATABLE READ`` transaction (one snapshot, constant memory).
Import writes each record under a savepoint (psycopg's nested ``transaction()``), so a refused
record leaves nothing and the others stay. Re-embed follows ``reembed.py``; its swap is the one
place outside the migrations that alters a table, because the column type records the vector
size, which a new model may change: ``ALTER ... TYPE vector(n) USING next_embedding`` rewrites
the table once and rebuilds its indexes (HNSW included) in bulk. Table names pasted into SQL come
from ``reembed.CORPORA``, never from input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np

from app.core.memory.errors import MemoryDriverError
from app.core.memory.portable import (
    PortableDocument,
    PortableMemory,
    PortableRecord,
    PortableUser,
    occurred_at_of,
)
from app.core.memory.records import Memory
from app.core.memory.reembed import CORPORA, ReembedStart, corpus_table

#: Rows fetched per round trip while exporting.
FETCH_SIZE = 500

_MEMORY_SELECT = (
    "SELECT m.pk, m.id, m.user_id, m.agent_id, m.conversation_id, m.namespace, m.key, "
    "m.content, m.tags, m.metadata, m.importance, m.access_count, m.last_accessed_at, "
    "m.expires_at, m.deleted_at, m.created_at, m.updated_at, m.occurred_at, m.embedding::real[] "
    "FROM memories m WHERE (%(user)s::text IS NULL OR m.user_id = %(user)s) ORDER BY m.pk"
)
_MEMORY_UPSERT = (
    "INSERT INTO memories (id, user_id, agent_id, conversation_id, namespace, key, content, "
    "tags, metadata, importance, access_count, last_accessed_at, expires_at, deleted_at, "
    "created_at, updated_at, occurred_at, embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, "
    "%s::text[], %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::vector) "
    "ON CONFLICT (id) DO UPDATE SET agent_id = EXCLUDED.agent_id, "
    "conversation_id = EXCLUDED.conversation_id, namespace = EXCLUDED.namespace, "
    "key = EXCLUDED.key, content = EXCLUDED.content, tags = EXCLUDED.tags, "
    "metadata = EXCLUDED.metadata, importance = EXCLUDED.importance, "
    "access_count = EXCLUDED.access_count, last_accessed_at = EXCLUDED.last_accessed_at, "
    "expires_at = EXCLUDED.expires_at, deleted_at = EXCLUDED.deleted_at, "
    "created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, "
    "occurred_at = EXCLUDED.occurred_at, embedding = EXCLUDED.embedding"
)


# -- export ---------------------------------------------------------------------------------


def read_users(conn: Any, user_id: str | None) -> Iterator[PortableUser]:
    """User records (not users known only from their memories), by id."""
    rows = conn.execute(
        "SELECT user_id, display_name, profile, created_at, updated_at FROM users "
        "WHERE (%(user)s::text IS NULL OR user_id = %(user)s) ORDER BY user_id",
        {"user": user_id}).fetchall()
    for row in rows:
        yield {"type": "user", "user_id": row[0], "display_name": row[1],
               "profile": dict(row[2]), "created_at": row[3], "updated_at": row[4]}


def read_memories(conn: Any, user_id: str | None, with_embeddings: bool,
                  to_memory: Callable[[tuple[Any, ...]], Memory]) -> Iterator[PortableMemory]:
    """Memories in every state, in the order they were stored."""
    with conn.cursor(name="export_memories") as cursor:
        cursor.itersize = FETCH_SIZE
        cursor.execute(_MEMORY_SELECT, {"user": user_id})
        for row in cursor:
            vector = np.asarray(row[18], dtype=np.float32) if with_embeddings else None
            yield cast(PortableMemory, {"type": "memory", **to_memory(row), "embedding": vector})


def read_documents(conn: Any, with_embeddings: bool) -> Iterator[PortableDocument]:
    """Knowledge documents with their chunks, in the order they were stored."""
    documents = conn.execute(
        "SELECT pk, doc_id, category, title, metadata, created_at, updated_at "
        "FROM knowledge_documents ORDER BY pk").fetchall()
    for document in documents:
        chunks = conn.execute(
            "SELECT chunk_index, content, embedding::real[] FROM knowledge_chunks "
            "WHERE document_pk = %s ORDER BY chunk_index", (document[0],)).fetchall()
        yield {"type": "knowledge_document", "doc_id": document[1], "category": document[2],
               "title": document[3], "metadata": dict(document[4]),
               "created_at": document[5], "updated_at": document[6],
               "chunks": [{"chunk_index": chunk[0], "content": chunk[1],
                           "embedding": np.asarray(chunk[2], dtype=np.float32)
                           if with_embeddings else None} for chunk in chunks]}


# -- import ---------------------------------------------------------------------------------


def write_record(conn: Any, record: PortableRecord, vectors: list[np.ndarray],
                 literal: Callable[[np.ndarray], str], jsonb: Callable[[Any], Any]) -> str | None:
    """Write one record under a savepoint of the batch's transaction; the reason it was
    refused, or ``None``. Any other error leaves the savepoint open for the caller's transaction
    to roll back, batch and all.

    Explicit ``SAVEPOINT`` statements, not ``conn.transaction()``: on a connection with no
    transaction open yet, the latter is a transaction of its own and commits the record at once,
    so a batch that failed later kept its first records (issue 15, item 9). The statement below
    opens the batch's transaction (psycopg's implicit ``BEGIN``) when none is open.
    """
    from psycopg import errors

    conn.execute("SAVEPOINT import_record")
    try:
        reason = None
        if record["type"] == "memory":
            reason = _write_memory(conn, record, literal(vectors[0]), jsonb)
        elif record["type"] == "knowledge_document":
            _write_document(conn, record, [literal(vector) for vector in vectors], jsonb)
        else:
            _write_user(conn, record, jsonb)
    except errors.IntegrityError as exc:
        conn.execute("ROLLBACK TO SAVEPOINT import_record")
        if record["type"] == "memory" and record["key"] is not None and \
                isinstance(exc, errors.UniqueViolation):
            return (f"memory.key {record['key']!r} is held by another memory of user "
                    f"{record['user_id']!r} (same agent and namespace) here")
        return f"refused by the database ({type(exc).__name__})"
    conn.execute("RELEASE SAVEPOINT import_record")
    return reason


def _write_memory(conn: Any, memory: PortableMemory, vector: str,
                  jsonb: Callable[[Any], Any]) -> str | None:
    owner = conn.execute("SELECT user_id FROM memories WHERE id = %s",
                         (memory["id"],)).fetchone()
    if owner is not None and owner[0] != memory["user_id"]:
        return f"memory.id {memory['id']!r} belongs to another user here"
    conn.execute(_MEMORY_UPSERT, (
        memory["id"], memory["user_id"], memory["agent_id"], memory["conversation_id"],
        memory["namespace"], memory["key"], memory["content"], memory["tags"],
        jsonb(memory["metadata"]), memory["importance"], memory["access_count"],
        memory["last_accessed_at"], memory["expires_at"], memory["deleted_at"],
        memory["created_at"], memory["updated_at"], occurred_at_of(memory), vector))
    return None


def _write_document(conn: Any, document: PortableDocument, vectors: list[str],
                    jsonb: Callable[[Any], Any]) -> None:
    conn.execute("DELETE FROM knowledge_documents WHERE doc_id = %s", (document["doc_id"],))
    document_pk = conn.execute(
        "INSERT INTO knowledge_documents (doc_id, category, title, metadata, chunk_count, "
        "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING pk",
        (document["doc_id"], document["category"], document["title"],
         jsonb(document["metadata"]), len(document["chunks"]), document["created_at"],
         document["updated_at"])).fetchone()[0]
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO knowledge_chunks (document_pk, chunk_index, content, embedding) "
            "VALUES (%s, %s, %s, %s::vector)",
            [(document_pk, chunk["chunk_index"], chunk["content"], vector)
             for chunk, vector in zip(document["chunks"], vectors, strict=True)])


def _write_user(conn: Any, user: PortableUser, jsonb: Callable[[Any], Any]) -> None:
    conn.execute(
        "INSERT INTO users (user_id, display_name, profile, created_at, updated_at) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (user_id) DO UPDATE SET "
        "display_name = EXCLUDED.display_name, profile = EXCLUDED.profile, "
        "created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at",
        (user["user_id"], user["display_name"], jsonb(user["profile"]), user["created_at"],
         user["updated_at"]))


# -- re-embed -------------------------------------------------------------------------------


def reembed_begin(conn: Any, model: str, dimension: int) -> ReembedStart:
    """Record the target model; keep an earlier run's staged vectors only if it is the same."""
    target = conn.execute(
        "SELECT model, dimension FROM reembed_target WHERE id = 1 FOR UPDATE").fetchone()
    resumed = target is not None and (target[0], target[1]) == (model, dimension)
    if not resumed:
        for table in CORPORA:
            conn.execute(f"UPDATE {table} SET next_embedding = NULL "
                         "WHERE next_embedding IS NOT NULL")
        conn.execute("INSERT INTO reembed_target (id, model, dimension, started_at) "
                     "VALUES (1, %s, %s, now()) ON CONFLICT (id) DO UPDATE SET "
                     "model = EXCLUDED.model, dimension = EXCLUDED.dimension, "
                     "started_at = EXCLUDED.started_at", (model, dimension))
    total = staged = 0
    for table in CORPORA:
        rows, done = conn.execute(f"SELECT COUNT(*), COUNT(next_embedding) FROM {table}"
                                  ).fetchone()
        total, staged = total + rows, staged + done
    return ReembedStart(resumed=resumed, total=total, staged=staged)


def reembed_pending(conn: Any, corpus: str, after_pk: int,
                    limit: int | None) -> list[tuple[int, str]]:
    """Up to ``limit`` (``None``: all) rows of ``corpus`` past ``after_pk`` without a staged
    vector."""
    return [(row[0], row[1]) for row in conn.execute(
        f"SELECT pk, content FROM {corpus_table(corpus)} WHERE pk > %s AND next_embedding IS NULL "
        "ORDER BY pk LIMIT %s", (after_pk, limit))]


def reembed_stage(conn: Any, corpus: str, rows: list[tuple[int, str]], vectors: list[str]) -> None:
    """Stage vectors (as pgvector literals) for rows whose content is still the text they were
    made from."""
    with conn.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {corpus_table(corpus)} SET next_embedding = %s::vector "
            "WHERE pk = %s AND content = %s",
            [(vector, pk, text) for (pk, text), vector in zip(rows, vectors, strict=True)])


def reembed_finish(conn: Any, model: str, dimension: int,
                   embed: Callable[[list[str]], list[str]]) -> tuple[dict[str, Any] | None, int]:
    """Stage what is missing, swap every staged vector in, record the model; returns the
    previous identity and how many rows were embedded here."""
    # Writers wait from here to the commit; readers go on until the ALTER takes its lock.
    conn.execute("LOCK TABLE memories, knowledge_chunks IN SHARE ROW EXCLUSIVE MODE")
    target = conn.execute("SELECT model, dimension FROM reembed_target WHERE id = 1").fetchone()
    if target is None or (target[0], target[1]) != (model, dimension):
        raise MemoryDriverError("another reembed run for a different model started meanwhile; "
                                "run reembed again")
    late = 0
    size = int(dimension)
    for table in CORPORA:
        rows = reembed_pending(conn, table, 0, None)
        if rows:
            reembed_stage(conn, table, rows, embed([text for _, text in rows]))
            late += len(rows)
        conn.execute(f"ALTER TABLE {table} "
                     f"ALTER COLUMN embedding TYPE vector({size}) "
                     f"USING next_embedding::vector({size}), "
                     "ALTER COLUMN next_embedding TYPE vector USING NULL")
    previous = conn.execute("SELECT model, dimension FROM embedding_identity WHERE id = 1"
                            ).fetchone()
    conn.execute("INSERT INTO embedding_identity (id, model, dimension, recorded_at) "
                 "VALUES (1, %s, %s, now()) ON CONFLICT (id) DO UPDATE SET "
                 "model = EXCLUDED.model, dimension = EXCLUDED.dimension, "
                 "recorded_at = EXCLUDED.recorded_at", (model, size))
    conn.execute("DELETE FROM reembed_target")
    return (None if previous is None else {"model": previous[0], "dimension": previous[1]},
            late)
