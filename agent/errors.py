"""Every error the runtime raises on purpose, under one root: ``except S2AgentError`` catches them all.

Each class also keeps the built-in base it always had (``ValueError`` for bad input, ``RuntimeError`` for a
failed operation), so code that caught those still works. The store is a package of its own that imports
nothing from the runtime; its errors have their own root, :class:`store.StoreError`, and :data:`EXPECTED`
names the two together: what the CLI reports in one line and the server answers with a 4xx.
"""

from __future__ import annotations

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


EXPECTED: tuple[type[Exception], ...] = (S2AgentError, StoreError)
"""Errors that mean "the input or the environment is wrong", not "the program is wrong": reported in one
line by the CLI, as a 4xx by the server; anything else is a bug and keeps its traceback."""

__all__ = [
    "EXPECTED",
    "AdapterError",
    "ConfigError",
    "ConsolidationInterrupted",
    "InvalidQueryError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "S2AgentError",
    "StoreError",
    "System2Timeout",
    "TeacherError",
    "TeacherUnavailable",
    "TrainingDiverged",
]
