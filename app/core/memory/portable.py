"""The export format: versioned JSON Lines, one record per line, written and read as a stream.

A dump is what ``export`` writes and ``import`` reads (``transfer.py``)::

    {"format": "agent-memory-export", "version": 1, "exported_at": "...", "driver": "sqlite",
     "user_id": null, "embedding": {"model": "all-MiniLM-L6-v2", "dimension": 384},
     "with_embeddings": true}
    {"type": "user", "user_id": ..., "display_name": ..., "profile": {...}, "created_at": ...,
     "updated_at": ...}
    {"type": "memory", "id": ..., "user_id": ..., every other field of a Memory, "embedding": ...}
    {"type": "knowledge_document", "doc_id": ..., "category": ..., "title": ..., "metadata": ...,
     "created_at": ..., "updated_at": ..., "chunks": [{"chunk_index": 0, "content": ...,
     "embedding": ...}, ...]}
    {"type": "end", "counts": {"users": 1, "memories": 2, "knowledge_documents": 0}}

The first line is the header; ``end`` is the last line, so a file cut short is recognised.
Memories come in every state (soft-deleted and expired ones too) with their ids, timestamps and
access counts. ``occurred_at`` came with issue 17: a memory line without it (an older dump) is
read with its ``created_at``, which is what the migration gave the memories stored before.
Knowledge documents carry their chunks as stored (the full text is not kept, so chunks are not
split again). Datetimes are ISO 8601 in UTC. ``embedding`` (present only when the
header's ``with_embeddings`` is true) is the base64 of the little-endian float32 vector: exact and
a third of the size of decimal numbers. A reader of version ``VERSION`` ignores keys it does not
know, so a later version can add fields without breaking older readers.

``parse_record`` checks one decoded line against the same rules as the verbs (``validation.py``)
and returns a ``PortableRecord`` whose ``embedding`` is a numpy vector or ``None``. A dump is
input like any other, so a crafted one is refused line by line, never trusted: times must be
representable in UTC, ``access_count`` must fit the databases' 32-bit column, and a vector must
have the header's dimension and finite numbers; one whose norm is not 1 (every embedder here
normalises) is dropped (``None``) so that the target embeds the text itself: a vector scaled up
to rank first for every query is never taken as it is.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

import numpy as np

from app.core.memory.errors import InvalidInputError
from app.core.memory.records import Memory
from app.core.memory.validation import (
    MAX_PROFILE_BYTES,
    MAX_TITLE_CHARS,
    OCCURRED_AT_END,
    OCCURRED_AT_MIN,
    check_content,
    check_display_name,
    check_id,
    check_importance,
    check_json_object,
    check_metadata,
    check_optional_id,
    check_tags,
    check_text,
)

FORMAT = "agent-memory-export"
VERSION = 1
#: How long a knowledge chunk may be (chunking keeps them far shorter).
MAX_CHUNK_CHARS = 20_000
MAX_CHUNKS = 100_000
#: The largest ``access_count`` the databases' INTEGER columns hold.
MAX_ACCESS_COUNT = 2**31 - 1
#: How far from 1 a stored vector's length may be (float32 rounding stays far below).
NORM_TOLERANCE = 1e-3

logger = logging.getLogger(__name__)


class PortableUser(TypedDict):
    """A user record as dumped."""

    type: Literal["user"]
    user_id: str
    display_name: str | None
    profile: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class PortableMemory(Memory):
    """A memory in any state, as dumped (never with a ``score``), with its vector when the dump
    carries vectors."""

    type: Literal["memory"]
    embedding: np.ndarray | None


class PortableChunk(TypedDict):
    """One stored chunk of a knowledge document."""

    chunk_index: int
    content: str
    embedding: np.ndarray | None


class PortableDocument(TypedDict):
    """A knowledge document with its chunks, as dumped."""

    type: Literal["knowledge_document"]
    doc_id: str
    category: str
    title: str | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    chunks: list[PortableChunk]


PortableRecord = PortableUser | PortableMemory | PortableDocument

_MEMORY_FIELDS = ("id", "user_id", "agent_id", "conversation_id", "namespace", "key", "content",
                  "tags", "metadata", "importance", "access_count", "last_accessed_at",
                  "expires_at", "deleted_at", "created_at", "updated_at")


def header(*, driver: str, user_id: str | None, embedding: dict[str, Any] | None,
           with_embeddings: bool) -> dict[str, Any]:
    """The first line of a dump."""
    return {"format": FORMAT, "version": VERSION,
            "exported_at": datetime.now(UTC).isoformat(), "driver": driver, "user_id": user_id,
            "embedding": embedding if with_embeddings else None,
            "with_embeddings": with_embeddings}


def check_header(value: Any) -> dict[str, Any]:
    """The header line, checked: this format, a version this reader knows."""
    if not isinstance(value, Mapping) or value.get("format") != FORMAT:
        raise InvalidInputError(f"the first line must be the header of an {FORMAT} file")
    version = value.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise InvalidInputError(f"version must be 1..{VERSION} (got {version!r}); a newer "
                                "file needs a newer release of this library")
    embedding = value.get("embedding")
    if embedding is not None and not (
            isinstance(embedding, Mapping) and isinstance(embedding.get("model"), str)
            and isinstance(embedding.get("dimension"), int)):
        raise InvalidInputError("header.embedding must be null or {\"model\": str, "
                                "\"dimension\": int}")
    return dict(value)


def to_json_line(record: PortableRecord | Mapping[str, Any]) -> str:
    """One record as a line of JSON (with its newline)."""
    return json.dumps(record, default=_encode, ensure_ascii=False, allow_nan=False) + "\n"


def parse_record(value: Any, dimension: int | None) -> PortableRecord:
    """A decoded line as a checked record; ``InvalidInputError`` names the field and the rule.

    ``dimension`` is the header's vector size (``None``: the dump carries no vectors).
    """
    if not isinstance(value, Mapping):
        raise InvalidInputError("a record must be a JSON object")
    kind = value.get("type")
    if kind == "memory":
        return _parse_memory(value, dimension)
    if kind == "knowledge_document":
        return _parse_document(value, dimension)
    if kind == "user":
        return {"type": "user", "user_id": check_id(value.get("user_id"), "user.user_id"),
                "display_name": check_display_name(value.get("display_name")),
                "profile": check_json_object(value.get("profile"), "user.profile",
                                             max_bytes=MAX_PROFILE_BYTES),
                "created_at": _time(value, "created_at", "user"),
                "updated_at": _time(value, "updated_at", "user")}
    raise InvalidInputError(
        f"type must be one of memory, knowledge_document, user, end (got {kind!r})")


def _parse_memory(value: Mapping[str, Any], dimension: int | None) -> PortableMemory:
    access_count = value.get("access_count", 0)
    if isinstance(access_count, bool) or not isinstance(access_count, int) or not (
            0 <= access_count <= MAX_ACCESS_COUNT):
        shown = access_count if len(repr(access_count)) <= 40 else "a number too large to show"
        raise InvalidInputError(
            f"memory.access_count must be a whole number 0..{MAX_ACCESS_COUNT} (got {shown!r})")
    missing = [name for name in _MEMORY_FIELDS if name not in value]
    if missing:
        raise InvalidInputError(f"memory must have the fields {', '.join(missing)}")
    return {
        "type": "memory",
        "id": check_id(value["id"], "memory.id"),
        "user_id": check_id(value["user_id"], "memory.user_id"),
        "agent_id": check_optional_id(value["agent_id"], "memory.agent_id"),
        "conversation_id": check_optional_id(value["conversation_id"], "memory.conversation_id"),
        "namespace": check_id(value["namespace"], "memory.namespace"),
        "key": check_optional_id(value["key"], "memory.key"),
        "content": check_content(value["content"], "memory.content"),
        "tags": check_tags(value["tags"], "memory.tags"),
        "metadata": check_metadata(value["metadata"], "memory.metadata"),
        "importance": check_importance(value["importance"], "memory.importance"),
        "access_count": access_count,
        "last_accessed_at": _time(value, "last_accessed_at", "memory", optional=True),
        "expires_at": _time(value, "expires_at", "memory", optional=True),
        "deleted_at": _time(value, "deleted_at", "memory", optional=True),
        "created_at": _time(value, "created_at", "memory"),
        "updated_at": _time(value, "updated_at", "memory"),
        "occurred_at": _occurred_at(value),
        "embedding": _vector(value.get("embedding"), dimension, "memory.embedding"),
    }


def _occurred_at(value: Mapping[str, Any]) -> datetime:
    """``occurred_at`` in ``validation.check_occurred_at``'s range; ``created_at`` if absent."""
    if "occurred_at" not in value:
        return _time(value, "created_at", "memory")
    text = value["occurred_at"]
    moment = _time(value, "occurred_at", "memory")
    if not OCCURRED_AT_MIN <= moment < OCCURRED_AT_END:
        raise InvalidInputError(
            "memory.occurred_at must be an ISO 8601 time with a UTC offset, from 0001-01-02 to "
            f"9999-12-30 in UTC (got {text!r})")
    return moment


def occurred_at_of(memory: PortableMemory) -> datetime:
    """A record's ``occurred_at``; its ``created_at`` for a record made without one (by code
    written before issue 17), as ``parse_record`` reads an older dump."""
    return memory.get("occurred_at") or memory["created_at"]


def _parse_document(value: Mapping[str, Any], dimension: int | None) -> PortableDocument:
    title = value.get("title")
    chunks = value.get("chunks")
    if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS:
        raise InvalidInputError(
            f"knowledge_document.chunks must be a list of 1..{MAX_CHUNKS} chunks")
    parsed: list[PortableChunk] = []
    for position, chunk in enumerate(chunks):
        name = f"knowledge_document.chunks[{position}]"
        if not isinstance(chunk, Mapping) or chunk.get("chunk_index") != position:
            raise InvalidInputError(f"{name} must be an object with chunk_index {position}")
        parsed.append({"chunk_index": position,
                       "content": check_text(chunk.get("content"), f"{name}.content",
                                             max_chars=MAX_CHUNK_CHARS),
                       "embedding": _vector(chunk.get("embedding"), dimension,
                                            f"{name}.embedding")})
    return {
        "type": "knowledge_document",
        "doc_id": check_id(value.get("doc_id"), "knowledge_document.doc_id"),
        "category": check_id(value.get("category"), "knowledge_document.category"),
        "title": None if title is None else check_text(
            title, "knowledge_document.title", max_chars=MAX_TITLE_CHARS),
        "metadata": check_metadata(value.get("metadata"), "knowledge_document.metadata"),
        "created_at": _time(value, "created_at", "knowledge_document"),
        "updated_at": _time(value, "updated_at", "knowledge_document"),
        "chunks": parsed,
    }


def _time(value: Mapping[str, Any], field: str, kind: str, *,
          optional: bool = False) -> Any:
    text = value.get(field)
    if text is None and optional:
        return None
    try:
        moment = datetime.fromisoformat(text) if isinstance(text, str) else None
        # Years 1 and 9999 with an offset can fall outside what UTC can represent.
        utc = moment.astimezone(UTC) if moment is not None and moment.tzinfo else None
    except (ValueError, OverflowError):
        utc = None
    if utc is None:
        rule = "null or " if optional else ""
        shown = text if not isinstance(text, str) or len(text) <= 60 else text[:57] + "..."
        raise InvalidInputError(f"{kind}.{field} must be {rule}an ISO 8601 time with a UTC "
                                f"offset, within years 1..9999 in UTC (got {shown!r})")
    return utc


def _vector(encoded: Any, dimension: int | None, name: str) -> np.ndarray | None:
    if encoded is None or dimension is None:
        return None
    try:
        raw = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 4 * dimension:
        raise InvalidInputError(f"{name} must be base64 of {dimension} little-endian float32")
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise InvalidInputError(f"{name} must hold finite numbers")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        # Not what a model makes: drop it, and the target embeds the text itself.
        logger.info("%s has length %.6g, not 1: dropped, the text is embedded again", name, norm)
        return None
    return vector


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return base64.b64encode(np.asarray(value, dtype="<f4").tobytes()).decode("ascii")
    raise TypeError(f"cannot serialise {type(value).__name__}")
