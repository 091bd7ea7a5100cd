"""What a caller holds while its generation runs: a :class:`Handle` with token deltas, a result and ``cancel()``.

``Backend.generate`` answers when everything is decoded; a chat UI wants the first words at once, and a server
whose client hung up wants the rows it was decoding out of the batch. A backend that schedules per decode
step (:class:`agent.backends.batching.BatchingBackend`) implements ``submit(request) -> Handle``; for any
other backend :func:`submit` runs ``generate`` and hands back a handle that is already finished, so callers
need one code path.

Text is streamed so that the concatenated deltas always equal the final text: a delta never ends inside a
multi-byte character (the tokenizer's ``\\ufffd`` is held back), and with stop strings the last
``len(longest stop) - 1`` characters are held back until they can no longer begin a stop string.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from agent.backends.base import Backend, Completion, GenerationRequest
from agent.errors import GenerationCancelled


@dataclass(frozen=True)
class Delta:
    """New text of one sample (``index`` among the request's ``n``); the last one carries ``finish_reason``."""

    index: int
    text: str
    tokens: int
    """Tokens decoded for this sample so far."""
    finish_reason: str | None = None


class Handle:
    """One submitted request: iterate :meth:`deltas` while it decodes, then :meth:`result`; :meth:`cancel` any time.

    Thread-safe: the engine's worker publishes, one consumer thread reads. ``cancel`` (or the ``cancel`` event
    given at submit, or a passed ``deadline``) makes the engine drop the request's rows at its next decode step;
    :meth:`result` then raises :class:`~agent.errors.GenerationCancelled`."""

    def __init__(self, request: GenerationRequest, *, cancel: threading.Event | None = None,
                 deadline: float | None = None, stream: bool = True) -> None:
        self.request = request
        self.stream = stream
        """Whether the engine computes text deltas for this request (a plain ``generate`` needs none)."""
        self.deadline = deadline
        """``time.monotonic()`` after which the caller no longer wants the answer; None: no deadline."""
        self._cancel = cancel or threading.Event()
        self._deltas: queue.Queue[Delta | None] = queue.Queue()
        self._done = threading.Event()
        self._result: list[Completion] | None = None
        self._error: BaseException | None = None

    # --- the caller's side -------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to drop this request; rows leave the batch at the next decode step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def expired(self, now: float | None = None) -> bool:
        """Cancelled, or past its deadline: what the engine checks between two decode steps."""
        if self._cancel.is_set():
            return True
        return self.deadline is not None and (now if now is not None else time.monotonic()) > self.deadline

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def deltas(self, timeout: float | None = None) -> Iterator[Delta]:
        """Text deltas as they are decoded, ending when the request finishes (or fails: then see ``result``)."""
        while True:
            delta = self._deltas.get(timeout=timeout)
            if delta is None:
                self._deltas.put(None)  # a second iteration ends at once too
                return
            yield delta

    def result(self, timeout: float | None = None) -> list[Completion]:
        """The ``n`` completions; raises what the generation raised (``GenerationCancelled`` when dropped)."""
        if not self._done.wait(timeout):
            raise TimeoutError("the generation did not finish in time")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    # --- the engine's side -------------------------------------------------------------------------------
    def publish(self, delta: Delta) -> None:
        self._deltas.put(delta)

    def finish(self, completions: list[Completion]) -> None:
        self._result = completions
        self._done.set()
        self._deltas.put(None)

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()
        self._deltas.put(None)

    def why_dropped(self) -> GenerationCancelled:
        if self._cancel.is_set():
            return GenerationCancelled("the generation was cancelled by its caller")
        return GenerationCancelled("the generation's deadline passed before it finished")


def results(handles: Sequence[Handle]) -> list[list[Completion]]:
    """Each handle's completions, in order; the first failure cancels the handles still running and is raised."""
    try:
        return [h.result() for h in handles]
    except BaseException:
        for h in handles:
            if not h.done:
                h.cancel()
        raise


def text_delta(text: str, emitted: int, stops: Sequence[str], final: bool) -> tuple[str, int]:
    """The part of ``text`` (all decoded so far) that can be sent now, after the first ``emitted`` characters.

    Until ``final``, a trailing replacement character (half of a multi-byte character) and the last
    ``max(len(stop)) - 1`` characters (the start of a stop string not yet complete) are held back."""
    end = len(text)
    if not final:
        while end > emitted and text[end - 1] == "\ufffd":
            end -= 1
        hold = max((len(s) for s in stops), default=1) - 1
        end = max(emitted, end - hold)
    if end <= emitted:
        return "", emitted
    return text[emitted:end], end


def submit(backend: Backend, request: GenerationRequest, *, cancel: threading.Event | None = None,
           deadline: float | None = None) -> Handle:
    """``backend.submit`` when it has one; otherwise run ``generate`` now and return a finished handle
    whose deltas are each sample's whole text (a backend without steps cannot stream or cancel mid-way)."""
    native = getattr(backend, "submit", None)
    if native is not None:
        return native(request, cancel=cancel, deadline=deadline)
    handle = Handle(request, cancel=cancel, deadline=deadline)
    try:
        [completions] = backend.generate([request])
    except Exception as exc:  # noqa: BLE001 - handed to the caller through result()
        handle.fail(exc)
        return handle
    for i, c in enumerate(completions):
        handle.publish(Delta(i, c.text, c.num_tokens, c.finish_reason))
    handle.finish(completions)
    return handle


def generate(backend: Backend, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None,
             deadline: float | None = None) -> list[list[Completion]]:
    """``backend.generate(requests)``, dropped at the next decode step once ``cancel`` is set or ``deadline``
    passes (on a backend that schedules per step; any other runs to the end)."""
    if getattr(backend, "submit", None) is None or (cancel is None and deadline is None):
        return backend.generate(requests)
    return backend.generate(requests, cancel=cancel, deadline=deadline)  # type: ignore[call-arg]
