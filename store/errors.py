"""The exceptions the store raises.

Every problem the store can name (a file that is not a database, a schema from a newer s2agent, a malformed
import file, an adapter that cannot be served) is a :class:`StoreError` with one message that says what is
wrong and with which path, version or line, so the CLI and the server can show it as it is.

What the database engine itself reports (SQLite's result codes, PostgreSQL's SQLSTATE) is classified by
:func:`classify` into :class:`StoreUnavailable` subclasses: a full disk, a read-only file or folder, a
lock held too long and a damaged file each need a different fix, and an operator told "corrupt" when
the disk is merely full may delete a healthy database.
"""

from __future__ import annotations

import sqlite3


class StoreError(Exception):
    """Something about the stored data or a request to the store is wrong; nothing was changed."""


class SchemaVersionError(StoreError):
    """The database was written by a newer s2agent (its schema version is higher than this code knows).

    Opening it could lose or corrupt data the newer code relies on, so the store refuses and leaves it as it is.
    """

    def __init__(self, message: str, found: int, supported: int) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class ImportValidationError(StoreError):
    """An import file has malformed lines; ``errors`` holds ``(line_number, reason)`` for each, nothing was imported."""

    def __init__(self, source: str, errors: list[tuple[int, str]]) -> None:
        self.source = source
        self.errors = errors
        shown = errors[:50]
        lines = [f"  line {number}: {reason}" for number, reason in shown]
        if len(errors) > len(shown):
            lines.append(f"  ... and {len(errors) - len(shown)} more bad lines")
        super().__init__(
            f"{source}: {len(errors)} malformed line(s), nothing was imported:\n" + "\n".join(lines)
        )


class StoreUnavailable(StoreError):
    """The database cannot do what was asked, for a reason in its environment, not in the request.

    SQLite and PostgreSQL roll the statement back, so nothing was changed; the subclass says what to fix.
    """


class StoreBusy(StoreUnavailable):
    """Another connection held the lock this write needed for longer than the busy timeout; retry later."""


class StoreFull(StoreUnavailable):
    """The disk (or the database's size limit) is full; the database itself is intact."""


class StoreReadOnly(StoreUnavailable):
    """The database file, or the folder it is in, cannot be written (or opened) by this process.

    SQLite needs to create ``-wal`` and ``-shm`` files beside the database, so a read-only folder stops it
    as surely as a read-only file. Not damage: the data is intact.
    """


class StoreCorrupt(StoreUnavailable):
    """The file is not a SQLite database, or its pages are damaged; s2agent refuses to write into it.

    The message carries the recovery steps (see :func:`recovery_steps`).
    """


_SQLITE_CODES: dict[int, type[StoreUnavailable]] = {
    sqlite3.SQLITE_BUSY: StoreBusy,
    sqlite3.SQLITE_LOCKED: StoreBusy,
    sqlite3.SQLITE_FULL: StoreFull,
    sqlite3.SQLITE_READONLY: StoreReadOnly,
    sqlite3.SQLITE_CANTOPEN: StoreReadOnly,
    sqlite3.SQLITE_PERM: StoreReadOnly,
    sqlite3.SQLITE_AUTH: StoreReadOnly,
    sqlite3.SQLITE_CORRUPT: StoreCorrupt,
    sqlite3.SQLITE_NOTADB: StoreCorrupt,
    sqlite3.SQLITE_IOERR: StoreUnavailable,
}
"""SQLite's primary result codes (the low byte of an extended code) and what each means for an operator."""

_SQLSTATES: dict[str, type[StoreUnavailable]] = {
    "53100": StoreFull,  # disk_full
    "25006": StoreReadOnly,  # read_only_sql_transaction (a read-only database or replica)
    "42501": StoreReadOnly,  # insufficient_privilege
    "55P03": StoreBusy,  # lock_not_available
    "40P01": StoreBusy,  # deadlock_detected
    "XX001": StoreCorrupt,  # data_corrupted
    "XX002": StoreCorrupt,  # index_corrupted
}
"""PostgreSQL's SQLSTATE codes with the same meanings; class 08 (connection exception) is StoreUnavailable."""

_MESSAGES: tuple[tuple[str, type[StoreUnavailable]], ...] = (
    ("database is locked", StoreBusy),
    ("database table is locked", StoreBusy),
    ("disk is full", StoreFull),
    ("readonly database", StoreReadOnly),
    ("unable to open database file", StoreReadOnly),
    ("disk image is malformed", StoreCorrupt),
    ("file is not a database", StoreCorrupt),
)
"""SQLite's messages, for an error that reaches us without its result code."""


def error_kind(exc: BaseException) -> type[StoreUnavailable] | None:
    """Which :class:`StoreUnavailable` a driver exception (or SQLAlchemy's wrapper of one) is, or None.

    None means the error is not about the database's environment (a constraint, a bad statement): the
    caller keeps it as it is.
    """
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _SQLITE_CODES:
        return _SQLITE_CODES[code & 0xFF]
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(state, str):
        if state in _SQLSTATES:
            return _SQLSTATES[state]
        if state.startswith(("08", "53", "57P")):  # connection lost, out of resources, server shutting down
            return StoreUnavailable
    text = str(orig).lower()
    return next((kind for needle, kind in _MESSAGES if needle in text), None)


def recovery_steps(path: str) -> str:
    """What an operator does with a damaged SQLite file, in order; nothing here deletes the original."""
    return (
        f"to recover: stop every s2agent process using it; keep a copy (cp {path} {path}.bak, and its -wal and -shm "
        f"files if present); rebuild what SQLite can still read: sqlite3 {path} .recover | sqlite3 {path}.recovered; "
        f"check it: agent --db {path}.recovered store check; then move it into place (mv {path}.recovered {path}), "
        "or restore a backup"
    )


def classify(exc: BaseException, where: str, sqlite_path: str | None = None) -> StoreUnavailable | None:
    """``exc`` as the :class:`StoreUnavailable` an operator can act on, with one message, or None.

    ``where`` names the database (a path, or a URL without its password); ``sqlite_path`` is the file
    behind a SQLite database, given so a damaged one's message can say how to recover it.
    """
    kind = error_kind(exc)
    if kind is None:
        return None
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    if kind is StoreBusy:
        message = (f"{where}: the database is busy ({reason}): another process held the lock this needed longer "
                   "than the 30 s busy timeout; nothing was changed, retry later")
    elif kind is StoreFull:
        message = (f"{where}: the disk holding the database is full ({reason}); nothing was written and the "
                   "database is intact: free space there (SQLite also needs room for its -wal file), then retry")
    elif kind is StoreReadOnly:
        message = (f"{where}: the database cannot be written or opened by this process ({reason}): the file or "
                   "its folder is read-only for this user, or on a read-only mount (SQLite creates -wal and -shm "
                   "files beside the database, so the folder must be writable too). The database is not damaged: "
                   "do not delete it; fix the permissions or the mount")
    elif kind is StoreCorrupt:
        if "not a database" in reason:
            message = f"{where} is not a SQLite database ({reason}); refusing to open it: check the path"
        else:
            message = f"{where} is damaged ({reason}); s2agent will not write to it"
        if sqlite_path is not None:
            message += f"; {recovery_steps(sqlite_path)}"
    else:
        message = f"{where}: the database cannot be reached or read ({reason}); nothing was changed"
    return kind(message)
