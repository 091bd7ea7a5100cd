"""``agent store check``: is this database whole and usable, asked without writing a byte to it.

Opening a :class:`store.Store` creates or upgrades the schema, which writes; a check must not, since the
file it is asked about may be damaged. So this module opens SQLite files read-only and runs the full
``PRAGMA integrity_check``, and for PostgreSQL (which checks its own pages) reports what an operator can
act on: whether the server answers and which schema version the database holds.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from .db import _sqlite_file, resolve_url
from .errors import StoreCorrupt, StoreError, classify, recovery_steps
from .integrity import PROBLEMS_SHOWN, sqlite_problems
from .schema import SCHEMA_VERSION


@dataclass
class CheckReport:
    """What :func:`check_database` found; ``ok`` is False when ``problems`` lists anything."""

    backend: str
    """``sqlite`` or ``postgresql`` (or another SQLAlchemy dialect)."""
    where: str
    """The file, or the URL without its password."""
    schema_version: int | None
    """The schema version the database records (None: none yet, an empty or foreign database)."""
    supported: int = SCHEMA_VERSION
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    size_bytes: int | None = None
    advice: str = ""
    """What to do about the problems (for a damaged SQLite file: the recovery steps)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def check_database(target: str | os.PathLike[str], *, full: bool = True) -> CheckReport:
    """Check the database at ``target`` (a path or URL) without writing to it.

    SQLite: ``PRAGMA integrity_check`` (``quick_check`` when not ``full``) on a read-only connection, and
    the schema version. Other backends: a connection, and the schema version. A schema newer than this
    s2agent is a problem (it would refuse to open it). Raises :class:`~store.errors.StoreError` when there
    is nothing to check (no such file) or the database cannot be reached at all.
    """
    url = resolve_url(target)
    path = _sqlite_file(url)
    started = time.perf_counter()
    if path is not None:
        report = _check_sqlite(str(path), full)
    else:
        report = _check_server(url)
    if report.schema_version is not None and report.schema_version > SCHEMA_VERSION:
        report.problems.append(f"schema version {report.schema_version} is newer than this s2agent's "
                               f"({SCHEMA_VERSION}): upgrade s2agent to use this database")
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _check_sqlite(path: str, full: bool) -> CheckReport:
    if os.path.isdir(path):
        raise StoreError(f"{path} is a directory, not a SQLite database file")
    if not os.path.exists(path):
        raise StoreError(f"no database at {path}")
    report = CheckReport("sqlite", path, None, size_bytes=os.path.getsize(path))
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise classify(exc, path, path) or StoreError(f"cannot open {path} read-only: {exc}") from None
    try:
        report.problems = sqlite_problems(conn, full=full, limit=PROBLEMS_SHOWN)
        if not report.problems:
            report.schema_version = _sqlite_version(conn)
    except sqlite3.Error as exc:
        known = classify(exc, path, path)
        if not isinstance(known, StoreCorrupt):
            raise known or StoreError(f"cannot check {path}: {exc}") from None
        report.problems = [str(exc)]  # "file is not a database": nothing else to check
    finally:
        conn.close()
    if report.problems:
        report.advice = recovery_steps(path)
    return report


def _sqlite_version(conn: sqlite3.Connection) -> int | None:
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row is not None and str(row[0]).isdigit() else None


def _check_server(url: str) -> CheckReport:
    where = make_url(url).render_as_string(hide_password=True)
    try:
        engine = create_engine(url, poolclass=NullPool)
    except (SQLAlchemyError, ImportError) as exc:
        raise StoreError(f"cannot use the database URL {where}: {exc}") from None
    report = CheckReport(engine.dialect.name, where, None)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            has_meta = engine.dialect.has_table(conn, "meta")
            if has_meta:
                value = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
                report.schema_version = int(value) if value is not None and str(value).isdigit() else None
    except SQLAlchemyError as exc:
        raise classify(exc, where) or StoreError(
            f"cannot reach the database {where}: {getattr(exc, 'orig', None) or exc}"
        ) from None
    finally:
        engine.dispose()
    return report
