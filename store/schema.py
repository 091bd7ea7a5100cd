"""The database schema of s2agent, as typed SQLAlchemy models.

Read this file as the schema: each class is one table, each ``Mapped[...]`` attribute one column, with its
meaning next to it. ``SCHEMA_VERSION`` is the version these models describe; ``store.migrations`` upgrades
older databases to it step by step. Changing a table here means adding a step there and raising the version.

Every column has a Python-side default (and a server default where a migration adds it to existing rows),
so rows read back after their session closed never need a round trip to load a value.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Optional

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, false
from sqlalchemy import String as _String
from sqlalchemy import Text as _Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

SCHEMA_VERSION = 6
"""The schema version these models describe. History (the upgrade steps live in ``store.migrations``):

1. interactions, examples, adapters, consolidation_runs, locks, meta.
2. ``interactions.error`` (why System 2 fell back), ``examples.kind`` (where a training example came from),
   ``adapters.files_deleted`` (pruned adapters keep their row but lose their files).
3. ``interactions.teacher_prompt_tokens`` and ``teacher_completion_tokens`` (System 2 on a remote teacher).
4. ``adapter_blobs`` and ``adapter_files``: promoted adapters' files in the database, so that replicas on
   other machines can serve them without a shared folder.
5. ``interactions.source`` and ``examples.source`` (who sent it: an API key's name, never its secret),
   ``adapters.needs_retrain`` (it learned from examples that were purged since).
6. ``scope_pins``: scopes an operator froze (no consolidation; their serving adapter stays).
"""


MAX_TAG_LENGTH = 128
"""The longest task tag (and adapter scope) the store keeps."""

MAX_SOURCE_LENGTH = 64
"""The longest source name (who sent an interaction or taught an example) the store keeps."""


def utcnow() -> datetime:
    """The current time, timezone-aware UTC: the only kind of time the store writes."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware in UTC, on every database.

    SQLite has no time zones, so times are stored there as naive UTC; PostgreSQL stores ``timestamptz``.
    A naive datetime passed in is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Dialect) -> Optional[datetime]:
        if value is None:
            return None
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect: Dialect) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def without_nul(value: Optional[str]) -> Optional[str]:
    """``value`` with each NUL character replaced by U+FFFD: PostgreSQL text cannot hold NUL, so no backend keeps it."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


class Text(TypeDecorator[str]):
    """Unbounded text (``TEXT``) that is stored the same on every backend: NUL becomes U+FFFD.

    A model's output or a client's input can contain NUL; SQLite would keep it, PostgreSQL refuses the
    whole row. Replacing it keeps the row (and the answer that produced it) on both.
    """

    impl = _Text
    cache_ok = True

    def process_bind_param(self, value: Optional[str], dialect: Dialect) -> Optional[str]:
        return without_nul(value)


class String(TypeDecorator[str]):
    """``VARCHAR(n)``, NUL-free like :class:`Text`; the store refuses longer values on every backend
    (SQLite would keep them, PostgreSQL refuses them): see ``store.db.check_lengths``."""

    impl = _String
    cache_ok = True

    def process_bind_param(self, value: Optional[str], dialect: Dialect) -> Optional[str]:
        return without_nul(value)


# --- the values of the status-like columns -----------------------------------------------------------------
# They are StrEnums, so ``row.status == ExampleStatus.PENDING`` and ``row.status == "pending"`` both work;
# the database holds the plain strings.


class Route(StrEnum):
    """Which system produced the answer the user got."""

    SYSTEM1 = "system1"
    SYSTEM2 = "system2"


class ExampleStatus(StrEnum):
    """Where a training example is in its life: waiting, trained on, refused, or kept aside for evaluation."""

    PENDING = "pending"
    USED = "used"
    REJECTED = "rejected"
    HOLDOUT = "holdout"


class ExampleKind(StrEnum):
    """Where a training example came from."""

    SYSTEM2 = "system2"  # an accepted System 2 answer: the distillation signal
    IMPORT = "import"  # loaded from a JSONL file
    RETENTION = "retention"  # a confident System 1 answer replayed so old skills are not forgotten


class AdapterStatus(StrEnum):
    """The gate's verdict on an adapter; ``retired`` adapters were pruned or superseded long ago."""

    CANDIDATE = "candidate"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    RETIRED = "retired"


class RunStatus(StrEnum):
    """How a consolidation run ended (``running`` until it does; ``crashed`` when its process died)."""

    RUNNING = "running"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    CRASHED = "crashed"
    SKIPPED = "skipped"


class Base(DeclarativeBase):
    """Declarative base: JSON columns for dicts, UTC timestamps for datetimes."""

    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}

    def __repr__(self) -> str:
        """``Example(id=3, input='What is 2+2?', status='pending', ...)``: every column, long text cut short."""
        parts = []
        for column in self.__table__.columns:
            value = self.__dict__.get(column.key, "<unloaded>")
            if isinstance(value, str) and len(value) > 40:
                value = value[:37] + "..."
            parts.append(f"{column.key}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class Interaction(Base):
    """One answered query: what was asked, which system answered, what it cost and why it was routed there."""

    __tablename__ = "interactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    input: Mapped[str] = mapped_column(Text)
    tag: Mapped[Optional[str]] = mapped_column(String(MAX_TAG_LENGTH), index=True)  # task tag, e.g. "gsm8k"
    route: Mapped[str] = mapped_column(String(16), index=True)  # Route
    system1_answer: Mapped[Optional[str]] = mapped_column(Text)
    confidence: Mapped[Optional[float]] = mapped_column(Float)  # the router's score of the System 1 pass
    final_answer: Mapped[str] = mapped_column(Text, default="")  # what the user got
    method: Mapped[Optional[str]] = mapped_column(String(32))  # System 2 method (cot, rar, s2a, bsm)
    adapter_version: Mapped[Optional[int]] = mapped_column(Integer)  # adapter System 1 ran with; None = base
    tokens_system1: Mapped[int] = mapped_column(Integer, default=0)
    tokens_system2: Mapped[int] = mapped_column(Integer, default=0)
    system2_calls: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    route_reason: Mapped[Optional[dict[str, Any]]] = mapped_column()  # {"estimator", "score", "threshold"}
    votes: Mapped[Optional[dict[str, Any]]] = mapped_column()  # System 2 answer -> count
    accepted: Mapped[Optional[bool]] = mapped_column(Boolean)  # System 2 answer passed the consistency check
    error: Mapped[Optional[str]] = mapped_column(Text, default=None)  # v2: e.g. System 2 failed, fell back
    teacher_prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)  # v3: System 2 on a remote teacher
    teacher_completion_tokens: Mapped[int] = mapped_column(Integer, default=0)  # v3: (also in tokens_system2)
    source: Mapped[Optional[str]] = mapped_column(String(MAX_SOURCE_LENGTH), default=None)  # v5: who asked; None: before v5


class Example(Base):
    """One training pair in the distillation buffer: System 1 learns to map ``input`` to ``target``.

    ``dedup_key`` is a hash of the normalised input (lowercase, whitespace collapsed) and the tag, so one
    question is learnt once per task however often it is asked.
    """

    __tablename__ = "examples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    input: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)  # the final answer only, no reasoning
    method: Mapped[Optional[str]] = mapped_column(String(32))
    votes: Mapped[Optional[dict[str, Any]]] = mapped_column()
    agreement: Mapped[Optional[float]] = mapped_column(Float)  # share of System 2 samples that agreed
    status: Mapped[str] = mapped_column(String(16), default=ExampleStatus.PENDING.value, index=True)
    kind: Mapped[str] = mapped_column(  # v2
        String(16), default=ExampleKind.SYSTEM2.value, server_default=ExampleKind.SYSTEM2.value
    )
    tag: Mapped[Optional[str]] = mapped_column(String(MAX_TAG_LENGTH), index=True)
    dedup_key: Mapped[str] = mapped_column(String(64), unique=True)
    interaction_id: Mapped[Optional[int]] = mapped_column(ForeignKey("interactions.id", ondelete="SET NULL"))
    adapter_version: Mapped[Optional[int]] = mapped_column(Integer)  # the adapter that trained on it
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    source: Mapped[Optional[str]] = mapped_column(  # v5: who taught it (a key's name); None: before v5
        String(MAX_SOURCE_LENGTH), default=None, index=True
    )


class Adapter(Base):
    """One trained LoRA adapter version and its verdict; at most one per scope has ``serving`` set."""

    __tablename__ = "adapters"
    __table_args__ = (Index("ix_adapters_scope_serving", "scope", "serving"),)

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # 1, 2, 3...
    path: Mapped[str] = mapped_column(Text)  # the adapter folder
    parent: Mapped[Optional[int]] = mapped_column(Integer)  # the version it was trained on top of
    scope: Mapped[Optional[str]] = mapped_column(String(MAX_TAG_LENGTH))  # task tag; None = the general adapter
    status: Mapped[str] = mapped_column(String(16), default=AdapterStatus.CANDIDATE.value)
    serving: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)  # eval-gate numbers
    n_train: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[Optional[int]] = mapped_column(Integer)  # the consolidation run that trained it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[Optional[datetime]] = mapped_column()
    files_deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # v2
    needs_retrain: Mapped[bool] = mapped_column(  # v5: it learned from examples purged since (store purge)
        Boolean, default=False, server_default=false()
    )


class AdapterBlob(Base):
    """The content of one adapter file, addressed by its sha256 (files two versions share are kept once)."""

    __tablename__ = "adapter_blobs"  # v4

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex digest of ``data``
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class AdapterFile(Base):
    """One file of an adapter version's folder (``adapter_model.safetensors``, ``adapter_config.json``...)."""

    __tablename__ = "adapter_files"  # v4

    version: Mapped[int] = mapped_column(Integer, primary_key=True)  # the adapter version
    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # file name inside the folder
    sha256: Mapped[str] = mapped_column(ForeignKey("adapter_blobs.sha256"))


class ScopePin(Base):
    """A scope an operator pinned: consolidation leaves it alone, so its serving adapter stays (``agent scopes pin``)."""

    __tablename__ = "scope_pins"  # v6

    scope: Mapped[str] = mapped_column(String(MAX_TAG_LENGTH), primary_key=True)
    pinned_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")


class ConsolidationRun(Base):
    """One consolidation attempt: who ran it, on what data, and how it ended."""

    __tablename__ = "consolidation_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[Optional[datetime]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.RUNNING.value, index=True)
    pid: Mapped[Optional[int]] = mapped_column(Integer)  # to tell a crashed run from a running one
    host: Mapped[Optional[str]] = mapped_column(String(255))
    scope: Mapped[Optional[str]] = mapped_column(String(MAX_TAG_LENGTH))
    n_train: Mapped[int] = mapped_column(Integer, default=0)
    n_holdout: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[Optional[dict[str, Any]]] = mapped_column()
    adapter_version: Mapped[Optional[int]] = mapped_column(Integer)  # the candidate it trained, if any
    reason: Mapped[Optional[str]] = mapped_column(Text)  # why it was promoted, rejected, skipped or failed
    config: Mapped[Optional[dict[str, Any]]] = mapped_column()


class Lock(Base):
    """A named cross-process lock (e.g. "consolidate"), held while its holder keeps the heartbeat fresh."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class Meta(Base):
    """Key/value facts about the database itself; ``schema_version`` is the one that matters."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
