"""Write-behind for the interaction log: one thread commits queued rows in batches.

One transaction per answered query caps a replica at a few hundred answers a second on SQLite (every commit
is a WAL append and a lock round trip); a batch of hundreds costs about the same as one row. The log of a
plain System 1 answer is not needed by anything until someone reads the log, so it can wait a few
milliseconds in memory; what the runtime must never lose (an accepted System 2 example, and the
interaction it points to) is written synchronously by the caller, not here.

Guarantees:
- bounded: at most ``max_queued`` rows wait; when the queue is full :meth:`InteractionWriter.submit` writes
  the row itself, synchronously (back-pressure, never a silent drop);
- a batch that fails to commit (the database is away) is retried with back-off until it commits or the
  writer closes; :meth:`InteractionWriter.close` flushes what is queued (``agent serve`` calls it on SIGTERM);
- a crash (``kill -9``) loses at most the rows still queued: by default the last ``flush_interval_s`` (50 ms)
  of System 1 interaction logs. Examples are never queued here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from .core import Store
from .interactions import check_interaction

logger = logging.getLogger(__name__)


@dataclass
class WriterStats:
    """What the writer did so far (``/metrics``)."""

    written: int = 0
    """Rows committed by the writer thread."""
    batches: int = 0
    """Transactions it committed."""
    direct: int = 0
    """Rows the callers wrote themselves because the queue was full."""
    failed_batches: int = 0
    """Commits that failed and were retried."""
    lost: int = 0
    """Rows given up on at close because the database never took them (logged as errors)."""


class InteractionWriter:
    """A bounded queue of interaction rows and the thread that commits them in batches."""

    def __init__(self, store: Store, *, max_queued: int = 10_000, max_batch: int = 500,
                 flush_interval_s: float = 0.05, retry_s: float = 0.5) -> None:
        self.store = store
        self.max_batch, self.flush_interval_s, self.retry_s = max_batch, flush_interval_s, retry_s
        self.stats = WriterStats()
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=max_queued)
        self._closing = threading.Event()
        self._idle = threading.Condition()
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, name="s2agent-interaction-writer", daemon=True)
        self._thread.start()

    def submit(self, fields: dict[str, Any]) -> None:
        """Queue one row (``Store.log_interaction``'s fields); written synchronously when the queue is full or
        the writer is closed. A row the store would refuse raises :class:`StoreError` here, at once."""
        fields = check_interaction(dict(fields))
        if not self._closing.is_set():
            with self._idle:
                try:
                    self._queue.put_nowait(fields)
                    self._in_flight += 1
                    return
                except queue.Full:
                    pass
        self.stats.direct += 1
        self.store.log_interaction(**fields)

    @property
    def queued(self) -> int:
        return self._in_flight

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row submitted before this call is committed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining if remaining is not None else 1.0)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued (for up to ``timeout`` seconds), then stop the thread."""
        self._closing.set()
        self._thread.join(timeout)
        if self._in_flight:
            self.stats.lost += self._in_flight
            logger.error("closing the interaction log with %d rows the database did not take", self._in_flight)

    # --- the thread ------------------------------------------------------------------------------------
    def _take_batch(self) -> list[dict[str, Any]]:
        try:
            batch = [self._queue.get(timeout=self.flush_interval_s)]
        except queue.Empty:
            return []
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        batch: list[dict[str, Any]] = []
        failures = 0  # in a row, for the current batch
        while True:
            if not batch:
                if self._closing.is_set() and self._queue.empty():
                    return
                batch = self._take_batch()
                if not batch:
                    continue
            try:
                self.store.log_interactions(batch)
            except Exception:  # noqa: BLE001 - the database may be away for a while: keep the rows, retry
                self.stats.failed_batches += 1
                failures += 1
                logger.warning("could not write %d interaction rows; retrying in %.1f s", len(batch), self.retry_s,
                               exc_info=failures == 1)
                if self._closing.wait(self.retry_s) and failures > 3:
                    return  # closing and still failing: close() counts and reports what is left
                continue
            failures = 0
            with self._idle:
                self.stats.written += len(batch)
                self.stats.batches += 1
                self._in_flight -= len(batch)
                self._idle.notify_all()
            batch = []
