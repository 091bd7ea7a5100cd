"""The exceptions the store raises.

Every problem the store can name (a file that is not a database, a schema from a newer s2agent, a malformed
import file, an adapter that cannot be served) is a :class:`StoreError` with one message that says what is
wrong and with which path, version or line, so the CLI and the server can show it as it is.
"""

from __future__ import annotations


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
