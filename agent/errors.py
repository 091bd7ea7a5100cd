"""Every error the runtime raises on purpose, under one root: ``except S2AgentError`` catches them all.

Each class also keeps the built-in base it always had (``ValueError`` for bad input, ``RuntimeError`` for a
failed operation), so code that caught those still works. The store is a package of its own that imports
nothing from the runtime; its errors have their own root, :class:`store.StoreError`, and :data:`EXPECTED`
names the two together, with the database's own refusals (:class:`OperationalError`): what the CLI
reports in one line (:func:`describe`) and the server answers with a 4xx or a 503.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, OperationalError

from store import StoreError


class S2AgentError(Exception):
    """Root of the runtime's own errors."""


class ConfigError(S2AgentError, ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class InvalidQueryError(S2AgentError, ValueError):
    """The query cannot be answered as given (empty, unknown route or method)."""


class PromptTooLongError(S2AgentError, ValueError):
    """The prompt does not fit in the model's context window together with the requested new tokens."""


class ModelNotFoundError(S2AgentError, RuntimeError):
    """No model could be found for a spec; the message lists every place that was tried."""


class AdapterError(S2AgentError, RuntimeError):
    """An adapter folder is missing, incomplete or does not fit the base model."""


class System2Timeout(S2AgentError, RuntimeError):
    """System 2 ran past ``system2.timeout_s``; the System 1 answer is used instead."""


class TeacherError(S2AgentError, RuntimeError):
    """The System 2 teacher did not answer (after its retries); System 1's answer is used instead."""


class TeacherUnavailable(TeacherError):
    """The teacher's circuit breaker is open after repeated failures: System 2 on it is skipped for now."""


class TrainingDiverged(S2AgentError, RuntimeError):
    """The loss became NaN or infinite: the candidate is discarded and serving is untouched."""


class ConsolidationInterrupted(S2AgentError, RuntimeError):
    """Shutdown asked the run to stop; it stopped between two training steps and changed nothing."""


class Overloaded(S2AgentError, RuntimeError):
    """The server already holds as many requests as it may (``server.max_queued``): retry in a moment.

    Refusing at once keeps the wait of the requests already admitted bounded; a queue that grows makes
    every request in it late."""


class GenerationCancelled(S2AgentError, RuntimeError):
    """A generation was dropped before it finished: its caller cancelled it (a client that hung up) or its
    deadline passed. The engine freed its rows at the next decode step; nothing was answered."""


EXPECTED: tuple[type[Exception], ...] = (S2AgentError, StoreError, OperationalError)
"""Errors that mean "the input or the environment is wrong", not "the program is wrong": reported in one
line by the CLI, as a 4xx (or a 503 when the environment is at fault) by the server; anything else is a bug
and keeps its traceback. ``OperationalError`` is the database refusing what was asked of it (locked past
its busy timeout, a disk error, a lost connection): the environment, not the program."""


def describe(exc: BaseException) -> str:
    """``exc`` as one line for a user: its message, or for a database's refusal the driver's reason alone.

    SQLAlchemy's own message adds the SQL statement and its parameters, which carry users' text; they
    belong in the server log (with the traceback), not in a client's error or a terminal's one line."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        reason = " ".join(str(exc.orig).split()) or type(exc.orig).__name__
        return f"the database refused the operation: {reason}"
    return str(exc)

__all__ = [
    "EXPECTED",
    "AdapterError",
    "ConfigError",
    "ConsolidationInterrupted",
    "GenerationCancelled",
    "InvalidQueryError",
    "ModelNotFoundError",
    "Overloaded",
    "PromptTooLongError",
    "S2AgentError",
    "StoreError",
    "System2Timeout",
    "TeacherError",
    "TeacherUnavailable",
    "TrainingDiverged",
    "describe",
]
