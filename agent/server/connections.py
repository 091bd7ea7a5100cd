"""How long a connection may hold the server without sending a request: uvicorn's settings, and a head timeout.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) and refuses requests past
``limit_concurrency``, but it waits forever for a request head: a client that connects and sends nothing,
or one header byte every few seconds, holds its connection indefinitely (220 such connections stayed open
in the probe of issue 13). :class:`HeadTimeoutProtocol` closes a connection that has not completed a
request head within ``server.read_timeout_s`` of connecting or of its previous response. The body has its
own limit of the same length, enforced where it is read (:func:`agent.server.protocol.read_json`), which can
still answer with a 408.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.config import ServerConfig

logger = logging.getLogger(__name__)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus: the request head must arrive within ``head_timeout_s``.

    The timer starts when the connection opens and again when a response completes; it closes the
    connection only if no request is in progress when it fires (a request whose head arrived is the
    body timeout's and the handler's business)."""

    head_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._on_head_timeout, self.scope)

    def _disarm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self, scope_when_armed: Any) -> None:
        self._head_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.scope is scope_when_armed and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("closing the connection of %s: no request head within %g s", client, self.head_timeout_s)
            self.transport.close()


def protocol_for(config: ServerConfig) -> type[HeadTimeoutProtocol]:
    """:class:`HeadTimeoutProtocol` with ``config``'s timeout (uvicorn builds protocols from a class)."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": config.read_timeout_s})


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """The ``uvicorn.Config`` settings that bound what connections may hold: every server of ``config`` uses
    them, :func:`agent.server.serve` and the tests' servers alike."""
    return {"http": protocol_for(config), "timeout_keep_alive": config.keep_alive_s,
            "limit_concurrency": config.max_connections}
