"""The SQL side of export, import and re-embed for the SQLite driver.

Kept apart from the driver, like ``sqlite_search.py``: every function takes an open connection
inside the caller's transaction (export: one read snapshot; import: one write transaction with a
savepoint per record, so a refused record leaves nothing and the others stay; re-embed: the
staging steps of ``reembed.py``). Table names pasted into SQL come from ``reembed.CORPORA``,
never from input.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np

from app.core.memory.drivers.sqlite_values import from_epoch, to_epoch, vector_blob
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
    "m.expires_at, m.deleted_at, m.created_at, m.updated_at, m.occurred_at, m.embedding "
    "FROM memories m "
    "WHERE (?1 IS NULL OR m.user_id = ?1) ORDER BY m.pk"
)
_MEMORY_UPSERT = (
    "INSERT INTO memories (id, user_id, agent_id, conversation_id, namespace, key, content, "
    "tags, metadata, importance, access_count, last_accessed_at, expires_at, deleted_at, "
    "created_at, updated_at, occurred_at, embedding) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET agent_id = excluded.agent_id, "
    "conversation_id = excluded.conversation_id, namespace = excluded.namespace, "
    "key = excluded.key, content = excluded.content, tags = excluded.tags, "
    "metadata = excluded.metadata, importance = excluded.importance, "
    "access_count = excluded.access_count, last_accessed_at = excluded.last_accessed_at, "
    "expires_at = excluded.expires_at, deleted_at = excluded.deleted_at, "
    "created_at = excluded.created_at, updated_at = excluded.updated_at, "
    "occurred_at = excluded.occurred_at, embedding = excluded.embedding"
)


# -- export ---------------------------------------------------------------------------------


def read_users(conn: sqlite3.Connection, user_id: str | None) -> Iterator[PortableUser]:
    """User records (not users known only from their memories), by id."""
    for row in conn.execute(
            "SELECT user_id, display_name, profile, created_at, updated_at FROM users "
            "WHERE (?1 IS NULL OR user_id = ?1) ORDER BY user_id", (user_id,)):
        yield {"type": "user", "user_id": row[0], "display_name": row[1],
               "profile": json.loads(row[2]), "created_at": from_epoch(row[3]),
               "updated_at": from_epoch(row[4])}


def read_memories(conn: sqlite3.Connection, user_id: str | None, with_embeddings: bool,
                  to_memory: Callable[[sqlite3.Row], Memory]) -> Iterator[PortableMemory]:
    """Memories in every state, in the order they were stored."""
    cursor = conn.execute(_MEMORY_SELECT, (user_id,))
    while rows := cursor.fetchmany(FETCH_SIZE):
        for row in rows:
            vector = np.frombuffer(row["embedding"], dtype=np.float32) if with_embeddings \
                else None
            yield cast(PortableMemory, {"type": "memory", **to_memory(row), "embedding": vector})


def read_documents(conn: sqlite3.Connection,
                   with_embeddings: bool) -> Iterator[PortableDocument]:
    """Knowledge documents with their chunks, in the order they were stored."""
    documents = conn.execute(
        "SELECT pk, doc_id, category, title, metadata, created_at, updated_at "
        "FROM knowledge_documents ORDER BY pk").fetchall()
    for document in documents:
        chunks = conn.execute(
            "SELECT chunk_index, content, embedding FROM knowledge_chunks "
            "WHERE document_pk = ? ORDER BY chunk_index", (document[0],)).fetchall()
        yield {"type": "knowledge_document", "doc_id": document[1], "category": document[2],
               "title": document[3], "metadata": json.loads(document[4]),
               "created_at": from_epoch(document[5]), "updated_at": from_epoch(document[6]),
               "chunks": [{"chunk_index": chunk[0], "content": chunk[1],
                           "embedding": np.frombuffer(chunk[2], dtype=np.float32)
                           if with_embeddings else None} for chunk in chunks]}


# -- import ---------------------------------------------------------------------------------


def write_record(conn: sqlite3.Connection, record: PortableRecord,
                 vectors: list[np.ndarray]) -> str | None:
    """Write one record under a savepoint; the reason it was refused, or ``None``."""
    conn.execute("SAVEPOINT import_record")
    try:
        if record["type"] == "memory":
            reason = _write_memory(conn, record, vectors[0])
        elif record["type"] == "knowledge_document":
            reason = _write_document(conn, record, vectors)
        else:
            reason = _write_user(conn, record)
    except sqlite3.IntegrityError as exc:
        reason = _integrity_reason(record, exc)
    if reason is not None:
        conn.execute("ROLLBACK TO import_record")
    conn.execute("RELEASE import_record")
    return reason


def _write_memory(conn: sqlite3.Connection, memory: PortableMemory,
                  vector: np.ndarray) -> str | None:
    owner = conn.execute("SELECT user_id FROM memories WHERE id = ?", (memory["id"],)).fetchone()
    if owner is not None and owner[0] != memory["user_id"]:
        return f"memory.id {memory['id']!r} belongs to another user here"
    conn.execute(_MEMORY_UPSERT, (
        memory["id"], memory["user_id"], memory["agent_id"], memory["conversation_id"],
        memory["namespace"], memory["key"], memory["content"], json.dumps(memory["tags"]),
        json.dumps(memory["metadata"]), memory["importance"], memory["access_count"],
        to_epoch(memory["last_accessed_at"]), to_epoch(memory["expires_at"]),
        to_epoch(memory["deleted_at"]), to_epoch(memory["created_at"]),
        to_epoch(memory["updated_at"]), to_epoch(occurred_at_of(memory)), vector_blob(vector)))
    return None


def _write_document(conn: sqlite3.Connection, document: PortableDocument,
                    vectors: list[np.ndarray]) -> str | None:
    # Chunks first, explicitly, so that their delete triggers keep FTS and vectors exact.
    conn.execute("DELETE FROM knowledge_chunks WHERE document_pk = "
                 "(SELECT pk FROM knowledge_documents WHERE doc_id = ?)", (document["doc_id"],))
    conn.execute("DELETE FROM knowledge_documents WHERE doc_id = ?", (document["doc_id"],))
    document_pk = conn.execute(
        "INSERT INTO knowledge_documents (doc_id, category, title, metadata, chunk_count, "
        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (document["doc_id"], document["category"], document["title"],
         json.dumps(document["metadata"]), len(document["chunks"]),
         to_epoch(document["created_at"]), to_epoch(document["updated_at"]))).lastrowid
    conn.executemany(
        "INSERT INTO knowledge_chunks (document_pk, chunk_index, content, embedding) "
        "VALUES (?, ?, ?, ?)",
        [(document_pk, chunk["chunk_index"], chunk["content"], vector_blob(vector))
         for chunk, vector in zip(document["chunks"], vectors, strict=True)])
    return None


def _write_user(conn: sqlite3.Connection, user: PortableUser) -> str | None:
    conn.execute(
        "INSERT INTO users (user_id, display_name, profile, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
        "display_name = excluded.display_name, profile = excluded.profile, "
        "created_at = excluded.created_at, updated_at = excluded.updated_at",
        (user["user_id"], user["display_name"], json.dumps(user["profile"]),
         to_epoch(user["created_at"]), to_epoch(user["updated_at"])))
    return None


def _integrity_reason(record: PortableRecord, exc: sqlite3.IntegrityError) -> str:
    if record["type"] == "memory" and "memories" in str(exc) and record["key"] is not None:
        return (f"memory.key {record['key']!r} is held by another memory of user "
                f"{record['user_id']!r} (same agent and namespace) here")
    return f"refused by the database ({exc})"


# -- re-embed -------------------------------------------------------------------------------


def reembed_begin(conn: sqlite3.Connection, model: str, dimension: int) -> ReembedStart:
    """Record the target model; keep an earlier run's staged vectors only if it is the same."""
    target = conn.execute("SELECT model, dimension FROM reembed_target WHERE id = 1").fetchone()
    resumed = target is not None and (target[0], target[1]) == (model, dimension)
    if not resumed:
        for table in CORPORA:
            conn.execute(f"UPDATE {table} SET next_embedding = NULL "
                         "WHERE next_embedding IS NOT NULL")
        conn.execute("INSERT INTO reembed_target (id, model, dimension, started_at) "
                     "VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET model = excluded.model, "
                     "dimension = excluded.dimension, started_at = excluded.started_at",
                     (model, dimension, time.time()))
    total = staged = 0
    for table in CORPORA:
        rows, done = conn.execute(f"SELECT COUNT(*), COUNT(next_embedding) FROM {table}"
                                  ).fetchone()
        total, staged = total + rows, staged + done
    return ReembedStart(resumed=resumed, total=total, staged=staged)


def reembed_pending(conn: sqlite3.Connection, corpus: str, after_pk: int,
                    limit: int) -> list[tuple[int, str]]:
    """Up to ``limit`` rows of ``corpus`` past ``after_pk`` without a staged vector."""
    return [(row[0], row[1]) for row in conn.execute(
        f"SELECT pk, content FROM {corpus_table(corpus)} WHERE pk > ? AND next_embedding IS NULL "
        "ORDER BY pk LIMIT ?", (after_pk, limit))]


def reembed_stage(conn: sqlite3.Connection, corpus: str, rows: list[tuple[int, str]],
                  vectors: np.ndarray) -> None:
    """Stage vectors for rows whose content is still the text they were made from."""
    conn.executemany(
        f"UPDATE {corpus_table(corpus)} SET next_embedding = ? WHERE pk = ? AND content = ?",
        [(vector_blob(vector), pk, text) for (pk, text), vector in zip(rows, vectors, strict=True)])


def reembed_finish(conn: sqlite3.Connection, model: str, dimension: int,
                   embed: Callable[[list[str]], np.ndarray]) -> tuple[dict[str, Any] | None, int]:
    """Stage what is missing, swap every staged vector in, record the model; returns the
    previous identity and how many rows were embedded here. Call inside a write transaction."""
    target = conn.execute("SELECT model, dimension FROM reembed_target WHERE id = 1").fetchone()
    if target is None or (target[0], target[1]) != (model, dimension):
        raise MemoryDriverError("another reembed run for a different model started meanwhile; "
                                "run reembed again")
    late = 0
    for table in CORPORA:
        rows = reembed_pending(conn, table, 0, -1)
        if rows:
            reembed_stage(conn, table, rows, embed([text for _, text in rows]))
            late += len(rows)
        conn.execute(f"UPDATE {table} SET embedding = next_embedding, next_embedding = NULL")
    previous = conn.execute("SELECT model, dimension FROM embedding_identity WHERE id = 1"
                            ).fetchone()
    conn.execute("INSERT INTO embedding_identity (id, model, dimension, recorded_at) "
                 "VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET model = excluded.model, "
                 "dimension = excluded.dimension, recorded_at = excluded.recorded_at",
                 (model, dimension, time.time()))
    conn.execute("DELETE FROM reembed_target")
    return (None if previous is None else {"model": previous[0], "dimension": previous[1]},
            late)

