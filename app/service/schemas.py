"""The JSON shapes of the HTTP API: request bodies (a verb's arguments) and the records it returns.

Request models check JSON types only and refuse unknown fields; the input *rules* (id syntax,
sizes, ranges) live once, in ``validation.py``, and reach the caller as ``InvalidInputError``
(422) from the verb itself. Response models mirror ``records.py``, so ``/openapi.json`` describes
exactly what the library returns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

USER_ID_DOC = ("The user whose memories this is. A user key implies its own user (leave it out); "
               "an admin key must name one.")
OCCURRED_AT_DOC = ("When the remembered thing was said or happened: ISO 8601 with a UTC offset "
                   "(e.g. 2023-05-07T14:30:00+00:00), 0001-01-02..9999-12-30 in UTC; the future "
                   "is allowed. Default: the time of the store.")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ---------------------------------------------------------------------------------


class StoreBody(_Body):
    """The arguments of ``store``."""

    user_id: str | None = Field(None, description=USER_ID_DOC)
    content: str = Field(description="The memory's text (non-empty, at most 10,000 characters).")
    conversation_id: str | None = None
    tags: list[str] | None = Field(None, description="Short strings without commas.")
    metadata: dict[str, Any] | None = Field(None, description="Any JSON object (at most 16 KiB).")
    agent_id: str | None = None
    namespace: str = "default"
    key: str | None = Field(None, description="Upsert key: replaces the memory with the same "
                                              "(user_id, agent_id, namespace, key).")
    importance: float = Field(0.5, description="0..1")
    ttl: float | None = Field(None, description="Seconds until the memory expires.")
    expires_at: datetime | None = Field(None, description="When it expires (with a timezone); "
                                                          "exclusive with ttl.")
    occurred_at: datetime | None = Field(None, description=OCCURRED_AT_DOC)


class BatchBody(_Body):
    """The items of ``store_many``: all are stored, or none."""

    items: list[StoreBody]


class SearchBody(_Body):
    """The arguments of ``recall``."""

    user_id: str | None = Field(None, description=USER_ID_DOC)
    query: str | None = Field(None, description="What to look for; none: newest first.")
    top_k: int = Field(10, description="At most this many results (1..1000).")
    conversation_id: str | None = None
    use_vector: bool = Field(True, description="False: keyword search only.")
    exclude_tags: list[str] | None = Field(None, description="Must carry none of these.")
    agent_id: str | None = None
    namespace: str | None = None
    tags: list[str] | None = Field(None, description="Must carry all of these.")
    min_importance: float | None = None
    start: datetime | None = Field(None, description="Only memories that occurred at or after "
                                                     "this time (with a timezone).")
    end: datetime | None = Field(None, description="Only memories that occurred at or before "
                                                   "this time (with a timezone).")
    reference_time: datetime | None = Field(
        None, description="What 'now' is when the query says 'last Friday' or 'two weeks "
                          "ago' (with a timezone); default: now.")
    context: int = Field(0, description="Bring each result's N neighbours before and after it "
                                        "in its conversation (0..20).")


class UpdateBody(_Body):
    """The fields of ``update``: only those given change."""

    content: str | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    importance: float | None = None
    ttl: float | None = None
    expires_at: datetime | None = None
    clear_expiry: bool = False
    occurred_at: datetime | None = Field(None, description="When the remembered thing was said "
                                         "or happened (ISO 8601 with a UTC offset).")


class KnowledgeBody(_Body):
    """The arguments of ``store_global_knowledge``."""

    content: str
    category: str
    title: str | None = None
    doc_id: str | None = Field(None, description="Re-using a doc_id replaces that document.")
    metadata: dict[str, Any] | None = None


class KnowledgeSearchBody(_Body):
    """The arguments of ``recall_global_knowledge``."""

    query: str
    top_k: int = 5
    category: str | None = None


class UserBody(_Body):
    """The arguments of ``create_user``."""

    user_id: str | None = Field(None, description="Default: a generated user_xxxxxxxx (an admin "
                                                  "key), or the key's own user (a user key).")
    display_name: str | None = None
    profile: dict[str, Any] | None = None


class ProfileBody(_Body):
    """The arguments of ``set_profile``."""

    profile: dict[str, Any]
    merge: bool = Field(False, description="True: shallow-merge into the stored profile.")


class KeyBody(_Body):
    """A new API key: for one user, or an admin key."""

    user_id: str | None = Field(None, description="The user the key acts for.")
    admin: bool = Field(False, description="An admin key (then no user_id).")
    name: str | None = None


# -- responses --------------------------------------------------------------------------------


class MemoryOut(BaseModel):
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
    occurred_at: datetime = Field(description="When the remembered thing was said or happened "
                                              "(the time of the store unless one was given).")
    score: float | None = Field(None, description="On search results only: 0..1, higher is "
                                                  "better.")


class MemoryList(BaseModel):
    items: list[MemoryOut]


class MemoryPageOut(BaseModel):
    items: list[MemoryOut]
    next_cursor: str | None = Field(description="Pass it back as cursor; null on the last page.")


class SearchHit(MemoryOut):
    """A search result: a memory with its score and, with ``context=N``, its neighbours."""

    context: list[MemoryOut] | None = Field(
        None, description="With context=N: the N memories before and after this one in its "
                          "conversation, in order.")


class SearchResults(BaseModel):
    results: list[SearchHit]


class KnowledgeDocumentOut(BaseModel):
    doc_id: str
    category: str
    title: str | None
    metadata: dict[str, Any]
    chunk_count: int
    created_at: datetime
    updated_at: datetime


class KnowledgeOut(BaseModel):
    id: str
    doc_id: str
    category: str
    title: str | None
    content: str
    chunk_index: int
    metadata: dict[str, Any]
    created_at: datetime
    score: float


class KnowledgeResults(BaseModel):
    results: list[KnowledgeOut]


class UserStatsOut(BaseModel):
    memories: int
    deleted: int
    expired: int
    last_memory_at: datetime | None


class UserOut(BaseModel):
    user_id: str
    display_name: str | None
    profile: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None
    stats: UserStatsOut | None = None


class ProfileOut(BaseModel):
    user_id: str
    profile: dict[str, Any]


class Done(BaseModel):
    """What a delete or restore answers when it acted (otherwise 404)."""

    id: str
    done: bool = True


class Erased(BaseModel):
    user_id: str
    erased_memories: int


class KeyOut(BaseModel):
    id: str
    name: str | None
    user_id: str | None
    admin: bool
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: datetime
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str = Field(description="The key itself: shown this once, stored nowhere.")


class KeyList(BaseModel):
    keys: list[KeyOut]


class ErrorDetail(BaseModel):
    type: str = Field(description="unauthorized, forbidden, not_found, invalid_input, "
                                  "payload_too_large, backend_unavailable, schema_not_migrated, "
                                  "...")
    message: str


class ErrorBody(BaseModel):
    """Every error answer has this one shape."""

    error: ErrorDetail
