"""``BaseMemoryDriver``: the contract every memory driver implements, written as its docstrings.

Shared semantics (each verb's docstring adds its own):

- **Tenancy.** ``user_id`` is the hard boundary. No verb reads, changes or reveals another user's
  memory. A by-id verb given ``user_id`` acts only on that user's row and answers for someone
  else's id exactly as for an id that does not exist. Without ``user_id`` a by-id verb is an
  operator's call on the id alone. ``agent_id``, ``conversation_id`` and ``namespace`` narrow
  within a user; ``None`` in a filter means "any".
- **Visibility.** Soft-deleted memories (``delete``) and expired ones (``ttl``/``expires_at`` in
  the past) are invisible to every read unless a verb says otherwise (``get(include_deleted=True)``,
  ``list_memories(include_deleted=True)`` show soft-deleted ones, never expired ones).
- **Records** are plain dicts (see ``records.py``); datetimes are timezone-aware UTC. Every
  memory has ``created_at`` (when it was stored), ``updated_at`` and ``occurred_at``: when the
  remembered thing was said or happened, the time of the store unless the caller gives it
  (``store``, ``store_many``, ``update``, import); it may lie in the future (a planned event).
- **Bad input** raises ``InvalidInputError`` naming the argument and the rule, before anything is
  written (``validation.py``). Backend failures raise ``BackendUnavailableError``; a database
  without the schema raises ``SchemaNotMigratedError``; a driver that cannot do something raises
  ``NotSupportedError`` and never ignores an argument silently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from app.core.memory.errors import NotSupportedError
from app.core.memory.records import (
    HealthReport,
    Knowledge,
    KnowledgeDocument,
    Memory,
    MemoryInput,
    MemoryPage,
    User,
)
from app.core.memory.validation import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from app.core.memory.embeddings import Embedder
    from app.core.memory.portable import PortableRecord
    from app.core.memory.reembed import ReembedReport

#: ``progress(done, total)``: how far a long operation has got.
Progress = Callable[[int, int], None]


class BaseMemoryDriver(ABC):
    """The memory-layer contract. Subclasses set ``name`` (the ``MEMORY_DRIVER`` key)."""

    name: ClassVar[str] = "base"

    # -- the six verbs of the original design ---------------------------------------------------

    @abstractmethod
    def recall(
        self,
        user_id: str,
        conversation_id: str | None = None,
        query: str | None = None,
        top_k: int = 10,
        use_vector: bool = True,
        exclude_tags: list[str] | None = None,
        *,
        agent_id: str | None = None,
        namespace: str | None = None,
        tags: list[str] | None = None,
        min_importance: float | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        reference_time: datetime | None = None,
        context: int = 0,
    ) -> list[Memory]:
        """At most ``top_k`` visible memories of ``user_id``, best first.

        Scope: ``conversation_id``, ``agent_id``, ``namespace`` must match when given; the memory
        must carry every tag in ``tags`` and none in ``exclude_tags``; ``importance`` must be at
        least ``min_importance``; ``occurred_at`` must lie between ``start`` and ``end`` (aware
        datetimes, both ends included) when they are given.

        Ranking: with no ``query`` (``None`` or blank), what occurred last first (then the
        newest stored), each with ``score`` 1.0.
        With ``use_vector=False``, keyword search only (no embedding is computed) and only
        keyword matches are returned. Otherwise hybrid: vector and keyword candidates fused as
        ``ranking.py`` documents. ``score`` is in 0..1, higher is better. Every statistic the
        ranking uses (keyword idf, the common-word cut) comes from the recall's own scope, so
        other users' memories never change it; the same query on the same data gives the same
        list, equal scores ordered by recency then id, and the same scores on every driver
        that ranks on its side.

        Time: a query that names a time ("in May 2023", "last Friday", "two weeks ago"; read by
        ``time_phrases.py`` relative to ``reference_time``, default now) lifts the memories that
        occurred in that period (a boost, not a filter; ``start``/``end`` are the filter).

        Context: with ``context=N`` (0..20), each returned memory carries ``context``: the N
        visible memories before and the N after it in its conversation (same user and
        conversation, ordered by ``occurred_at`` then storage order; ``[]`` without a
        conversation), whatever the other filters say. Context memories are not counted as
        accessed.

        Every returned memory has its ``access_count`` incremented and ``last_accessed_at`` set
        to now; the returned records show the new values.
        """

    @abstractmethod
    def recall_global_knowledge(
        self, query: str, top_k: int = 5, category: str | None = None
    ) -> list[Knowledge]:
        """At most ``top_k`` knowledge chunks (shared by all users) for ``query``, best first.

        Ranked like ``recall`` (hybrid). ``category`` narrows to one category. An empty store
        returns ``[]``.
        """

    @abstractmethod
    def store(
        self,
        user_id: str,
        content: str,
        conversation_id: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        agent_id: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        key: str | None = None,
        importance: float = 0.5,
        ttl: float | timedelta | None = None,
        expires_at: datetime | None = None,
        occurred_at: datetime | None = None,
    ) -> Memory:
        """Store one memory and return it as stored (with its new ``id``).

        With ``key``: an upsert. If (user_id, agent_id, namespace, key) already names a memory
        (visible, soft-deleted or expired), that memory is replaced in place: same ``id`` and
        ``created_at``, new content, tags, metadata, importance, expiry and ``occurred_at``,
        undeleted.
        ``ttl`` (seconds or timedelta) and ``expires_at`` (aware datetime) are exclusive.
        ``occurred_at`` (aware datetime, ``validation.OCCURRED_AT_RULE``) is when the content was
        said or happened; it defaults to the time of this store, so ``created_at`` for a new
        memory, and for an upsert the time of the upsert (the new content is a new fact), not
        the replaced memory's.
        """

    @abstractmethod
    def store_global_knowledge(
        self,
        content: str,
        category: str,
        title: str | None = None,
        doc_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KnowledgeDocument:
        """Store a document of shared knowledge, split into chunks that fit the embedding window.

        ``doc_id`` defaults to a new ``doc_`` + 16 hex id. Storing an existing ``doc_id`` again
        replaces the document and all its chunks atomically (idempotent re-ingest): a concurrent
        reader sees the old chunks or the new ones, never a mix or none.
        """

    @abstractmethod
    def delete(self, memory_id: str, user_id: str | None = None) -> bool:
        """Soft-delete a memory: it disappears from every read at once; ``restore`` undoes it.

        Returns ``True`` if a visible memory was hidden, ``False`` if there is none (unknown id,
        someone else's id when ``user_id`` is given, already deleted, expired). Without ``user_id``
        this is an operator's call on the id alone.
        """

    @abstractmethod
    def health_check(self) -> HealthReport:
        """The backend's health; never raises for a down backend.

        ``{"driver", "status": "ok" | "degraded" | "down", "checks": {...}, "latency_ms"}``.
        ``degraded`` covers pending migrations and an embedding model or dimension that differs
        from the one recorded in the database.
        """

    # -- added verbs -------------------------------------------------------------------------

    @abstractmethod
    def get(
        self, memory_id: str, user_id: str | None = None, *, include_deleted: bool = False
    ) -> Memory | None:
        """The memory with ``memory_id``, or ``None`` if there is none visible to the caller.

        Does not count as an access. ``include_deleted=True`` also returns a soft-deleted memory.
        """

    @abstractmethod
    def update(
        self,
        memory_id: str,
        user_id: str | None = None,
        *,
        content: str | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        importance: float | None = None,
        ttl: float | timedelta | None = None,
        expires_at: datetime | None = None,
        clear_expiry: bool = False,
        occurred_at: datetime | None = None,
    ) -> Memory | None:
        """Change a visible memory in place and return it; ``None`` if there is none.

        Only the given fields change; ``tags`` and ``metadata`` are replaced whole; new content is
        embedded again. ``clear_expiry=True`` removes the expiry. ``occurred_at`` sets when the
        content was said or happened (new content alone leaves it as it was). ``updated_at``
        moves to now.
        """

    @abstractmethod
    def store_many(self, items: Iterable[MemoryInput]) -> list[Memory]:
        """Store many memories (each a dict of ``store``'s arguments) in one transaction.

        Every item is checked before anything is written, embeddings are computed in batches, and
        a failure leaves none of the batch behind. Returns the stored memories in input order;
        items with a ``key`` upsert as in ``store`` (the last of equal keys wins). An item
        without ``occurred_at`` gets the time of the call.
        """

    @abstractmethod
    def list_memories(
        self,
        user_id: str,
        *,
        agent_id: str | None = None,
        conversation_id: str | None = None,
        namespace: str | None = None,
        tags: list[str] | None = None,
        include_deleted: bool = False,
        limit: int = 100,
        cursor: str | None = None,
    ) -> MemoryPage:
        """One page of a user's memories, most recently stored first (keyset pagination).

        ``next_cursor`` is ``None`` on the last page. Pages stay consistent while memories are
        added: a memory stored after the first page was read never shows up on a later page.
        Not an access.

        Cursors are opaque (``app.core.memory.cursors``): they reveal nothing about other users
        or the store's size, and are valid only for the listing that issued them; a cursor
        passed with another ``user_id``, other filters or ``include_deleted``, or altered, is
        ``InvalidInputError`` naming ``cursor``. If the memory a cursor continues after was
        purged or erased in between, a driver may refuse the cursor the same way (list again
        from the start) but never continues anywhere else.
        """

    @abstractmethod
    def restore(self, memory_id: str, user_id: str | None = None) -> bool:
        """Undo a soft delete. ``True`` if a soft-deleted memory came back, else ``False``."""

    @abstractmethod
    def forget_user(self, user_id: str) -> int:
        """Erase everything of ``user_id`` (memories in every state, the user record) for good.

        Returns the number of memories erased; idempotent.
        """

    @abstractmethod
    def purge(self, *, retention: timedelta | None = None) -> int:
        """Hard-delete expired memories and those soft-deleted longer than ``retention`` ago.

        ``retention`` defaults to ``MEMORY_SOFT_DELETE_RETENTION_DAYS``. Returns how many went.
        """

    @abstractmethod
    def delete_knowledge(self, doc_id: str) -> bool:
        """Delete a knowledge document and its chunks; ``False`` if there was none."""

    @abstractmethod
    def stats(self, user_id: str | None = None) -> dict[str, Any]:
        """Counts: memories (visible, deleted, expired), users, knowledge documents and chunks,
        and the embedding identity; for one user when ``user_id`` is given."""

    @abstractmethod
    def create_user(
        self,
        user_id: str | None = None,
        *,
        display_name: str | None = None,
        profile: dict[str, Any] | None = None,
    ) -> User:
        """Create a user record; ``user_id`` defaults to ``user_`` + 8 hex characters.

        A ``user_id`` that already has a record raises ``InvalidInputError``.
        """

    @abstractmethod
    def get_user(self, user_id: str) -> User | None:
        """The user's record with ``stats``; ``None`` when there is neither a record nor a memory.

        A user known only from memories has ``display_name`` ``None`` and an empty profile.
        """

    @abstractmethod
    def get_profile(self, user_id: str) -> dict[str, Any]:
        """The user's profile object (``{}`` when none was set)."""

    @abstractmethod
    def set_profile(
        self, user_id: str, profile: dict[str, Any], *, merge: bool = False
    ) -> dict[str, Any]:
        """Replace (or with ``merge=True`` shallow-merge into) the user's profile; creates the
        user record if needed. Returns the profile as stored."""

    @abstractmethod
    def close(self) -> None:
        """Release connections, pools and clients. Idempotent; the driver is unusable after."""

    # -- optional: moving records (``transfer.py``, ``reembed.py``) -------------------------------
    # A driver that cannot do these keeps the defaults, which raise NotSupportedError.

    def export_records(self, *, user_id: str | None = None,
                       with_embeddings: bool = False) -> Iterator[PortableRecord]:
        """Every record, as ``portable.py`` describes them, from one consistent snapshot.

        User records first, then memories in every state (visible, soft-deleted, expired) in the
        order they were stored, then knowledge documents with their chunks. With ``user_id``:
        that user's record and memories only (knowledge is shared, so it is left out). Vectors
        are included with ``with_embeddings``. Not an access. Do not call the same driver from
        the consuming thread before the iterator is exhausted or closed.
        """
        raise NotSupportedError(f"the {self.name} driver cannot list its records for export")

    def import_records(self, records: Sequence[PortableRecord], *,
                       vectors_from: dict[str, Any] | None = None) -> list[tuple[int, str]]:
        """Write records as they are (ids, timestamps, access counts kept), in one transaction;
        returns ``(index, reason)`` for each record refused, the rest are written. The records
        must be checked ones: from ``portable.parse_record`` or another driver's
        ``export_records`` (``transfer.py`` gives them so).

        Idempotent: a memory is created or replaced by ``id``, a knowledge document replaced by
        ``doc_id`` (with exactly the given chunks), a user record replaced by ``user_id``. A memory
        whose ``id`` belongs to another user here, or whose key (user, agent, namespace, key) is
        held by another memory, is refused. Vectors in the records are used when
        ``vectors_from`` (the model identity they were made with) equals this driver's model;
        otherwise the content is embedded here.
        """
        raise NotSupportedError(f"the {self.name} driver cannot import records with their ids")

    def reembed(self, embedder: Embedder | None = None, *, batch_size: int = 64,
                progress: Progress | None = None) -> ReembedReport:
        """Recompute every stored vector (memories in every state, knowledge chunks) with
        ``embedder`` (default: the configured model) and record it as the model in use.

        New vectors are staged beside the old ones in committed batches and swapped in by one
        transaction at the end, so recall keeps working on the old vectors meanwhile, and a run
        that is interrupted resumes where it stopped when started again with the same model.
        """
        raise NotSupportedError(f"the {self.name} driver does not keep vectors it could "
                                "re-compute; the service embeds on its side")

    def __enter__(self) -> BaseMemoryDriver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
