"""Iteration-level scheduling (Orca, vLLM's idea) on the HF engine's own decode loop.

One worker thread owns the running batch and, between two decode steps:

1. drops the rows of requests whose caller went away (``Handle.cancel()``, a ``cancel`` event, a passed
   ``deadline``): a client that hung up stops costing anything one step later;
2. admits waiting requests: their prompts are prefilled together (few-shot prefixes shared, each prompt
   computed once for its ``n`` samples), at most ``prefill_chunk`` prompt positions per pass, one pass of
   each prefill in progress per iteration; when a prefill's last pass is done its rows join the running
   batch (:mod:`agent.backends.decode_batch`);
3. runs one decode step for every row, whatever its adapter (PEFT mixes adapters per row), publishes each
   streaming row's new text, and lets finished rows leave at once.

So a System 1 request that arrives while System 2 samples decode waits one step and its own prefill, not
the whole System 2 decode; one that arrives while a 1,500-token prompt is prefilled waits one chunk of it,
not all of it (chunked prefill); and 8 clients share every forward pass even though they arrive at
different times. A prefill whose callers all went away is dropped between two of its chunks.

Priorities (``GenerationRequest.priority``, lower first, as in vLLM): waiting requests are admitted in order
of priority, then of arrival; and while rows of a lower priority are running, a prefill of a higher one
advances one pass every :data:`BACKGROUND_PREFILL_EVERY` iterations instead of every one. A pass of a PAL
prompt (150-250 tokens after the shared few-shot prefix) took 0.3-0.6 s in float32, 4-8 of a System 1 row's
decode steps; paced, a System 1 answer decoding beside it pays a quarter of that per step, and System 2
still gets its prompt in (its rows then decode beside System 1's at full speed).

:data:`~agent.backends.base.IDLE` work (System 2 labelling in the background: nobody waits for it) runs in a
lane of its own: its rows never share a step with others, and neither decode nor prefill while any other row
decodes or prefills; they wait with their cache, and go on when serving has nothing else to do. Shared
steps cost System 1 too much for work nobody waits for: back to back with PAL labels (4 samples each)
decoding beside them, 16-token System 1 answers took 0.86 s at the median against 0.60 s alone.

Idle time alone is too little where users keep the engine busy: in the live replay (two clients, a question
every 2.5 s) labels ran at ~4 a minute while ~20 a minute were queued. So the lane is guaranteed a share of a
busy engine (``idle_share``): while its work waits, it earns ``idle_share / (1 - idle_share)`` of the time of
each iteration the others run, and whenever its credit is not negative it takes one iteration alone (its
prefill pass and/or its decode step) and pays that iteration's time. Over a busy stretch it gets about
``idle_share`` of the engine, so a user's request takes at most about ``1 / (1 - idle_share)`` as long; 0:
idle time only. Under a load that never leaves the engine idle and a share of 0, background labels wait until
their time budget (``system2.timeout_s``) runs out and count as failed: labelling gives way, serving does not.

Admission keeps at most ``max_batch`` rows decoding. Requests are admitted in arrival order; one that does not
fit yet lets later, smaller ones pass for up to :data:`HEAD_OF_LINE_S` seconds, after which nothing passes it
(so short requests are not held behind a large one, and the large one is not starved). A single request larger
than ``max_batch`` runs alone. The server bounds how many requests may wait (``server.max_queued``).

Cores lent to a training process beside the engine (:meth:`BatchingBackend.lend_cores`, the consolidation
child): the engine computes with fewer threads while that process computes. With a pause callback and
:class:`~policies.yielding.TrainerTurns`, the process is paused whenever users' work (anything not IDLE) is in
the engine, and the engine then takes back every thread: the callback is called as soon as such a request
arrives, and again when the last of it leaves (or when the trainer has waited its longest pause).

Adapters: a request names its adapter when it is admitted; :meth:`BatchingBackend.unload_adapter` refuses new
requests for it at once but unloads it only when no running row uses it, so a hot-swap never fails a request
in flight.

One thread runs torch: the worker does every forward pass and every adapter change (:meth:`load_adapter` hands
the load to it and waits). With torch's OpenMP build, each thread that runs a parallel op gets a team of its
own; once a process has more OpenMP threads than cores, GNU OpenMP stops spin-waiting between parallel regions,
and a bfloat16 decode step, made of many short regions, took 0.065 s instead of 0.040 for the rest of the
process after one burst of matrix products in another thread (float32 steps did not move).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from agent.backends.base import IDLE, Completion, GenerationRequest, Prompt
from agent.backends.decode_batch import DecodeBatch, Row, merge
from agent.backends.hf import completion
from agent.backends.stream import Delta, Handle, results, text_delta
from agent.errors import AdapterError
from policies.yielding import TrainerTurns

logger = logging.getLogger(__name__)

HEAD_OF_LINE_S = 1.0
"""How long the oldest waiting request may be passed by later ones that fit the batch when it does not."""
BACKGROUND_PREFILL_EVERY = 4
"""While rows of a lower priority run, a higher priority's prefill advances one pass in this many iterations."""


def _lane(priority: int) -> int:
    """0: rows someone waits for; 1: :data:`~agent.backends.base.IDLE` rows (see the module docstring)."""
    return int(priority >= IDLE)


def _held(prefill: "_Prefill", urgent: int, paced_turn: bool, idle_turn: bool) -> bool:
    """Whether ``prefill`` skips this iteration: on the IDLE lane's turn every other lane's does; otherwise one
    of a higher priority than the most urgent work is paced (``paced_turn``), and an IDLE one waits."""
    if idle_turn:
        return prefill.lane == 0
    return prefill.priority > urgent and (prefill.lane == 1 or not paced_turn)


def _rows(batch: DecodeBatch | None) -> int:
    return len(batch.rows) if batch is not None else 0


class StepEngine(Protocol):
    """What the scheduler needs from an engine: :class:`agent.backends.hf.HFBackend` implements it."""

    model_name: str
    context_length: int
    lock: Any

    def prepare(self, request: GenerationRequest) -> list[int]: ...
    def prefill_steps(self, items: Sequence[tuple[Any, GenerationRequest, list[int]]],
                      chunk: int | None) -> Iterator[DecodeBatch | None]: ...
    def step(self, batch: DecodeBatch) -> tuple[DecodeBatch, list[Row]]: ...
    def drop(self, batch: DecodeBatch, owners: set[Any]) -> DecodeBatch: ...
    def text_so_far(self, row: Row) -> str: ...
    def count_tokens(self, prompt: Prompt) -> int: ...
    def load_adapter(self, name: str, path: str) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class _Lending:
    """Cores lent to a training process (:meth:`BatchingBackend.lend_cores`)."""

    threads: int
    """The engine's torch threads while that process computes."""
    pause: Callable[[bool], None] | None
    turns: TrainerTurns | None
    paused: bool = False


@dataclass(eq=False)
class _Job:
    """One request in the scheduler: its handle, and its samples as they finish."""

    handle: Handle
    submitted: float
    completions: list[Completion | None] = field(default_factory=list)
    left: int = 0

    @property
    def rows(self) -> int:
        return self.handle.request.params.n

    @property
    def priority(self) -> int:
        return self.handle.request.priority


@dataclass(eq=False)
class _Prefill:
    """Jobs admitted together whose prompts are being prefilled, one chunk per scheduler iteration."""

    items: list[tuple[_Job, GenerationRequest, list[int]]]
    steps: Iterator[DecodeBatch | None]

    @property
    def rows(self) -> int:
        return sum(job.rows for job, _, _ in self.items)

    @property
    def priority(self) -> int:
        return min(job.priority for job, _, _ in self.items)

    @property
    def lane(self) -> int:
        return _lane(self.priority)


class BatchingBackend:
    """Wraps a :class:`StepEngine`; the ``Backend`` protocol plus :meth:`submit`, thread-safe."""

    def __init__(self, inner: StepEngine, max_batch: int = 16, max_wait_ms: float = 5.0,
                 prefill_chunk: int | None = 256, idle_share: float = 0.0) -> None:
        if not 0.0 <= idle_share < 1.0:
            raise ValueError(f"idle_share must be in [0, 1), got {idle_share}")
        self.inner = inner
        self.idle_share = idle_share
        """Share of a busy engine's time the IDLE lane is guaranteed (see the module docstring)."""
        self._idle_credit = 0.0
        """Seconds of engine time the IDLE lane has earned while it waited, less what its turns took."""
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        """When the engine is idle, how long the first request waits for others to share its prefill."""
        self.prefill_chunk = prefill_chunk
        """Most prompt positions one prefill pass computes before a decode step of the running rows (None: all)."""
        self._prefilling: list[_Prefill] = []
        self.model_name = inner.model_name
        self.context_length = inner.context_length
        self._waiting: deque[list[_Job]] = deque()
        """Groups of jobs (one ``generate`` call's requests, or one ``submit``), admitted together."""
        self._cond = threading.Condition()
        self._control: deque[tuple[Callable[[], None], Future[None]]] = deque()
        """Work the worker runs between two steps for another thread (adapter loads), with its caller's future."""
        self._threads_at_start: int | None = None
        """The worker's torch threads before :meth:`lend_cores` first changed them."""
        self._lending: _Lending | None = None
        """Cores lent to a training process now (:meth:`lend_cores`), else None; read and changed under ``_cond``."""
        self._unloading: set[str] = set()
        self._closed = False
        self.steps = 0
        """Decode steps run (one forward pass each)."""
        self.step_rows = 0
        """Rows summed over the decode steps: ``step_rows / steps`` is the mean batch a forward pass ran."""
        self.peak_rows = 0
        """The most rows one decode step ran: never above ``max_batch`` unless one request alone is larger."""
        self.prefills = 0
        """Prefills done (their rows joined the batch)."""
        self.prefills_started = 0
        """Prefills begun: one more than ``prefills`` while one is in progress (a long prompt, in chunks)."""
        self.prefill_passes = 0
        """Forward passes of prefills (more than ``prefills`` when long prompts were prefilled in chunks)."""
        self.admitted_rows = 0
        self.dropped_rows = 0
        """Rows dropped mid-decode because their caller went away or their deadline passed."""
        self.finished_rows = 0
        """Rows decoded to their end (a stop, an end-of-sequence token or ``max_new_tokens``)."""
        self.iterations = 0
        """Scheduler iterations with work to do (prefill passes and/or a decode step each)."""
        self.paced_passes = 0
        """Prefill passes held back: rows of a lower priority were running, or it was the IDLE lane's turn."""
        self.parked_steps = 0
        """Iterations in which :data:`~agent.backends.base.IDLE` rows waited (without a step) for others."""
        self.idle_turns = 0
        """Iterations the IDLE lane took from a busy engine, by its share (``idle_share``)."""
        self._worker = threading.Thread(target=self._run, name="s2agent-scheduler", daemon=True)
        self._worker.start()

    # --- the Backend protocol ----------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None,
                 deadline: float | None = None) -> list[list[Completion]]:
        """Run ``requests`` (admitted together, so they share a prefill); the first failure is raised and the
        other requests of the call are dropped. ``cancel``/``deadline``: see :class:`~agent.backends.stream.Handle`."""
        if not requests:
            return []
        handles = [Handle(r, cancel=cancel, deadline=deadline, stream=False) for r in requests]
        self._enqueue(handles)
        return results(handles)

    def submit(self, request: GenerationRequest, *, cancel: threading.Event | None = None,
               deadline: float | None = None) -> Handle:
        """Start ``request`` and return at once: its handle streams text deltas, gives the result, cancels."""
        handle = Handle(request, cancel=cancel, deadline=deadline, stream=True)
        self._enqueue([handle])
        return handle

    def count_tokens(self, prompt: Prompt) -> int:
        return self.inner.count_tokens(prompt)

    def load_adapter(self, name: str, path: str) -> None:
        """Load ``name`` on the worker, between two steps, and wait for it (one thread runs torch)."""

        def load() -> None:
            with self._cond:
                self._unloading.discard(name)  # loaded again before its rows finished: keep it
            self.inner.load_adapter(name, path)

        self._on_worker(load)

    def lend_cores(self, threads: int | None, pause: Callable[[bool], None] | None = None,
                   turns: TrainerTurns | None = None) -> None:
        """Lend a training process beside the engine the cores ``threads`` leaves: compute with ``threads``
        torch threads from the next step on (None: take them back, computing with as many as at the start).

        At a lower CPU priority alone, that process gets only what a busy server leaves (a training step 54 s
        instead of 2.3 s beside two clients). With ``pause`` and ``turns``, the process computes only when
        ``turns`` says so: ``pause(True)`` as soon as users' work reaches the engine, which then computes with
        every thread, and ``pause(False)`` when it has left (see :class:`~policies.yielding.TrainerTurns`);
        ``pause`` is called under the engine's lock and must return at once. Torch's thread count is the calling
        thread's OpenMP setting, so the worker, which runs every forward pass, sets it itself."""

        def apply() -> None:
            if self._threads_at_start is None:
                self._threads_at_start = torch.get_num_threads()
            with self._cond:
                before, self._lending = self._lending, _Lending(threads, pause, turns) if threads else None
                if before is not None and before.paused:
                    before.pause(False)  # a process is never left paused
            self._apply_threads()
            logger.info("serving computes with %d torch thread(s)%s", torch.get_num_threads(),
                        f" ({self._threads_at_start} while users' requests pause the training process)"
                        if self._lending and pause and turns else "")

        self._on_worker(apply)

    def _on_worker(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the worker between two steps and wait for it; its exception is raised here."""
        done: Future[None] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the backend is closed")
            self._control.append((work, done))
            self._cond.notify()
        done.result()

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` now; unload it once no running row uses it."""
        with self._cond:
            self._unloading.add(name)
            self._cond.notify()

    def close(self) -> None:
        """Finish what runs and waits, then stop the worker and the engine."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout=30)
        for _, done in self._control:  # only if the worker died: nobody waits forever
            done.set_exception(RuntimeError("the backend is closed"))
        self.inner.close()

    @property
    def waiting(self) -> int:
        """Requests submitted but not admitted yet."""
        with self._cond:
            return sum(len(group) for group in self._waiting)

    # --- the worker ------------------------------------------------------------------------------------------
    def _enqueue(self, handles: list[Handle]) -> None:
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise RuntimeError("the backend is closed")
            self._waiting.append([_Job(h, now) for h in handles])
            if any(_lane(h.request.priority) == 0 for h in handles):
                self._trainer_turn(users=True)  # now, not after the iteration in progress
            self._cond.notify()

    def _run(self) -> None:
        lanes: list[DecodeBatch | None] = [None, None]  # see _lane
        while True:
            self._run_control()
            groups = self._admit(lanes)
            if groups is None:
                return
            self._apply_threads()
            self.iterations += 1
            stepping: int | None = None
            started = time.perf_counter()
            try:
                with self.inner.lock, torch.inference_mode():
                    lanes = [self._drop_expired(batch) for batch in lanes]
                    if groups:
                        self._start_prefills([job for group in groups for job in group])
                    busy, turn = self._idle_turn(lanes)
                    lanes = self._advance_prefills(lanes, turn)
                    stepping = self._lane_to_step(lanes, turn)
                    if stepping is not None:
                        lanes[stepping] = self._step(lanes[stepping])
                    stepping = None
                    self._retire_adapters(lanes)
                self._pay_idle(busy, turn, time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows' callers, not the worker
                failing = [stepping] if stepping is not None else [0, 1]
                jobs = {row.owner for k in failing for row in (lanes[k].rows if lanes[k] else [])}
                logger.exception("decode step failed; failing the %d requests in it", len(jobs))
                for job in jobs:
                    job.handle.fail(exc)
                for k in failing:
                    lanes[k] = None
            self._after_iteration(lanes)

    def _idle_turn(self, lanes: list[DecodeBatch | None]) -> tuple[bool, bool]:
        """(whether IDLE work waits beside others' work, whether it takes this iteration by its share)."""
        busy = self._lane_busy(lanes, 1) and self._lane_busy(lanes, 0)
        return busy, busy and self.idle_share > 0 and self._idle_credit >= 0

    def _pay_idle(self, busy: bool, turn: bool, seconds: float) -> None:
        """The IDLE lane's credit after an iteration of ``seconds``: a turn pays its time; an iteration it
        waited through earns it ``idle_share / (1 - idle_share)`` of that time."""
        if turn:
            self.idle_turns += 1
            self._idle_credit -= seconds
        elif busy:
            self._idle_credit += seconds * self.idle_share / (1.0 - self.idle_share)

    def _lane_to_step(self, lanes: list[DecodeBatch | None], idle_turn: bool = False) -> int | None:
        """The lane whose rows take this iteration's decode step: IDLE rows only when no other row decodes or
        prefills, or on a turn of their own (``idle_turn``)."""
        if idle_turn:
            return 1 if _rows(lanes[1]) else None
        if _rows(lanes[0]):
            self.parked_steps += bool(_rows(lanes[1]))
            return 0
        if not _rows(lanes[1]):
            return None
        if any(prefill.lane == 0 for prefill in self._prefilling):
            self.parked_steps += 1
            return None
        return 1

    def _apply_threads(self) -> None:
        """On the worker: all the threads unless cores are lent to a process that computes now."""
        lending = self._lending
        threads = lending.threads if lending is not None and not lending.paused else self._threads_at_start
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def _trainer_turn(self, users: bool) -> None:
        """With ``_cond`` held: pause or resume the process the cores are lent to, as its turns say."""
        lending = self._lending
        if lending is None or lending.pause is None or lending.turns is None:
            return
        paused = not lending.turns.computes(users, time.monotonic())
        if paused != lending.paused:
            lending.paused = paused
            lending.pause(paused)

    def _after_iteration(self, lanes: list[DecodeBatch | None]) -> None:
        """Whether users' work is left, for the process the cores are lent to (the next iteration sets the
        threads it computes with)."""
        if self._lending is None:
            return
        users = self._lane_busy(lanes, 0)
        with self._cond:
            self._trainer_turn(users or any(_lane(job.priority) == 0 for group in self._waiting for job in group))

    def _lane_busy(self, lanes: list[DecodeBatch | None], lane: int) -> bool:
        """Whether rows of ``lane`` (see :func:`_lane`) decode or prefill."""
        return bool(_rows(lanes[lane])) or any(prefill.lane == lane for prefill in self._prefilling)

    def _run_control(self) -> None:
        """Run the work other threads handed over (:attr:`_control`), each failure going to its caller."""
        while True:
            with self._cond:
                if not self._control:
                    return
                work, done = self._control.popleft()
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - the caller raises it
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _admit(self, lanes: list[DecodeBatch | None]) -> list[list[_Job]] | None:
        """The groups to admit now, at most ``max_batch`` rows per lane (IDLE rows do not step with others);
        waits while nothing runs. None: closed and nothing left to do."""
        rows = [_rows(batch) for batch in lanes]
        for prefill in self._prefilling:
            rows[prefill.lane] += prefill.rows
        with self._cond:
            if sum(rows) == 0:
                while not self._waiting and not self._closed and not self._control:
                    self._cond.wait(timeout=0.5)
                    self._retire_idle()
                if self._control:
                    return []  # handed-over work first
                if not self._waiting:
                    self._retire_idle()
                    return None  # closed, nothing waits, nothing runs
                if self.max_wait:  # gather requests that arrive together, so they share one prefill
                    end = time.monotonic() + self.max_wait
                    while self._rows_waiting() < self.max_batch and (left := end - time.monotonic()) > 0:
                        self._cond.wait(timeout=left)
            taken: list[list[_Job]] = []
            now = time.monotonic()
            for group in sorted(self._waiting, key=lambda g: min(job.priority for job in g)):  # stable: then arrival
                size, lane = sum(job.rows for job in group), _lane(min(job.priority for job in group))
                if rows[lane] + size <= self.max_batch or rows[lane] == 0:
                    self._waiting.remove(group)
                    taken.append(group)
                    rows[lane] += size
                elif now - group[0].submitted > HEAD_OF_LINE_S:
                    break  # it has waited long enough: nothing passes it any more
            return taken

    def _rows_waiting(self) -> int:
        return sum(job.rows for group in self._waiting for job in group)

    def _drop_expired(self, batch: DecodeBatch | None) -> DecodeBatch | None:
        if batch is None or not batch.rows:
            return batch
        now = time.monotonic()
        gone = {row.owner for row in batch.rows if row.owner.handle.expired(now)}
        if not gone:
            return batch
        self.dropped_rows += sum(1 for row in batch.rows if row.owner in gone)
        for job in gone:
            job.handle.fail(job.handle.why_dropped())
        logger.info("dropped %d request(s) whose caller went away", len(gone))
        return self.inner.drop(batch, gone)

    def _start_prefills(self, jobs: list[_Job]) -> None:
        """Begin prefilling ``jobs`` (those still wanted, whose prompts are valid): one shared prefill per lane."""
        for lane in (0, 1):
            self._start_prefill([job for job in jobs if _lane(job.priority) == lane])

    def _start_prefill(self, jobs: list[_Job]) -> None:
        """Begin prefilling ``jobs`` (those still wanted, whose prompts are valid), as one shared prefill."""
        items = []
        for job in jobs:
            if job.handle.expired():
                job.handle.fail(job.handle.why_dropped())
                continue
            try:
                if job.handle.request.adapter in self._unloading:
                    raise AdapterError(f"adapter {job.handle.request.adapter!r} is being unloaded")
                items.append((job, job.handle.request, self.inner.prepare(job.handle.request)))
            except Exception as exc:  # noqa: BLE001 - a bad request fails only its caller
                job.handle.fail(exc)
        if items:
            self._prefilling.append(_Prefill(items, self.inner.prefill_steps(items, self.prefill_chunk)))
            self.prefills_started += 1

    def _advance_prefills(self, lanes: list[DecodeBatch | None], idle_turn: bool = False
                          ) -> list[DecodeBatch | None]:
        """One pass of each prefill in progress; the rows of those that finished join their lane's batch. A
        prefill whose callers all went away is dropped; one that fails is split into one prefill per request, so
        the request that made it fail fails alone. While rows of a lower priority run, a prefill of a higher one
        is paced (:data:`BACKGROUND_PREFILL_EVERY`), and an IDLE one waits; on the IDLE lane's turn
        (``idle_turn``) only its prefills advance."""
        lanes = list(lanes)
        running = [row.owner.priority for row in lanes[0].rows] if lanes[0] else []
        urgent = min(running + [prefill.priority for prefill in self._prefilling], default=0)
        paced_turn = self.iterations % BACKGROUND_PREFILL_EVERY == 0
        for prefill in list(self._prefilling):
            if all(job.handle.expired() for job, _, _ in prefill.items):
                self._prefilling.remove(prefill)
                for job, _, _ in prefill.items:
                    job.handle.fail(job.handle.why_dropped())
                self.dropped_rows += prefill.rows
                logger.info("dropped a prefill of %d request(s) whose callers went away", len(prefill.items))
                continue
            if _held(prefill, urgent, paced_turn, idle_turn):
                self.paced_passes += 1
                continue
            try:
                fresh = next(prefill.steps)
            except Exception as exc:  # noqa: BLE001 - isolate the request that made the shared prefill fail
                self._prefilling.remove(prefill)
                if len(prefill.items) == 1:
                    prefill.items[0][0].handle.fail(exc)
                else:
                    self._prefilling += [_Prefill([item], self.inner.prefill_steps([item], self.prefill_chunk))
                                         for item in prefill.items]
                continue
            self.prefill_passes += 1
            if fresh is None:
                continue
            self._prefilling.remove(prefill)
            self.prefills += 1
            for job, request, _ in prefill.items:
                job.completions = [None] * request.params.n
                job.left = request.params.n
                self.admitted_rows += request.params.n
            lanes[prefill.lane] = merge(lanes[prefill.lane], fresh)
        return lanes

    def _step(self, batch: DecodeBatch) -> DecodeBatch:
        stepped = list(batch.rows)
        self.steps += 1
        self.step_rows += len(stepped)
        self.peak_rows = max(self.peak_rows, len(stepped))
        batch, finished = self.inner.step(batch)
        done = set(map(id, finished))
        for row in stepped:
            job: _Job = row.owner
            final = id(row) in done
            if job.handle.stream:
                text = self.inner.text_so_far(row)
                piece, row.emitted = text_delta(text, row.emitted, row.params.stop, final)
                if piece or final:
                    job.handle.publish(Delta(row.sample, piece, len(row.token_ids),
                                             row.finish_reason if final else None))
            if final:
                self.finished_rows += 1
                job.completions[row.sample] = completion(row)
                job.left -= 1
                if job.left == 0:
                    job.handle.finish([c for c in job.completions if c is not None])
        return batch

    def _retire_adapters(self, lanes: list[DecodeBatch | None]) -> None:
        """Unload adapters marked for it that no running row uses any more."""
        with self._cond:
            if not self._unloading:
                return
            used = {row.adapter for batch in lanes if batch is not None for row in batch.rows}
            used |= {request.adapter for prefill in self._prefilling for _, request, _ in prefill.items}
            ready = [name for name in self._unloading if name not in used]
            for name in ready:
                self._unloading.discard(name)
        for name in ready:
            self.inner.unload_adapter(name)

    def _retire_idle(self) -> None:
        """Called with the condition held while nothing runs: every adapter waiting to unload can go."""
        for name in list(self._unloading):
            self._unloading.discard(name)
            self.inner.unload_adapter(name)
