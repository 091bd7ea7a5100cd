"""What one request may cost the engine, and how many may wait for it: the server's defence against stalls.

The engine is shared: every generation waits in one batcher queue. Three bounds keep one client from
holding it for everyone else:

- a request's size: at most ``server.max_prompts`` prompts and ``server.max_sequences`` sequences
  (prompts × ``n``), checked before anything runs (:func:`check_size`);
- a request's persistence: a large request runs as chunks of at most one batch (:func:`chunks`), one after
  the other, and the route checks between two chunks that its client is still there; a client that hangs
  up stops its request within one chunk, and a request that arrives meanwhile shares the next batch
  instead of waiting behind all of it;
- the queue: at most ``server.max_queued`` generation requests are held at once (:class:`Admission`);
  one more is refused at once with a 503 and ``Retry-After`` instead of making every request late.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from agent.config import ServerConfig
from agent.errors import Overloaded
from agent.server.protocol import APIError

T = TypeVar("T")


def check_size(config: ServerConfig, prompts: int, n: int) -> None:
    """Refuse a request of more than ``max_prompts`` prompts or ``max_sequences`` sequences, naming the field."""
    if prompts > config.max_prompts:
        raise APIError(400, f"prompt holds {prompts} prompts; at most {config.max_prompts} per request",
                       param="prompt", code="invalid_value")
    if prompts * n > config.max_sequences:
        raise APIError(400, f"{prompts} prompt(s) × n={n} asks for {prompts * n} sequences; at most "
                       f"{config.max_sequences} per request", param="n", code="invalid_value")


def chunks(items: Sequence[T], n: int, max_batch: int) -> Iterator[Sequence[T]]:
    """``items`` (prompts of ``n`` sequences each) in runs that fill at most one batch of ``max_batch`` rows."""
    size = max(1, max_batch // max(1, n))
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Admission:
    """At most ``limit`` generation requests held at once; the one past it raises :class:`Overloaded`.

    Used on the event loop only (routes are coroutines), so a plain counter needs no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0

    def acquire(self) -> None:
        """Take one place; refuse at once when none is free. A streamed request releases it when its
        generation ends, which may be after its route returned."""
        if self.held >= self.limit:
            self.refused += 1
            raise Overloaded(f"the server holds {self.held} requests, its limit (server.max_queued); "
                             "retry in a moment")
        self.held += 1

    def release(self) -> None:
        self.held -= 1

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one place while the request generates; refuse at once when none is free."""
        self.acquire()
        try:
            yield
        finally:
            self.release()
