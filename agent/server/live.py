"""Token streaming over HTTP: a blocking agent call in a worker thread, its text pieces sent as SSE as they come.

:class:`LiveCall` starts the call (``Agent.answer`` with ``on_text``, or ``Agent.complete`` with ``on_delta``)
in a worker thread; the callback hands each piece to the event loop (``call_soon_threadsafe``), so no thread
blocks on the client. The route waits for the first piece before it answers, so that a request the runtime
refuses (a prompt past the context window, an unknown adapter) still gets its 4xx, not a 200 stream that
breaks. While it waits (a System 2 answer comes only after the vote) it checks that the client is still there.
An answer sent whole (no ``stream``) is watched the same way while it is generated (:func:`call_unless_gone`).

A client that hangs up sets the call's ``cancel`` event (the response generator's ``finally``, or the wait
above): the engine drops its rows at the next decode step and the worker thread ends with
:class:`~agent.errors.GenerationCancelled` (a 499 nobody reads). A failure after the first token (the store
refusing to log the answer) can no longer change the status: it is sent as an ``error`` event, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Request

from agent.server.protocol import APIError, client_gone
from agent.server.serving import Chunks, Result, call, from_end

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
"""How often a request still waiting for its first token checks that its client is there."""
T = TypeVar("T")
Piece = tuple[int, str]
"""(choice index, text) as decoded."""


class LiveCall:
    """One agent call whose pieces of text reach the event loop while it runs."""

    def __init__(self, operation: str, fn: Callable[..., Any], *args: Any, feed: str, on_done: Callable[[], None],
                 **kwargs: Any) -> None:
        """Start ``fn(*args, **kwargs)``; ``feed`` names its streaming callback: ``on_text`` (``Agent.answer``:
        text of choice 0) or ``on_delta`` (``Agent.complete``: a :class:`~agent.backends.stream.Delta`)."""
        self.loop = asyncio.get_running_loop()
        self.pieces: asyncio.Queue[Piece] = asyncio.Queue()
        self.cancel = threading.Event()
        if feed == "on_text":
            kwargs[feed] = lambda text: self.put(0, text)
        else:
            kwargs[feed] = lambda delta: self.put(delta.index, delta.text)
        self.task = asyncio.ensure_future(call(operation, fn, *args, cancel=self.cancel, **kwargs))
        self.task.add_done_callback(lambda _: on_done())  # the admission slot: held until the work ends

    def put(self, index: int, text: str) -> None:
        """From the worker thread: one piece of choice ``index``'s text."""
        if text:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, (index, text))

    async def next_piece(self) -> Piece | None:
        """The next piece, or None once the call has ended and every piece was taken."""
        while self.pieces.empty() and not self.task.done():
            getter = asyncio.ensure_future(self.pieces.get())
            await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                return getter.result()
            getter.cancel()
        return self.pieces.get_nowait() if not self.pieces.empty() else None

    async def first(self, request: Request) -> Piece | None:
        """Wait for the first piece (or the end), cancelling the call if the client leaves meanwhile; what the
        call raised is raised here, as the HTTP error it maps to. The piece is taken the moment it comes (the
        client check runs between pieces' waits, never before a piece that is there)."""
        getter = asyncio.ensure_future(self.pieces.get())
        try:
            await _watch(request, {self.task, getter}, self.cancel, "before its first token was generated")
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        if self.pieces.empty():
            await self.task  # raises the call's error, if any
        return await self.next_piece()

    def abandon(self) -> None:
        """The client is gone: drop the generation at its next step, and swallow the cancellation it raises."""
        self.cancel.set()
        self.task.add_done_callback(_quietly)


async def call_unless_gone(request: Request, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """:func:`~agent.server.serving.call` for an answer sent whole: if the client hangs up before it is ready, the
    engine drops its rows at the next step (prefill chunk or decode step) and the client's 499 is logged, so an
    abandoned request stops costing the engine anything, as a streamed one does."""
    cancel = threading.Event()
    task = asyncio.ensure_future(call(operation, fn, *args, cancel=cancel, **kwargs))
    try:
        await _watch(request, {task}, cancel, "before its answer was generated")
    except BaseException:
        cancel.set()
        task.add_done_callback(_quietly)
        raise
    return task.result()


async def _watch(request: Request, waiting: set[asyncio.Future], cancel: threading.Event, what: str) -> None:
    """Wait until one of ``waiting`` is done, checking every :data:`DISCONNECT_POLL_S` that the client is still
    there; if it left, set ``cancel`` and raise its 499."""
    while not any(f.done() for f in waiting):
        await asyncio.wait(waiting, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_COMPLETED)
        if not any(f.done() for f in waiting) and await request.is_disconnected():
            cancel.set()
            raise client_gone(what)


def _quietly(task: asyncio.Future) -> None:
    """Take the abandoned call's outcome (a 499 for the cancellation), so asyncio does not report it."""
    if not task.cancelled():
        task.exception()


async def events(live: LiveCall, first: Piece | None, chunks: Chunks, choices: int, include_usage: bool,
                 result_of: Callable[[Any], Result], request: Request) -> AsyncIterator[str]:
    """The SSE of a live call: each choice's role chunk, its text as decoded, then (once the call returned)
    each choice's finish chunk, the usage chunk when asked for, and ``[DONE]``. A client that hung up is
    noticed before each chunk: the generation is dropped and nothing more is written to its socket."""
    try:
        if chunks.chat:
            for i in range(choices):
                yield chunks.start(i)
        piece = first
        while piece is not None:
            if await request.is_disconnected():
                return  # `finally` abandons the generation
            yield chunks.text(*piece)
            piece = await live.next_piece()
        try:
            result = result_of(await live.task)
        except APIError as exc:  # after the 200 went out: OpenAI's clients read an error event
            logger.warning("streamed request failed after its first token: %s", exc.message)
            yield chunks.error(exc)
            return
        for i, reason in enumerate(result.finish_reasons):
            yield chunks.finish(i, reason, result)
        yield from_end(chunks, result, include_usage)
    finally:
        if not live.task.done():
            live.abandon()
