"""Schema versions and the upgrade steps between them.

The version of a database lives in the ``meta`` table (``schema_version``). Opening a database:

- with no tables: create the current schema and record ``SCHEMA_VERSION``;
- at an older version: run every step from its version up, and record the new version, all in ONE
  transaction, so a failed upgrade leaves the database exactly as it was;
- at a newer version: raise :class:`SchemaVersionError` and write nothing (newer code may rely on columns
  or meanings this code would break);
- with tables but no ``meta``: refuse, it is not an s2agent database.

Steps are plain SQL that both SQLite and PostgreSQL run (``ALTER TABLE ... ADD COLUMN`` and friends), frozen
as written: a step describes the schema as it was then, never today's models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from sqlalchemy import Connection, inspect, text

from .errors import SchemaVersionError, StoreError
from .schema import SCHEMA_VERSION, Base

logger = logging.getLogger(__name__)

_PG_ADVISORY_KEY = 0x5332_4147  # "S2AG": serialises concurrent schema creation on PostgreSQL


@dataclass(frozen=True)
class Migration:
    """One upgrade step: from ``from_version`` to ``from_version + 1``."""

    from_version: int
    description: str
    upgrade: Callable[[Connection], None]


def _v1_to_v2(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE interactions ADD COLUMN error TEXT"))
    conn.execute(text("ALTER TABLE examples ADD COLUMN kind VARCHAR(16) DEFAULT 'system2' NOT NULL"))
    conn.execute(text("ALTER TABLE adapters ADD COLUMN files_deleted BOOLEAN DEFAULT FALSE NOT NULL"))


def _v2_to_v3(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE interactions ADD COLUMN teacher_prompt_tokens INTEGER DEFAULT 0 NOT NULL"))
    conn.execute(text("ALTER TABLE interactions ADD COLUMN teacher_completion_tokens INTEGER DEFAULT 0 NOT NULL"))


def _v3_to_v4(conn: Connection) -> None:
    blob = "BYTEA" if conn.dialect.name == "postgresql" else "BLOB"
    conn.execute(text(f"CREATE TABLE adapter_blobs (sha256 VARCHAR(64) NOT NULL PRIMARY KEY, "
                      f"size INTEGER NOT NULL, data {blob} NOT NULL)"))
    conn.execute(text("CREATE TABLE adapter_files (version INTEGER NOT NULL, name VARCHAR(255) NOT NULL, "
                      "sha256 VARCHAR(64) NOT NULL REFERENCES adapter_blobs (sha256), PRIMARY KEY (version, name))"))


def _v4_to_v5(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE interactions ADD COLUMN source VARCHAR(64)"))
    conn.execute(text("ALTER TABLE examples ADD COLUMN source VARCHAR(64)"))
    conn.execute(text("CREATE INDEX ix_examples_source ON examples (source)"))
    conn.execute(text("ALTER TABLE adapters ADD COLUMN needs_retrain BOOLEAN DEFAULT FALSE NOT NULL"))


def _v5_to_v6(conn: Connection) -> None:
    timestamp = "TIMESTAMP WITH TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
    conn.execute(text(f"CREATE TABLE scope_pins (scope VARCHAR(128) NOT NULL PRIMARY KEY, "
                      f"pinned_at {timestamp} NOT NULL, reason TEXT NOT NULL)"))


MIGRATIONS: list[Migration] = [
    Migration(1, "interactions.error, examples.kind, adapters.files_deleted", _v1_to_v2),
    Migration(2, "interactions.teacher_prompt_tokens, interactions.teacher_completion_tokens", _v2_to_v3),
    Migration(3, "adapter_blobs, adapter_files", _v3_to_v4),
    Migration(4, "interactions.source, examples.source, adapters.needs_retrain", _v4_to_v5),
    Migration(5, "scope_pins", _v5_to_v6),
]
"""Every upgrade step, in order. Add one (and raise ``schema.SCHEMA_VERSION``) for each schema change."""


def read_version(conn: Connection) -> Optional[int]:
    """The recorded schema version, or None when the database has no ``meta`` table."""
    if not inspect(conn).has_table("meta"):
        return None
    value = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
    if value is None:
        raise StoreError("the meta table has no schema_version; this is not a database s2agent can open")
    try:
        return int(value)
    except ValueError:
        raise StoreError(f"the recorded schema_version {value!r} is not a number") from None


def check_not_newer(found: int, where: str, supported: int = SCHEMA_VERSION) -> None:
    """Raise :class:`SchemaVersionError` when ``found`` is newer than this code understands."""
    if found > supported:
        raise SchemaVersionError(
            f"{where} has schema version {found}, but this s2agent supports up to version {supported}. "
            "It was written by a newer s2agent: upgrade s2agent to open it. Nothing was changed.",
            found=found,
            supported=supported,
        )


def ensure_schema(
    conn: Connection,
    where: str,
    target: int = SCHEMA_VERSION,
    steps: Sequence[Migration] = MIGRATIONS,
) -> int:
    """Bring the database behind ``conn`` to ``target``; returns the version it had (0 when it was empty).

    ``conn`` must be inside a transaction (the caller commits, or rolls everything back on error). On SQLite
    the caller opens it with ``BEGIN IMMEDIATE`` so two processes opening a new file cannot both create it.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_ADVISORY_KEY})
    found = read_version(conn)
    if found is None:
        tables = inspect(conn).get_table_names()
        if tables:
            raise StoreError(
                f"{where} already has tables ({', '.join(sorted(tables)[:5])}) but no s2agent meta table; "
                "it is not an s2agent database. Nothing was changed."
            )
        Base.metadata.create_all(conn)
        conn.execute(text("INSERT INTO meta (key, value) VALUES ('schema_version', :v)"), {"v": str(target)})
        logger.info("created s2agent schema version %d in %s", target, where)
        return 0
    check_not_newer(found, where, target)
    if found == target:
        return found
    by_version = {step.from_version: step for step in steps}
    for version in range(found, target):
        step = by_version.get(version)
        if step is None:
            raise StoreError(f"no upgrade step from schema version {version} to {version + 1} ({where})")
        logger.info("upgrading %s: schema %d -> %d (%s)", where, version, version + 1, step.description)
        step.upgrade(conn)
    conn.execute(text("UPDATE meta SET value = :v WHERE key = 'schema_version'"), {"v": str(target)})
    logger.info("upgraded %s from schema version %d to %d", where, found, target)
    return found
