"""Dynamic micro-batching: concurrent callers share forward passes.

Any thread may call :meth:`BatchingBackend.generate`; its requests wait up to ``max_wait_ms`` for
others, then one worker thread runs them all as a single batch on the wrapped backend. With 8
concurrent clients this turns 8 sequential decodes into one batched decode (the engine's tokens/s
grows ~5x from batch 1 to batch 8 on 2 CPU cores).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Sequence

from agent.backends.base import Backend, Completion, GenerationRequest, Prompt

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    requests: Sequence[GenerationRequest]
    future: Future

    @property
    def rows(self) -> int:
        return sum(r.params.n for r in self.requests)


class BatchingBackend:
    """Wraps a backend; same protocol, thread-safe, batches across callers."""

    def __init__(self, inner: Backend, max_batch: int = 16, max_wait_ms: float = 5.0) -> None:
        self.inner = inner
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.model_name = inner.model_name
        self.context_length = inner.context_length
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="s2agent-batcher", daemon=True)
        self._worker.start()
        self.batches = 0
        self.batched_rows = 0
        self._closed = False

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        if not requests:
            return []
        if self._closed:
            raise RuntimeError("the backend is closed")
        job = _Job(list(requests), Future())
        self._queue.put(job)
        return job.future.result()

    def count_tokens(self, prompt: Prompt) -> int:
        return self.inner.count_tokens(prompt)

    def load_adapter(self, name: str, path: str) -> None:
        self.inner.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.inner.unload_adapter(name)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=30)
        self.inner.close()

    # ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        carry: _Job | None = None
        while True:
            job = carry or self._queue.get()
            carry = None
            if job is None:
                return
            jobs, rows = [job], job.rows
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                if rows + nxt.rows > self.max_batch:
                    carry = nxt
                    break
                jobs.append(nxt)
                rows += nxt.rows
            self._execute(jobs)

    def _execute(self, jobs: list[_Job]) -> None:
        flat = [r for job in jobs for r in job.requests]
        try:
            results = self.inner.generate(flat)
        except Exception as exc:  # noqa: BLE001 - isolate the caller whose request failed
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for job in jobs:
                self._execute([job])
            return
        self.batches += 1
        self.batched_rows += sum(job.rows for job in jobs)
        start = 0
        for job in jobs:
            job.future.set_result(results[start:start + len(job.requests)])
            start += len(job.requests)
