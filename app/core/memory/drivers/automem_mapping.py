"""How the ``automem`` driver's records map onto AutoMem memories, and back.

Pure functions, no I/O: the tags a memory carries, the body of a batch item, the contract's record
decoded from what the server returns, and the client-side check every result passes. Where each
piece of state lives, and why (``automem_driver`` explains the whole design):

- **Filter tags are exact by construction.** The server matches tags case-insensitively, and
  ``exclude_tags`` by prefix. Every tag the driver filters on is ``ml:<kind>:<hash>``: 24
  lowercase hex digits of a SHA-256 of the exact value, so ``Carol`` and ``carol`` get different
  tags, and no such tag is the prefix of another. Caller tags are stored only in that form (and in
  the metadata), so they can never collide with the driver's own tags. Readable ``user:<id>`` and
  ``conversation:<id>`` tags are added for people browsing AutoMem; the driver never filters on
  them.
- **Importance buckets.** A memory of importance ``i`` carries ``ml:imp:1`` up to
  ``ml:imp:<floor(10 i)>``, so ``min_importance`` is pushed to the server (to a tenth; the rest
  is checked here).
- **Time.** The server's ``timestamp`` is the memory's ``occurred_at`` (recall's ``start``/
  ``end`` and time sorting work on it); when it was stored (``created_at``) is in the layer's
  metadata, written by the store and never changed. A memory written before issue 17 has its
  store time in ``timestamp``, which is then both.
- **State enrichment cannot undo** lives in fields the server's enrichment never writes back:
  expiry in ``t_invalid``, soft deletion in ``t_valid`` (see ``deleted_marker``), content and
  importance in their own fields. Everything in ``tags`` and ``metadata`` is written by the batch
  store that creates the memory (the enrichment snapshot is taken after it) or, later, only once
  the enrichment window has passed.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from typing import Any

from app.core.memory.records import Knowledge, Memory
from app.core.memory.validation import DEFAULT_NAMESPACE, MemoryDraft, RecallFilters

MEMORY_TAG, KNOWLEDGE_TAG, USER_TAG = ("memory-layer:memory", "memory-layer:knowledge",
                                       "memory-layer:user")
LAYER = "memory_layer"
#: Soft deletion is ``t_valid`` = deletion time + this shift (a date after year 9000): the
#: server's ``state_mode=current`` hides a memory whose ``t_valid`` lies in the future, and
#: enrichment never writes ``t_valid`` back.
DELETED_FLOOR = datetime(9000, 1, 1, tzinfo=UTC)
DELETED_SHIFT = DELETED_FLOOR - datetime(1970, 1, 1, tzinfo=UTC)


def exact_tag(kind: str, *values: str | None) -> str:
    """The filter tag of ``values`` (joined): case-proof and prefix-proof on the server."""
    joined = "\x00".join("" if value is None else value for value in values)
    return f"ml:{kind}:{hashlib.sha256(joined.encode()).hexdigest()[:24]}"


def user_tag(user_id: str) -> str:
    return exact_tag("user", user_id)


def caller_tag(tag: str) -> str:
    return exact_tag("tag", tag)


def key_tag(user_id: str, agent_id: str | None, namespace: str, key: str) -> str:
    return exact_tag("key", user_id, agent_id or "", namespace, key)


def importance_tags(importance: float) -> list[str]:
    return [f"ml:imp:{bucket}" for bucket in range(1, math.floor(importance * 10 + 1e-9) + 1)]


def importance_floor_tag(minimum: float | None) -> str | None:
    """The bucket tag every memory of importance >= ``minimum`` carries (``None``: no bucket)."""
    if minimum is None:
        return None
    bucket = math.floor(minimum * 10 + 1e-9)
    return f"ml:imp:{bucket}" if bucket >= 1 else None


def memory_tags(user_id: str, agent_id: str | None, conversation_id: str | None,
                namespace: str, key: str | None, tags: list[str],
                importance: float) -> list[str]:
    """Every server tag of one memory (the driver's and the caller's, apart)."""
    server = [MEMORY_TAG, f"user:{user_id}", user_tag(user_id),
              exact_tag("ns", namespace)]
    if agent_id is not None:
        server.append(exact_tag("agent", agent_id))
    if conversation_id is not None:
        server += [f"conversation:{conversation_id}", exact_tag("conv", conversation_id)]
    if key is not None:
        server.append(key_tag(user_id, agent_id, namespace, key))
    server += [caller_tag(tag) for tag in tags]
    return server + importance_tags(importance)


def filter_tags(filters: RecallFilters) -> list[str]:
    """The tags a recall or listing requires (``tag_mode=all``, ``tag_match=exact``)."""
    tags = [MEMORY_TAG, user_tag(filters.user_id)]
    if filters.agent_id is not None:
        tags.append(exact_tag("agent", filters.agent_id))
    if filters.conversation_id is not None:
        tags.append(exact_tag("conv", filters.conversation_id))
    if filters.namespace is not None:
        tags.append(exact_tag("ns", filters.namespace))
    tags += [caller_tag(tag) for tag in filters.tags]
    floor = importance_floor_tag(filters.min_importance)
    return tags + ([floor] if floor else [])


def server_item(draft: MemoryDraft, now: datetime, *, operation: str | None = None,
                created_at: datetime | None = None) -> dict[str, Any]:
    """The batch item that creates ``draft`` (``operation`` tags what one call created).

    ``now`` is the time of this store: ``created_at`` unless that is given (an upsert keeps the
    replaced memory's), and ``occurred_at`` unless the draft has one."""
    created = created_at or now
    occurred = draft.occurred_at or now
    layer = {"kind": "memory", "user_id": draft.user_id, "agent_id": draft.agent_id,
             "conversation_id": draft.conversation_id, "namespace": draft.namespace,
             "key": draft.key, "tags": draft.tags, "access_count": 0, "last_accessed_at": None,
             "created_at": created.isoformat(), "updated_at": now.isoformat()}
    tags = memory_tags(draft.user_id, draft.agent_id, draft.conversation_id, draft.namespace,
                       draft.key, draft.tags, draft.importance)
    if operation:
        tags.append(operation_tag(operation))
    return {"content": draft.content, "tags": tags, "importance": draft.importance,
            "timestamp": occurred.isoformat(),
            "metadata": {LAYER: layer, "data": draft.metadata}}


def operation_tag(operation: str) -> str:
    """The tag of everything one ``store_many`` (or knowledge ingest) created: what to undo."""
    return f"ml:op:{operation}"


def layer_of(server: dict[str, Any] | None) -> dict[str, Any]:
    if not server:
        return {}
    metadata = server.get("metadata")
    if not isinstance(metadata, dict):
        return {}
    layer = metadata.get(LAYER)
    return layer if isinstance(layer, dict) else {}


def deleted_marker(deleted_at: datetime) -> str:
    return (deleted_at + DELETED_SHIFT).isoformat()


def deleted_at_of(server: dict[str, Any]) -> datetime | None:
    valid = parse_time(server.get("t_valid"))
    return valid - DELETED_SHIFT if valid is not None and valid >= DELETED_FLOOR else None


def expires_at_of(server: dict[str, Any]) -> datetime | None:
    """The expiry is ``t_invalid`` alone: a copy in the metadata could be written back stale."""
    return parse_time(server.get("t_invalid"))


def memory_from_server(server: dict[str, Any], memory_id: Any) -> Memory | None:
    """The contract's record of a server memory; ``None`` if it is not one of this driver's."""
    layer = layer_of(server)
    if layer.get("kind") != "memory" or not memory_id:
        return None
    timestamp = parse_time(server.get("timestamp"))
    created = parse_time(layer.get("created_at")) or timestamp
    updated = parse_time(layer.get("updated_at")) or created
    accessed = parse_time(layer.get("last_accessed_at"))
    return {
        "id": str(memory_id),
        "user_id": layer.get("user_id", ""),
        "agent_id": layer.get("agent_id"),
        "conversation_id": layer.get("conversation_id"),
        "namespace": layer.get("namespace", DEFAULT_NAMESPACE),
        "key": layer.get("key"),
        "content": server.get("content", ""),
        "tags": list(layer.get("tags") or []),
        "metadata": dict((server.get("metadata") or {}).get("data") or {}),
        "importance": _float(server.get("importance"), 0.5),
        "access_count": int(layer.get("access_count") or 0),
        "last_accessed_at": accessed,
        "expires_at": expires_at_of(server),
        "deleted_at": deleted_at_of(server),
        "created_at": created or datetime.now(UTC),
        "updated_at": updated or datetime.now(UTC),
        "occurred_at": timestamp or created or datetime.now(UTC),
    }


def knowledge_from_server(server: dict[str, Any], layer: dict[str, Any],
                          score: float) -> Knowledge:
    return {
        "id": f"{layer.get('doc_id')}#{layer.get('chunk_index')}",
        "doc_id": layer.get("doc_id", ""),
        "category": layer.get("category", ""),
        "title": layer.get("title"),
        "content": server.get("content", ""),
        "chunk_index": int(layer.get("chunk_index") or 0),
        "metadata": dict(layer.get("document_metadata") or {}),
        "created_at": parse_time(layer.get("updated_at")) or datetime.now(UTC),
        "score": score,
    }


def visible(memory: Memory, filters: RecallFilters, now: datetime, *,
            include_deleted: bool = False) -> bool:
    """The client-side check every result passes, whatever the server returned."""
    if memory["user_id"] != filters.user_id:
        return False
    if memory["expires_at"] is not None and memory["expires_at"] <= now:
        return False
    if memory["deleted_at"] is not None and not include_deleted:
        return False
    for field in ("agent_id", "conversation_id", "namespace"):
        wanted = getattr(filters, field)
        if wanted is not None and memory[field] != wanted:
            return False
    if filters.min_importance is not None and memory["importance"] < filters.min_importance:
        return False
    own = set(memory["tags"])
    return set(filters.tags) <= own and not own & set(filters.exclude_tags)


def counts(servers: list[dict[str, Any]], now: datetime) -> dict[str, int]:
    """Visible, soft-deleted and expired memories among ``servers``."""
    found = {"visible": 0, "deleted": 0, "expired": 0}
    for server in servers:
        expires = expires_at_of(server)
        if expires is not None and expires <= now:
            found["expired"] += 1
        elif deleted_at_of(server) is not None:
            found["deleted"] += 1
        else:
            found["visible"] += 1
    return found


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at whitespace where possible."""
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = rest.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return [*pieces, rest] if rest else pieces or [text[:limit]]


def parse_time(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def micros(memory: Memory) -> int:
    return int(memory["created_at"].timestamp() * 1_000_000)


def clip(value: Any) -> float:
    try:
        return round(min(1.0, max(0.0, float(value))), 6)
    except (TypeError, ValueError):
        return 0.0


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


#: Tags the driver wrote before issue 14, beside the ones it still writes.
_LEGACY_PREFIXES = ("namespace:", "agent:", "key:", "category:", "document:")
_LEGACY_DELETED_TAG = "memory-layer:deleted"


def legacy_upgrade(server: dict[str, Any]) -> dict[str, Any]:
    """The PATCH that re-maps a record written before issue 14; ``{}`` if it needs none."""
    layer = dict(layer_of(server))
    kind = layer.get("kind")
    tags = [t for t in server.get("tags") or [] if isinstance(t, str)]
    if kind == "memory" and isinstance(layer.get("user_id"), str):
        if user_tag(layer["user_id"]) in tags:
            return {}
        caller = [t for t in layer.get("tags") or [] if isinstance(t, str)]
        extras = [t for t in tags if not t.startswith(("ml:", "memory-layer:", "user:",
                                                       "conversation:", *_LEGACY_PREFIXES))
                  and t not in caller]
        importance = _float(server.get("importance"), 0.5)
        new_tags = extras + memory_tags(
            layer["user_id"], layer.get("agent_id"), layer.get("conversation_id"),
            layer.get("namespace") or DEFAULT_NAMESPACE, layer.get("key"), caller, importance)
        deleted = parse_time(layer.pop("deleted_at", None))
        expires = parse_time(layer.pop("expires_at", None))
        metadata = {**(server.get("metadata") or {}), LAYER: layer}
        fields: dict[str, Any] = {"tags": new_tags, "metadata": metadata,
                                  "t_valid": deleted_marker(deleted) if deleted else None}
        if expires is not None and not server.get("t_invalid"):
            fields["t_invalid"] = expires.isoformat()
        return fields
    if kind == "knowledge" and isinstance(layer.get("doc_id"), str):
        if exact_tag("doc", layer["doc_id"]) in tags:
            return {}
        kept = [t for t in tags if not t.startswith(_LEGACY_PREFIXES)]
        return {"tags": kept + [exact_tag("category", str(layer.get("category"))),
                                exact_tag("doc", layer["doc_id"])]}
    if kind == "user" and isinstance(layer.get("user_id"), str):
        if user_tag(layer["user_id"]) in tags:
            return {}
        return {"tags": [*tags, user_tag(layer["user_id"])]}
    return {}
