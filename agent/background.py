"""Background System 2: the user gets System 1's answer now, System 2 labels the query later.

With ``system2.mode = "background"``, :meth:`agent.Agent.answer` does not wait when the router sends a
query to System 2: it offers the query to a :class:`System2Queue` and answers with System 1. The queue is
bounded (``system2.queue_size``): when it is full the query is dropped, and counted, rather than letting
a backlog grow without limit. ``system2.workers`` threads take queries and call a labelling function
(:meth:`agent.Agent._label_deferred`: System 2, the consistency filter, and the example stored exactly as
the inline path stores it). The labelling function may also decline a query when its turn comes
(``skipped``): the System 2 memory learns from the labels done while the query waited, and a kind of input
it now knows System 2 never pays off for is not worth the idle time.

Which query's turn it is: the oldest, or, on every other turn when an ``order`` function scores the waiting
queries, the highest scored (the oldest among equals; :meth:`agent.Agent._label_order` ranks them by how
likely System 2 is to pay off). On a CPU that labels only in serving's spare time, the queue lags minutes
behind the traffic: in arrival order, the sums a scope needs to start learning waited behind general
questions and sorting, which cost up to 8 s of labelling each and never pay off; ranked alone, those were
never labelled, so the System 2 memory never learned to skip them, and 0.92 of a live replay's last
window was still queued for System 2. Taking the oldest on the other turns starves no kind of input.

A query waits in the queue until its interaction has been logged (:meth:`Deferred.logged`), so that the
stored example can point at it. :meth:`System2Queue.close` stops taking queries, drops those still
waiting (counted as dropped), and waits up to ``timeout`` seconds for the workers; a label in progress
stops at its next generation call (the agent refuses System 2 calls once it is closing) and counts as
failed. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

LOG_WAIT_SECONDS = 30.0
"""How long a worker waits for the answer that queued a query to log its interaction."""


@dataclass
class Deferred:
    """A query waiting for its System 2 label."""

    query: str
    method: str | None
    """The method the request asked for (None: the configured one for ``tag``)."""
    tag: str | None
    system1_text: str
    confidence: float | None
    adapter_version: int | None
    interaction_id: int | None = None
    source: str | None = None
    """Who asked (an API key's name, ``local``): the stored example records it."""
    explore: bool = False
    """Queued although the System 2 memory said skip (drawn to explore): labelled whatever it says later."""
    _logged: threading.Event = field(default_factory=threading.Event, repr=False)

    def logged(self, interaction_id: int | None) -> None:
        """The answer's interaction is in the store (None: logging it failed): the query may be labelled."""
        self.interaction_id = interaction_id
        self._logged.set()


@dataclass
class Label:
    """What labelling one query gave: whether its example joined the buffer as pending, and its cost."""

    accepted: bool
    tokens: int
    skipped: bool = False
    """System 2 was not run: by the time the query's turn came, it was no longer worth running."""


COUNTERS = ("queued", "dropped", "labelled", "accepted", "skipped", "failed", "tokens")
"""``queued``: queries taken into the queue; ``dropped``: refused because it was full, or still waiting
at close; ``labelled``: System 2 reached a decision; ``accepted``: that decision passed the consistency
filter and joined the buffer as pending; ``skipped``: not run when its turn came (the System 2 memory,
which learnt while it waited, says System 2 does not pay off for inputs like it); ``failed``: System 2
raised (timeout, closing, an error); ``tokens``: tokens System 2 generated in the background."""


class System2Queue:
    """A bounded queue of :class:`Deferred` queries and the threads that label them."""

    def __init__(self, size: int, workers: int, label: Callable[[Deferred], Label],
                 order: Callable[[Sequence[Deferred]], Sequence[float]] | None = None) -> None:
        self._size = max(1, size)
        self._waiting: list[Deferred] = []
        """Oldest first."""
        self._label = label
        self._order = order
        self._n_workers = max(1, workers)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Condition()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._turns = 0
        self.closing = threading.Event()

    def offer(self, item: Deferred) -> bool:
        """Queue ``item``; False (and counted as dropped) when the queue is full or closing."""
        with self._lock:
            if self.closing.is_set() or len(self._waiting) >= self._size:
                self._counts["dropped"] += 1
                return False
            self._waiting.append(item)
            self._counts["queued"] += 1
            self._lock.notify()
            if not self._threads:  # started on first use: an agent that never defers has no threads
                self._threads = [threading.Thread(target=self._work, name=f"system2-background-{i}", daemon=True)
                                 for i in range(self._n_workers)]
                for thread in self._threads:
                    thread.start()
            return True

    def stats(self) -> dict[str, int]:
        """The counters (see :data:`COUNTERS`) and ``waiting``: queries in the queue now."""
        with self._lock:
            return {**self._counts, "waiting": len(self._waiting)}

    def close(self, timeout: float = 30.0) -> None:
        """Stop: drop what is still waiting, and wait up to ``timeout`` seconds for the workers."""
        with self._lock:
            self.closing.set()
            self._counts["dropped"] += len(self._waiting)
            self._waiting.clear()
            self._lock.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("background System 2 worker %s did not stop within %.0f s", thread.name, timeout)

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, n in increments.items():
                self._counts[key] += n

    def _take(self) -> Deferred | None:
        """The query whose turn it is: the oldest, or every other turn the best ranked (None: nothing waits within
        a short wait, or closing). ``order`` runs outside the lock, so that queries are offered meanwhile."""
        with self._lock:
            if not self._waiting:
                self._lock.wait(timeout=0.2)
            waiting = list(self._waiting)
            self._turns += bool(waiting)
            ranked = self._turns % 2 == 0
        if not waiting or self.closing.is_set():
            return None
        chosen = waiting[0]
        if self._order is not None and len(waiting) > 1 and ranked:
            try:
                scores = self._order(waiting)
                chosen = waiting[max(range(len(waiting)), key=lambda i: (scores[i], -i))]  # the oldest among equals
            except Exception:  # noqa: BLE001 - a failed ranking falls back to arrival order, it stops nothing
                logger.exception("ranking the background System 2 queue failed; taking the oldest query")
        with self._lock:
            for k, queued in enumerate(self._waiting):
                if queued is chosen:  # another worker may have taken it meanwhile
                    del self._waiting[k]
                    return chosen
        return None

    def _work(self) -> None:
        while not self.closing.is_set():
            item = self._take()
            if item is None:
                continue
            if not item._logged.wait(LOG_WAIT_SECONDS) or self.closing.is_set():
                self._count(dropped=1)
                continue
            try:
                label = self._label(item)
            except Exception as exc:  # noqa: BLE001 - one bad label must not stop the worker
                logger.warning("background System 2 failed on %r: %s", item.query[:80], exc)
                self._count(failed=1)
                continue
            if label.skipped:
                self._count(skipped=1)
            else:
                self._count(labelled=1, accepted=int(label.accepted), tokens=label.tokens)
