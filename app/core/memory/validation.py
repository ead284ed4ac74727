"""The input rules of the memory layer, in one place, used by every driver.

Each ``check_*`` function takes the caller's value and the argument's name, and returns the value
in its normal form (tags de-duplicated, ``ttl`` turned into an absolute expiry, ...) or raises
``InvalidInputError`` with a message that names the argument and the rule. Drivers call these
before they touch the backend, so a rejected call writes nothing.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from app.core.memory.errors import InvalidInputError

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
ID_RULE = "1-128 characters of letters, digits and _ . : @ -"
MAX_TAG_CHARS = 64
MAX_TAGS = 32
#: Far more than the model reads (256 tokens, ~1,000 characters): longer texts are embedded
#: whole, as the mean of windows (``long_texts.py``), so memories and queries are not cut here.
MAX_CONTENT_CHARS = 10_000
MAX_KNOWLEDGE_CHARS = 2_000_000
MAX_QUERY_CHARS = 4_000
MAX_TITLE_CHARS = 512
MAX_METADATA_BYTES = 16_384
MAX_PROFILE_BYTES = 65_536
#: How deep dicts and lists may nest in metadata and profiles (``{"a": 1}`` is depth 1).
MAX_JSON_DEPTH = 32
MAX_TOP_K = 1_000
MAX_PAGE_SIZE = 1_000
MAX_BATCH = 10_000
MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
DEFAULT_NAMESPACE = "default"
#: The range of ``occurred_at`` (UTC; the end is exclusive): Python's years 1..9999, a day in
#: from each end, so that the time stays representable in every UTC offset (PostgreSQL hands
#: times back in the session's zone; clients show them in theirs).
OCCURRED_AT_MIN = datetime(1, 1, 2, tzinfo=UTC)
OCCURRED_AT_END = datetime(9999, 12, 31, tzinfo=UTC)
OCCURRED_AT_RULE = ("a timezone-aware datetime from 0001-01-02 to 9999-12-30 (UTC), "
                    "e.g. datetime(2023, 5, 7, tzinfo=timezone.utc), or in JSON an ISO 8601 "
                    "time with a UTC offset, e.g. \"2023-05-07T14:30:00Z\"")

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _fail(name: str, rule: str, value: Any = None, *, show_value: bool = True) -> InvalidInputError:
    shown = f" (got {_preview(value)})" if show_value else ""
    return InvalidInputError(f"{name} must be {rule}{shown}")


def _preview(value: Any) -> str:
    # reprlib stops a few levels down and after a few items: repr() of a value nested ~1,000
    # deep raises RecursionError, and of a huge one takes its time.
    text = _PREVIEW.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_PREVIEW = reprlib.Repr()
_PREVIEW.maxstring = _PREVIEW.maxother = 80


def check_id(value: Any, name: str) -> str:
    """An identifier: a user, agent, conversation, memory or document id, a namespace, a key."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise _fail(name, f"a string of {ID_RULE}", value)
    return value


def check_optional_id(value: Any, name: str) -> str | None:
    """``check_id``, but ``None`` passes through (meaning "any" in filters, "none" in records)."""
    return None if value is None else check_id(value, name)


def check_text(value: Any, name: str, *, max_chars: int, allow_empty: bool = False) -> str:
    """Free text: a ``str`` without NUL or other control characters (tab and newlines allowed)."""
    if not isinstance(value, str):
        raise _fail(name, "a string", value)
    if not allow_empty and not value.strip():
        raise _fail(name, "non-empty text", value)
    if len(value) > max_chars:
        raise _fail(name, f"at most {max_chars} characters", None, show_value=False)
    if _CONTROL_CHARS.search(value):
        raise _fail(name, "text without NUL or control characters", None, show_value=False)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _fail(name, "valid unicode text (no lone surrogates)", None,
                    show_value=False) from exc
    return value


def check_content(value: Any, name: str = "content") -> str:
    """The content of a memory."""
    return check_text(value, name, max_chars=MAX_CONTENT_CHARS)


def check_query(value: Any, name: str = "query") -> str | None:
    """A search query; ``None`` or blank text means "no query" (newest first)."""
    if value is None:
        return None
    text = check_text(value, name, max_chars=MAX_QUERY_CHARS, allow_empty=True)
    return text if text.strip() else None


def check_tags(value: Any, name: str = "tags") -> list[str]:
    """A list of tags: short strings without commas or control characters; duplicates dropped."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _fail(name, "a list of strings", value)
    tags: list[str] = []
    for tag in value:
        if (
            not isinstance(tag, str)
            or not tag.strip()
            or len(tag) > MAX_TAG_CHARS
            or "," in tag
            or _CONTROL_CHARS.search(tag)
            or tag != tag.strip()
        ):
            raise _fail(
                name,
                f"a list of tags of 1-{MAX_TAG_CHARS} characters without commas, control "
                "characters or surrounding spaces",
                tag,
            )
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise _fail(name, f"at most {MAX_TAGS} tags", len(tags))
    return tags


def check_json_object(value: Any, name: str, *, max_bytes: int) -> dict[str, Any]:
    """A JSON-serialisable dict (string keys, no NaN or infinities) of bounded size."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(name, "a dict", value)
    _check_json_shape(value, name, max_bytes)
    try:
        encoded = json.dumps(dict(value), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise _fail(name, f"JSON-serialisable with string keys and finite numbers ({exc})",
                    None, show_value=False) from exc
    if any(not isinstance(key, str) for key in value):
        raise _fail(name, "a dict with string keys", None, show_value=False)
    if "\\u0000" in encoded or "\x00" in encoded:
        raise _fail(name, "free of NUL characters", None, show_value=False)
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _fail(name, "valid unicode (no lone surrogates)", None, show_value=False) from exc
    if size > max_bytes:
        raise _fail(name, f"at most {max_bytes} bytes as JSON", None, show_value=False)
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def _check_json_shape(value: Mapping[Any, Any], name: str, max_bytes: int) -> None:
    """Refuse nesting deeper than ``MAX_JSON_DEPTH`` or more values than ``max_bytes``.

    Walked with a stack, not recursion, and before ``json.dumps`` (which recurses, and would
    raise ``RecursionError`` ~1,000 levels down); a cycle ends as too deep. Every JSON value
    takes at least one byte, so more values than ``max_bytes`` cannot fit either.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > max_bytes:
            raise _fail(name, f"at most {max_bytes} bytes as JSON", None, show_value=False)
        if isinstance(item, Mapping | list | tuple):
            if depth > MAX_JSON_DEPTH:
                raise _fail(name, f"nested at most {MAX_JSON_DEPTH} dicts or lists deep", None,
                            show_value=False)
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)


def check_metadata(value: Any, name: str = "metadata") -> dict[str, Any]:
    """The metadata of a memory or a knowledge document."""
    return check_json_object(value, name, max_bytes=MAX_METADATA_BYTES)


def check_importance(value: Any, name: str = "importance") -> float:
    """A finite number in 0..1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, "a number between 0 and 1", value)
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise _fail(name, "a finite number between 0 and 1", value)
    return number


def check_optional_importance(value: Any, name: str) -> float | None:
    """``check_importance``, but ``None`` passes through."""
    return None if value is None else check_importance(value, name)


def check_positive_int(value: Any, name: str, *, maximum: int) -> int:
    """A whole number in 1..maximum (``bool`` is refused although it is an ``int``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise _fail(name, f"a whole number from 1 to {maximum}", value)
    return value


def check_top_k(value: Any, name: str = "top_k") -> int:
    """How many results a recall may return."""
    return check_positive_int(value, name, maximum=MAX_TOP_K)


def check_bool(value: Any, name: str) -> bool:
    """A real ``bool``, so that a string such as ``"false"`` is not taken as true."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value)
    return value


def check_aware_datetime(value: Any, name: str) -> datetime:
    """A timezone-aware datetime, returned in UTC. Naive datetimes are refused as ambiguous."""
    if not isinstance(value, datetime):
        raise _fail(name, "a datetime", value)
    if value.tzinfo is None or value.utcoffset() is None:
        raise _fail(name, "timezone-aware (e.g. datetime.now(timezone.utc))", value)
    return value.astimezone(UTC)


def check_occurred_at(value: Any, name: str = "occurred_at") -> datetime:
    """When a memory's content was said or happened: an aware datetime within
    ``OCCURRED_AT_MIN`` .. ``OCCURRED_AT_END`` (exclusive), returned in UTC. The future is allowed
    (a planned event); a naive datetime is refused as ambiguous."""
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise _fail(name, OCCURRED_AT_RULE, value)
    try:
        moment = value.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 with an offset that leaves Python's range
        raise _fail(name, OCCURRED_AT_RULE, value) from None
    if not OCCURRED_AT_MIN <= moment < OCCURRED_AT_END:
        raise _fail(name, OCCURRED_AT_RULE, value)
    return moment


ISO_TIME_RULE = ("an ISO 8601 time with a UTC offset, e.g. 2023-05-07T14:30:00+00:00 or "
                 "2023-05-07T14:30:00Z")


def parse_iso_time(value: Any, name: str) -> datetime:
    """A time given as text (JSON, a command line, a tool call): ISO 8601 with a UTC offset, as
    an aware datetime. Text without an offset is refused as ambiguous; the range is left to the
    verb's own check (``check_occurred_at``)."""
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or moment.utcoffset() is None:
        raise _fail(name, ISO_TIME_RULE, value)
    return moment


def check_expiry(ttl: Any, expires_at: Any, now: datetime) -> datetime | None:
    """Turn ``ttl`` (seconds or timedelta, > 0) or ``expires_at`` into an absolute UTC expiry.

    At most one of the two may be given; ``None`` for both means "never expires".
    """
    if ttl is not None and expires_at is not None:
        raise InvalidInputError("ttl and expires_at are exclusive: give at most one of them")
    if expires_at is not None:
        return check_aware_datetime(expires_at, "expires_at")
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise _fail("ttl", "a number of seconds or a timedelta", ttl)
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TTL_SECONDS:
        raise _fail("ttl", f"greater than 0 and at most {MAX_TTL_SECONDS} seconds", ttl)
    return now + timedelta(seconds=seconds)


def check_by_id(memory_id: Any, user_id: Any) -> tuple[str, str | None]:
    """The ``(memory_id, user_id)`` of a by-id verb; ``user_id`` may be ``None`` (operator call)."""
    return check_id(memory_id, "memory_id"), check_optional_id(user_id, "user_id")


def check_display_name(value: Any) -> str | None:
    """A user's display name: optional text of at most 256 characters."""
    return None if value is None else check_text(value, "display_name", max_chars=256)


def check_retention(value: Any, default: timedelta) -> timedelta:
    """``purge``'s retention: a timedelta of zero or more; ``None`` means ``default``."""
    if value is None:
        return default
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise _fail("retention", "a timedelta of zero or more", value)
    return value


@dataclass(frozen=True)
class MemoryDraft:
    """The checked arguments of one ``store``: everything a driver needs to write the memory."""

    user_id: str
    content: str
    conversation_id: str | None
    tags: list[str]
    metadata: dict[str, Any]
    agent_id: str | None
    namespace: str
    key: str | None
    importance: float
    expires_at: datetime | None
    #: When the content was said or happened; ``None``: the time of the store (the driver
    #: writes the time it gives ``created_at``, or the upsert's time).
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class RecallFilters:
    """The checked scope of a recall or a listing. ``None`` means "any"."""

    user_id: str
    agent_id: str | None = None
    conversation_id: str | None = None
    namespace: str | None = None
    tags: list[str] = field(default_factory=list)
    exclude_tags: list[str] = field(default_factory=list)
    min_importance: float | None = None
    #: Recall only: ``occurred_at`` must lie in ``[start, end]`` (both ends included).
    start: datetime | None = None
    end: datetime | None = None

    @property
    def narrows(self) -> bool:
        """Whether anything beyond the user limits the set."""
        return bool(
            self.agent_id or self.conversation_id or self.namespace or self.tags
            or self.exclude_tags or self.min_importance is not None
            or self.start is not None or self.end is not None
        )


@dataclass(frozen=True)
class MemoryChanges:
    """The checked arguments of an ``update``; ``None`` fields are left as they are."""

    content: str | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    importance: float | None = None
    expires_at: datetime | None = None
    clear_expiry: bool = False
    occurred_at: datetime | None = None

    @property
    def is_empty(self) -> bool:
        return (
            self.content is None and self.tags is None and self.metadata is None
            and self.importance is None and self.expires_at is None and not self.clear_expiry
            and self.occurred_at is None
        )


@dataclass(frozen=True)
class KnowledgeDraft:
    """The checked arguments of ``store_global_knowledge`` (``doc_id`` generated if absent)."""

    content: str
    category: str
    title: str | None
    doc_id: str
    metadata: dict[str, Any]


def prepare_knowledge(content: Any, category: Any, title: Any = None, doc_id: Any = None,
                      metadata: Any = None) -> KnowledgeDraft:
    """Check every argument of ``store_global_knowledge``; a missing ``doc_id`` becomes
    ``doc_`` + 16 hex characters."""
    return KnowledgeDraft(
        content=check_text(content, "content", max_chars=MAX_KNOWLEDGE_CHARS),
        category=check_id(category, "category"),
        title=None if title is None else check_text(title, "title", max_chars=MAX_TITLE_CHARS),
        doc_id=check_optional_id(doc_id, "doc_id") or f"doc_{secrets.token_hex(8)}",
        metadata=check_metadata(metadata),
    )


def prepare_store(
    user_id: Any, content: Any, conversation_id: Any = None, tags: Any = None,
    metadata: Any = None, *, agent_id: Any = None, namespace: Any = DEFAULT_NAMESPACE,
    key: Any = None, importance: Any = 0.5, ttl: Any = None, expires_at: Any = None,
    occurred_at: Any = None, now: datetime,
) -> MemoryDraft:
    """Check every argument of ``store`` and return them in normal form."""
    return MemoryDraft(
        user_id=check_id(user_id, "user_id"),
        content=check_content(content),
        conversation_id=check_optional_id(conversation_id, "conversation_id"),
        tags=check_tags(tags),
        metadata=check_metadata(metadata),
        agent_id=check_optional_id(agent_id, "agent_id"),
        namespace=check_id(namespace, "namespace"),
        key=check_optional_id(key, "key"),
        importance=check_importance(importance),
        expires_at=check_expiry(ttl, expires_at, now),
        occurred_at=None if occurred_at is None else check_occurred_at(occurred_at),
    )


_STORE_FIELDS = frozenset(
    {"user_id", "content", "conversation_id", "tags", "metadata", "agent_id", "namespace", "key",
     "importance", "ttl", "expires_at", "occurred_at"}
)


def prepare_store_many(items: Any, *, now: datetime) -> list[MemoryDraft]:
    """Check every item of ``store_many`` (each a dict of ``store``'s arguments), all or nothing.

    A bad item raises ``InvalidInputError`` naming its index, so the batch writes nothing.
    """
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise _fail("items", "a list of dicts of store() arguments", items)
    drafts: list[MemoryDraft] = []
    for index, item in enumerate(items):
        if len(drafts) >= MAX_BATCH:
            raise _fail("items", f"at most {MAX_BATCH} memories per call", None, show_value=False)
        if not isinstance(item, Mapping):
            raise _fail(f"items[{index}]", "a dict of store() arguments", item)
        unknown = set(item) - _STORE_FIELDS
        if unknown:
            fields = sorted(map(str, unknown))
            raise InvalidInputError(f"items[{index}] has unknown fields: {fields}")
        if "user_id" not in item or "content" not in item:
            raise InvalidInputError(f"items[{index}] must have user_id and content")
        try:
            drafts.append(prepare_store(**item, now=now))
        except InvalidInputError as exc:
            raise InvalidInputError(f"items[{index}]: {exc}") from None
    return drafts


def prepare_filters(
    user_id: Any, *, agent_id: Any = None, conversation_id: Any = None, namespace: Any = None,
    tags: Any = None, exclude_tags: Any = None, min_importance: Any = None,
    start: datetime | None = None, end: datetime | None = None,
) -> RecallFilters:
    """Check the scope arguments shared by ``recall`` and ``list_memories`` (``start`` and
    ``end``: recall's, checked by ``prepare_recall_time``)."""
    return RecallFilters(
        user_id=check_id(user_id, "user_id"),
        agent_id=check_optional_id(agent_id, "agent_id"),
        conversation_id=check_optional_id(conversation_id, "conversation_id"),
        namespace=check_optional_id(namespace, "namespace"),
        tags=check_tags(tags),
        exclude_tags=check_tags(exclude_tags, "exclude_tags"),
        min_importance=check_optional_importance(min_importance, "min_importance"),
        start=start,
        end=end,
    )


def prepare_changes(
    *, content: Any = None, tags: Any = None, metadata: Any = None, importance: Any = None,
    ttl: Any = None, expires_at: Any = None, clear_expiry: Any = False, occurred_at: Any = None,
    now: datetime,
) -> MemoryChanges:
    """Check the arguments of ``update``."""
    clear = check_bool(clear_expiry, "clear_expiry")
    expiry = check_expiry(ttl, expires_at, now)
    if clear and expiry is not None:
        raise InvalidInputError("clear_expiry=True cannot be combined with ttl or expires_at")
    return MemoryChanges(
        content=None if content is None else check_content(content),
        tags=None if tags is None else check_tags(tags),
        metadata=None if metadata is None else check_metadata(metadata),
        importance=check_optional_importance(importance, "importance"),
        expires_at=expiry,
        clear_expiry=clear,
        occurred_at=None if occurred_at is None else check_occurred_at(occurred_at),
    )


#: How many neighbours on each side of a hit ``recall(context=N)`` may bring.
MAX_CONTEXT = 20


@dataclass(frozen=True)
class RecallTime:
    """The checked time arguments of ``recall``."""

    start: datetime | None
    end: datetime | None
    reference_time: datetime
    context: int


def prepare_recall_time(*, start: Any = None, end: Any = None, reference_time: Any = None,
                        context: Any = 0, now: datetime) -> RecallTime:
    """Check ``recall``'s ``start``, ``end`` (aware, start not after end), ``reference_time``
    (aware; ``now`` when ``None``) and ``context`` (0..``MAX_CONTEXT`` neighbours a side)."""
    first = None if start is None else check_aware_datetime(start, "start")
    last = None if end is None else check_aware_datetime(end, "end")
    if first is not None and last is not None and first > last:
        raise InvalidInputError(f"start must not be after end (got start {first.isoformat()}, "
                                f"end {last.isoformat()})")
    reference = now if reference_time is None else check_aware_datetime(
        reference_time, "reference_time")
    if isinstance(context, bool) or not isinstance(context, int) or not (
            0 <= context <= MAX_CONTEXT):
        raise _fail("context", f"a whole number from 0 to {MAX_CONTEXT}", context)
    return RecallTime(first, last, reference, context)
