"""What the runtime raises, as the HTTP error a client gets: one table, :data:`ERRORS`, read by :func:`api_error`.

The runtime's own errors have two roots, :class:`~agent.errors.S2AgentError` and :class:`store.StoreError`;
with the database's own refusals (SQLAlchemy's ``OperationalError``) they are :data:`agent.errors.EXPECTED`.
A row maps a class, optionally only within one operation, to a status, an OpenAI error ``code`` and
``type``, and the request field to blame (``param``). An exception takes the row of its nearest class, so a
subclass without a row of its own gets its root's: a new error is answered sensibly before anyone adds a
row for it. Anything outside :data:`~agent.errors.EXPECTED` is a bug: a 500 with a traceback in the log
(see :mod:`agent.server.app`).

What the statuses mean here:

- 400: the request is wrong and the client can fix it (a prompt past the context window, an empty query,
  a System 2 method that does not exist);
- 409: the adapter registry refuses the change in its present state (no such version, its files pruned or
  damaged so that its weights do not load, nothing to roll back to); another version, or a later moment,
  would be accepted;
- 503: nothing in the request is wrong, the service cannot do it now (the store refuses what the runtime
  asked of it, an adapter does not load); retry later, or ask the operator: the server log has the reason.
  Where waiting is the cure (the server is full, the database is locked) the answer says how long to wait
  in ``Retry-After``, which OpenAI's clients honour when they retry.
  The store's own trouble has a code each (``store_busy``, ``store_full``, ``store_read_only``,
  ``store_damaged``): a full disk must not be mistaken for a damaged database.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError

from agent.errors import (
    AdapterError,
    ConfigError,
    GenerationCancelled,
    InvalidQueryError,
    Overloaded,
    PromptTooLongError,
    S2AgentError,
    describe,
)
from agent.server.protocol import APIError
from store import (
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreReadOnly,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

INPUT = "<input>"
"""A row's ``param`` meaning "the field that carried this operation's input" (see :data:`INPUT_PARAMS`)."""
INPUT_PARAMS: dict[str, str] = {"chat": "messages", "completion": "prompt", "rollback": "version"}
"""The request field that carries each operation's input."""
UNAVAILABLE = "service_unavailable"


@dataclass(frozen=True)
class ErrorRule:
    status: int
    code: str
    param: str | None = None
    type: str = "invalid_request_error"
    retry_after: int | None = None
    """Seconds for ``Retry-After``: set where the same request is likely to succeed that much later."""


ERRORS: dict[tuple[type[Exception], str | None], ErrorRule] = {
    # (class, operation or None for any): the answer
    (PromptTooLongError, None): ErrorRule(400, "context_length_exceeded", INPUT),
    (InvalidQueryError, None): ErrorRule(400, "invalid_value", INPUT),
    (ConfigError, "chat"): ErrorRule(400, "invalid_value", "s2agent"),  # s2agent.method names no System 2 method
    (StoreError, "rollback"): ErrorRule(409, "rollback_refused", INPUT),
    (AdapterError, "rollback"): ErrorRule(409, "rollback_refused", INPUT),  # the target's weights do not load
    (AdapterError, None): ErrorRule(503, "adapter_unavailable", type=UNAVAILABLE),
    (StoreBusy, None): ErrorRule(503, "store_busy", type=UNAVAILABLE),
    (StoreFull, None): ErrorRule(503, "store_full", type=UNAVAILABLE),
    (StoreReadOnly, None): ErrorRule(503, "store_read_only", type=UNAVAILABLE),
    (StoreCorrupt, None): ErrorRule(503, "store_damaged", type=UNAVAILABLE),
    (StoreUnavailable, None): ErrorRule(503, "store_unavailable", type=UNAVAILABLE),  # never a refused rollback
    (StoreError, None): ErrorRule(503, "store_error", type=UNAVAILABLE),
    (GenerationCancelled, None): ErrorRule(499, "client_disconnected"),  # nobody reads it; the log does
    (Overloaded, None): ErrorRule(503, "server_overloaded", type=UNAVAILABLE, retry_after=1),
    (OperationalError, None): ErrorRule(503, "database_unavailable", type=UNAVAILABLE, retry_after=1),  # locked
    (S2AgentError, None): ErrorRule(503, "agent_unavailable", type=UNAVAILABLE),  # a ConfigError outside a chat too
}


def rule_for(exc: BaseException, operation: str | None = None) -> ErrorRule | None:
    """The row for ``exc`` raised during ``operation``: its nearest class's, the operation's row first."""
    for cls in type(exc).__mro__:
        rule = ERRORS.get((cls, operation)) or ERRORS.get((cls, None))
        if rule is not None:
            return rule
    return None


def api_error(exc: BaseException, operation: str | None = None) -> APIError:
    """``exc``, one of :data:`agent.errors.EXPECTED`, as the :class:`APIError` to answer with."""
    rule = rule_for(exc, operation)
    if rule is None:
        raise TypeError(f"{type(exc).__name__} is not one of the runtime's errors") from exc
    if rule.status >= 500 and not isinstance(exc, Overloaded):  # refusals under load: the access log has each
        logger.warning("%s failed: %s: %s", operation or "request", type(exc).__name__, exc)
    param = INPUT_PARAMS.get(operation or "") if rule.param == INPUT else rule.param
    headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None
    return APIError(rule.status, describe(exc), type=rule.type, param=param, code=rule.code, headers=headers)
