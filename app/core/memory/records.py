"""The records the contract returns: TypedDicts, so plain dicts at run time.

Datetimes are timezone-aware UTC. ``score`` is present on recall results only: a number in 0..1,
higher is better.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict


class Memory(TypedDict):
    """One memory of one user."""

    id: str
    user_id: str
    agent_id: str | None
    conversation_id: str | None
    namespace: str
    key: str | None
    content: str
    tags: list[str]
    metadata: dict[str, Any]
    importance: float
    access_count: int
    last_accessed_at: datetime | None
    expires_at: datetime | None
    deleted_at: datetime | None
    created_at: datetime
    updated_at: datetime
    #: When the remembered thing was said or happened (``store``'s time unless given).
    occurred_at: datetime
    score: NotRequired[float]
    #: On ``recall(context=N)`` results only: the neighbours in its conversation, in order.
    context: NotRequired[list[Memory]]


class MemoryInput(TypedDict, total=False):
    """One item of ``store_many``: the keyword arguments of ``store``."""

    user_id: str
    content: str
    conversation_id: str | None
    tags: list[str] | None
    metadata: dict[str, Any] | None
    agent_id: str | None
    namespace: str
    key: str | None
    importance: float
    ttl: Any
    expires_at: datetime | None
    occurred_at: datetime | None


class MemoryPage(TypedDict):
    """One page of ``list_memories``; pass ``next_cursor`` back to get the next page."""

    items: list[Memory]
    next_cursor: str | None


class KnowledgeDocument(TypedDict):
    """A document of global knowledge, as stored (its chunks are recalled as ``Knowledge``)."""

    doc_id: str
    category: str
    title: str | None
    metadata: dict[str, Any]
    chunk_count: int
    created_at: datetime
    updated_at: datetime


class Knowledge(TypedDict):
    """One chunk of a knowledge document, as recalled."""

    id: str
    doc_id: str
    category: str
    title: str | None
    content: str
    chunk_index: int
    metadata: dict[str, Any]
    created_at: datetime
    score: float


class UserStats(TypedDict):
    """Counts of one user's memories."""

    memories: int
    deleted: int
    expired: int
    last_memory_at: datetime | None


class User(TypedDict):
    """A user record. ``profile`` is a free JSON object the agent owns."""

    user_id: str
    display_name: str | None
    profile: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None
    stats: NotRequired[UserStats]


HealthStatus = Literal["ok", "degraded", "down"]


class HealthReport(TypedDict):
    """What ``health_check`` returns; it never raises for a down backend."""

    driver: str
    status: HealthStatus
    checks: dict[str, Any]
    latency_ms: float


def user_record(user_id: str, row: tuple[Any, ...] | None, counts: dict[str, int],
                first_memory_at: datetime | None, last_memory_at: datetime | None) -> User | None:
    """A ``User`` from the users row ``(display_name, profile, created_at, updated_at)`` (or
    ``None``) and memory statistics; ``None`` when there is neither a row nor a memory."""
    if row is None and first_memory_at is None:
        return None
    stats: UserStats = {"memories": counts["visible"], "deleted": counts["deleted"],
                        "expired": counts["expired"], "last_memory_at": last_memory_at}
    return {
        "user_id": user_id,
        "display_name": row[0] if row else None,
        "profile": dict(row[1]) if row else {},
        "created_at": row[2] if row else first_memory_at,
        "updated_at": row[3] if row else None,
        "stats": stats,
    }
