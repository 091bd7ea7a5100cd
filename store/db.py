"""Opening a database: URL handling, the checks before touching a file, the engine and its sessions.

SQLite is the default (a plain path is a SQLite file); any SQLAlchemy URL works, PostgreSQL included.
Before a SQLite file is opened for writing it is checked read-only (is it a SQLite file at all? is its schema
newer than ours?), because merely connecting with ``journal_mode=WAL`` rewrites the file header: a file we
refuse must stay byte-identical.

Each SQLite connection gets ``journal_mode=WAL`` (readers never block the writer), ``busy_timeout=30000``
(writers wait for each other instead of failing), ``foreign_keys=ON`` and ``synchronous=NORMAL``. Write
transactions start with ``BEGIN IMMEDIATE``: they take the write lock up front, so two processes that read
then write never deadlock into "database is locked"; read transactions stay deferred and never wait.

What the database engine reports is classified (:func:`store.errors.classify`): a busy, full, read-only or
damaged database raises the matching :class:`~store.errors.StoreUnavailable`, never a raw driver error. Once
a damaged page has been seen, the store refuses every later write (reads go on, to help salvage data).
``Store(..., verify=True)`` (what the agent's server and consolidation use) runs ``PRAGMA quick_check``
through the read-only connection before anything is written; :meth:`StoreBase.verify` runs it again later.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .errors import StoreCorrupt, StoreError, StoreReadOnly, classify
from .integrity import damaged, sqlite_problems
from .migrations import check_not_newer, ensure_schema

logger = logging.getLogger(__name__)

_POSTGRES_SCHEMES = ("postgresql", "postgres")
_POSTGRES_DRIVER = "postgresql+psycopg"  # psycopg 3, the ``postgres`` extra


def resolve_url(target: Union[str, os.PathLike[str]]) -> str:
    """A SQLAlchemy URL for ``target``: URLs pass through, anything else is a SQLite file path.

    A plain ``postgresql://`` (or ``postgres://``) URL gets the psycopg 3 driver, the one the ``postgres``
    extra installs (SQLAlchemy 2.0 would pick psycopg2 for it). An explicit ``postgresql+driver://`` is kept.
    """
    text = os.fspath(target)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme.lower() in _POSTGRES_SCHEMES:
            return f"{_POSTGRES_DRIVER}://{rest}"
        return text
    return "sqlite:///" + str(Path(text).expanduser().resolve())


def _sqlite_file(url: str) -> Optional[Path]:
    """The file behind a SQLite URL, or None for in-memory and non-SQLite databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def _preflight_sqlite(path: Path, verify: bool = False) -> None:
    """Refuse, without writing a byte, a path that cannot hold or is not a usable s2agent SQLite database.

    With ``verify``, an existing file's pages are checked too (``PRAGMA quick_check``, see :mod:`store.integrity`).
    """
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a SQLite database file")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise StoreReadOnly(f"{path}: the database file is not readable and writable by this user (permissions, "
                                "an immutable flag or a read-only mount); the database is not damaged: do not delete it")
        if path.stat().st_size == 0:
            return  # SQLite treats an empty file as an empty database
        # The header is read by SQLite itself, never by a plain open(): closing any descriptor of a file
        # drops every POSIX lock this process holds on it, and another Store of this process may hold them
        # (SQLite keeps its own descriptors open for exactly that reason).
        _check_read_only(path, verify)
        return
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the folder {parent} for the database {path}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreReadOnly(f"cannot create the database {path}: the folder {parent} is not writable")


def _sqlite_error(exc: sqlite3.Error, path: Path) -> StoreError:
    """A driver error met while reading ``path``, as what it is (damaged, read-only, busy...), never a guess."""
    return classify(exc, str(path), str(path)) or StoreError(f"cannot read {path}: {exc}")


def _check_read_only(path: Path, verify: bool) -> None:
    """Read the schema version (and with ``verify`` check the pages) through a read-only connection, so that
    a newer or damaged database is refused untouched."""
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise _sqlite_error(exc, path) from None
    try:
        conn.execute("PRAGMA schema_version").fetchone()  # reads the header: "file is not a database" here
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
        if row is not None and str(row[0]).isdigit():
            check_not_newer(int(row[0]), str(path))
        if verify:
            started = time.perf_counter()
            problems = sqlite_problems(conn)
            if problems:
                raise damaged(str(path), problems)
            logger.info("%s: PRAGMA quick_check ok in %.2f s", path, time.perf_counter() - started)
    except sqlite3.Error as exc:
        raise _sqlite_error(exc, path) from None
    finally:
        conn.close()


def configure_sqlite(engine: Engine) -> None:
    """Pragmas on every connection, and SQLAlchemy (not the driver) in charge of BEGIN."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver must not emit BEGIN itself; see _on_begin
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def check_lengths(session: Session, _context: Any, _instances: Any) -> None:
    """Refuse, before it is written, a string longer than its ``VARCHAR(n)`` column, on every backend.

    PostgreSQL refuses such a row and SQLite keeps it whole; this makes both refuse it, with a clear error.
    """
    for row in (*session.new, *session.dirty):
        table = getattr(row, "__table__", None)
        if table is None:
            continue
        state = inspect(row)
        for column in table.columns:
            length = getattr(column.type, "length", None)
            if length is None or (not state.pending and not state.attrs[column.key].history.added):
                continue  # an unchanged value of a stored row: not this write's doing (old SQLite rows may be longer)
            value = row.__dict__.get(column.key)
            if isinstance(value, str) and len(value) > length:
                shown = value if len(value) <= 40 else value[:37] + "..."
                raise StoreError(
                    f"{table.name}.{column.key} holds at most {length} characters, not {len(value)} ({shown!r})"
                )


class StoreBase:
    """The connection to one database: the engine, read and write sessions, and the schema check on open.

    The store's feature modules (``interactions``, ``buffer``, ``adapters``, ``runs``) are mixins on this
    class; :class:`store.Store` puts them together.
    """

    def __init__(self, target: Union[str, os.PathLike[str]], *, echo: bool = False, verify: bool = False) -> None:
        """Open ``target``; ``verify=True`` first checks an existing SQLite file's pages (``PRAGMA quick_check``)
        and refuses a damaged one untouched: for processes that will write for a long time."""
        self.url: str = resolve_url(target)
        path = _sqlite_file(self.url)
        self.path: Optional[Path] = path
        where = str(path) if path is not None else make_url(self.url).render_as_string(hide_password=True)
        self._where = where
        self._damaged: str | None = None
        """Why writes are refused: set once a check or a query found the file damaged."""
        if path is not None:
            _preflight_sqlite(path, verify)
        self._verified_at: float | None = time.monotonic() if verify and path is not None else None
        try:
            # A server that restarted leaves dead connections in the pool: test each one as it is taken out
            # (one round trip), so the first query after a restart reconnects instead of failing.
            self._engine = create_engine(self.url, echo=echo, pool_pre_ping=path is None)
        except (SQLAlchemyError, ImportError) as exc:
            hint = ""
            if isinstance(exc, ImportError) and make_url(self.url).get_backend_name() == "postgresql":
                hint = " (PostgreSQL needs a driver: pip install 's2agent[postgres]')"
            raise StoreError(f"cannot use the database URL {where}: {exc}{hint}") from None
        if self._engine.dialect.name == "sqlite":
            configure_sqlite(self._engine)
        write_engine = self._engine.execution_options(sqlite_begin="IMMEDIATE")
        self._read_sessions = sessionmaker(bind=self._engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(bind=write_engine, expire_on_commit=False)
        for sessions in (self._read_sessions, self._write_sessions):
            event.listen(sessions, "before_flush", check_lengths)
        try:
            with write_engine.begin() as conn:
                ensure_schema(conn, where)
        except StoreError:
            self._engine.dispose()
            raise
        except SQLAlchemyError as exc:
            self._engine.dispose()
            known = classify(exc, where, str(path) if path is not None else None)
            if known is not None:
                raise known from None
            raise StoreError(f"cannot open the database {where}: {getattr(exc, 'orig', None) or exc}") from None
        logger.debug("opened store %s", where)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for tools and benchmarks; the store's methods are the supported interface."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection. The store can not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> "StoreBase":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({make_url(self.url).render_as_string(hide_password=True)!r})"

    @property
    def damaged(self) -> str | None:
        """Why this store refuses every write (a check or a query found the file damaged), or None."""
        return self._damaged

    def verify(self, max_age_s: float | None = None) -> None:
        """Check a SQLite file's pages (``PRAGMA quick_check``) now; raise :class:`~store.errors.StoreCorrupt`
        and refuse every later write when it is damaged.

        ``max_age_s``: skip the check when one passed less than that many seconds ago (a consolidation
        checks at its start, but not right after its process opened the store with ``verify=True``).
        PostgreSQL checks its own pages; opening the store already proved it reachable and its schema known.
        """
        if self.path is None:
            return
        now = time.monotonic()
        if max_age_s is not None and self._verified_at is not None and now - self._verified_at < max_age_s:
            return
        started = time.perf_counter()
        try:
            with self._engine.connect() as conn:
                problems = sqlite_problems(conn.connection.driver_connection)
        except DBAPIError as exc:
            raise self._translated(exc) or exc from None
        except sqlite3.Error as exc:
            raise self._translated(exc) or StoreError(f"cannot check {self.path}: {exc}") from None
        if problems:
            error = damaged(str(self.path), problems)
            self._damaged = str(error)
            raise error
        self._verified_at = now
        logger.info("%s: PRAGMA quick_check ok in %.2f s", self.path, time.perf_counter() - started)

    def _translated(self, exc: BaseException) -> StoreError | None:
        """What the engine reported, as the :class:`~store.errors.StoreUnavailable` it is (None: not one).

        A damaged file also stops every later write of this store."""
        known = classify(exc, self._where, str(self.path) if self.path is not None else None)
        if isinstance(known, StoreCorrupt) and self._damaged is None:
            self._damaged = str(known)
            logger.error("%s; refusing further writes", known)
        return known

    @contextmanager
    def _errors_translated(self) -> Iterator[None]:
        """The driver's errors this store knows (busy, full, read-only, damaged) as its own ``StoreError``s."""
        try:
            yield
        except DBAPIError as exc:
            known = self._translated(exc)
            if known is None:
                raise
            raise known from exc

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A session for reads; rows it returns stay readable after it closes."""
        with self._errors_translated(), self._read_sessions() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A session in one write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on exit.

        Refused at once on a store found damaged: a write into a damaged file can spread the damage."""
        if self._damaged is not None:
            raise StoreCorrupt(self._damaged)
        with self._errors_translated(), self._write_sessions.begin() as session:
            yield session


def chunks(items: list[Any], size: int = 500) -> Iterator[list[Any]]:
    """``items`` in slices of ``size``: keeps ``IN (...)`` lists under SQLite's bound-parameter limit."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
