"""The agent loop: System 1 answers, a router decides, System 2 teaches.

``Agent.answer(query)``:
1. System 1: one greedy pass of the base model + the serving LoRA adapter, with token log-probs;
2. routing: a confidence estimate of that pass against a threshold;
3. if uncertain, System 2: ``k`` sampled runs of a reasoning method (on the base model, so that an
   adapter's terse format never leaks into the reasoning), then a consistency filter;
4. the interaction is logged; an accepted System 2 answer joins the distillation buffer as a
   ``pending`` (input -> final answer) example, a rejected one is kept with its votes as ``rejected``;
5. the user gets the System 2 answer now; System 1 learns it at the next consolidation. With
   ``system2.mode = "background"`` the user gets System 1's answer at once instead, and System 2 labels
   the query later from a bounded queue (:mod:`agent.background`); the example is stored the same way.

The ``Agent`` is thread-safe: concurrent ``answer`` calls share forward passes through the backend's
batcher, and a newly promoted adapter is picked up between requests without a restart.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from agent.auth import LOCAL
from agent.backends import (
    BACKGROUND,
    IDLE,
    Backend,
    Completion,
    GenerationRequest,
    Prompt,
    SamplingParams,
    backend_for,
)
from agent.adapter_cache import local_folder
from agent.backends import stream
from agent.backends.stream import Delta
from agent.background import Deferred, Label, System2Queue
from agent.config import TEACHER_PREFIX, AgentConfig, split_method
from agent.consolidation import LOCK_NAME as CONSOLIDATION_LOCK
from agent.consolidation import ConsolidationReport, consolidate
from agent.data import general_prompts
from agent.errors import AdapterError, ConfigError, GenerationCancelled, InvalidQueryError, System2Timeout
from agent.models import resolve_model
from agent.prompting import Message, system1_messages
from agent.routing_memory import RoutingMemory
from agent.scheduler import ConsolidationScheduler
from agent.variations import solving_trace
from policies.answers import answers_match, normalise
from policies.routing import RouteDecision, TakeoverEvidence, logprob_confidence, make_router, sample_agreement
from policies.scoping import ScopeClassifier, ScopeDecision, ScopeIndex
from policies.system2 import Auto, UnknownMethodError, make_method
from policies.system2.base import Call, Sample, System2Method, System2Result
from store import Adapter, ConsolidationRun, Interaction, PurgeReport, Store, StoreError
from store.writer import InteractionWriter
from store.schema import MAX_TAG_LENGTH

if TYPE_CHECKING:
    from agent.backends.teacher import TeacherClient, TeacherLM

logger = logging.getLogger(__name__)

ROUTES = ("auto", "system1", "system2")
ADAPTER_POLL_SECONDS = 2.0
AUDIT_TRACE_CHARS = 2000
"""How much of each System 2 sample's text the interaction log keeps for audit."""
"""How often a running agent checks the store for a newly promoted or rolled-back adapter."""
ADAPTER_RETRY_SECONDS = 60.0
"""How often an adapter the registry says serves, but that failed to load here, is tried (and logged) again:
its files may be restored; retrying at every poll would log an error every two seconds."""


@dataclass
class Answer:
    """What the agent answered, how, and at what cost."""

    text: str
    route: str
    """``system1`` or ``system2``: who produced ``text``."""
    confidence: float | None
    """System 1's confidence estimate (the routing score)."""
    method: str | None
    """The System 2 method, when System 2 ran."""
    adapter_version: int | None
    """The LoRA adapter System 1 ran with (None: the base model)."""
    tokens: int
    """Tokens generated for this answer, System 1 and System 2 together."""
    latency_ms: float
    system1_text: str = ""
    prompt_tokens: int = 0
    tokens_system1: int = 0
    tokens_system2: int = 0
    system2_calls: int = 0
    votes: dict[str, int] | None = None
    agreement: float | None = None
    accepted: bool | None = None
    """Whether System 2's answer passed the consistency filter and joined the buffer."""
    route_reason: dict[str, Any] = field(default_factory=dict)
    tag: str | None = None
    """The task tag the answer was served under: the request's, or the one the scope classifier assigned."""
    finish_reason: str = "stop"
    interaction_id: int | None = None
    error: str | None = None
    """Why System 2 fell back to System 1, when it did."""
    teacher_prompt_tokens: int = 0
    """Prompt tokens the teacher (``[system2.teacher]``) read for this answer; 0 when it was not asked."""
    teacher_completion_tokens: int = 0
    """Tokens the teacher wrote for this answer (also counted in ``tokens_system2``)."""
    teacher_cost: float | None = None
    """What the teacher's tokens cost at the configured prices; None when unpriced or not asked."""
    system1: Completion | None = field(default=None, repr=False)
    """System 1's completion itself (its tokens and log-probs), whichever text was answered."""


class Agent:
    """The runtime, usable without a server: ``Agent(AgentConfig()).answer("...")``.

    An embedded agent consolidates only when asked: :meth:`consolidate` now, or :meth:`start_scheduler` for
    the configured triggers (``agent serve`` starts the scheduler itself unless ``--no-train``). With
    ``system2.mode = "background"`` it labels System 2's queries in worker threads; :meth:`close` stops
    them and the scheduler.
    """

    def __init__(self, config: AgentConfig | None = None, *, backend: Backend | None = None,
                 store: Store | None = None) -> None:
        self.config = (config or AgentConfig()).validate()  # a bad value fails here, before a model loads
        self.router = make_router(self.config.routing.router, self.config.routing.threshold)
        teacher = self.config.system2.teacher
        self.teacher: TeacherClient | None = None
        """The System 2 teacher (``[system2.teacher]``), or None; httpx is loaded only when there is one."""
        if teacher.base_url:
            from agent.backends.teacher import TeacherClient

            self.teacher = TeacherClient(teacher, seed=self.config.seed)
        self._methods: dict[tuple[str, str | None], System2Method] = {}
        for name in {self.config.system2.method, *self.config.system2.methods_by_tag.values(),
                     *([self.config.system2.fallback] if self.config.system2.fallback else [])}:
            self._method(name, None)  # a method that cannot be built is a start-up error, not a runtime surprise
        # The agent writes for as long as it runs (a server, a consolidation): check the file's pages first.
        self.store = store or Store(self.config.db_url(), verify=True)
        self.model_path = resolve_model(self.config.model, self.config.cache_dir)
        """The base model's folder: consolidation trains on it."""
        if backend is None:
            backend = backend_for(self.config, self.model_path)
        self.backend = backend
        self._serving: dict[str | None, tuple[int, str]] = {}
        """What this process serves per scope: (version, backend name); the registry may say otherwise."""
        self._takeover = TakeoverEvidence(self.config.routing.threshold, self.config.routing.takeover_precision)
        """How sure each served adapter must be to answer alone (``routing.takeover_precision``): from its gate's
        held-out answers, then from every answer of it System 2 checked here."""
        self._takeover_lock = threading.Lock()
        self._load_errors: dict[str | None, tuple[int, str, float]] = {}
        """Scopes whose registry-serving adapter did not load here: (version, why, when last tried)."""
        self._retiring: list[tuple[float, str]] = []
        self._adapter_lock = threading.Lock()
        self._last_poll = 0.0
        self._scopes: ScopeClassifier | None = None
        self._scope_index: ScopeIndex | None = None
        self._scope_lock = threading.Lock()
        self.scheduler: ConsolidationScheduler | None = None
        self._closing = threading.Event()
        self._follower: threading.Thread | None = None
        self._writer: InteractionWriter | None = None
        self.routing_memory = RoutingMemory(self.config.routing, self.store, self.config.seed)
        """Where System 2 has paid off before (``routing.memory``): skips it for inputs like its failures."""
        self._system2_queue = System2Queue(self.config.system2.queue_size, self.config.system2.workers,
                                           self._label_deferred, self._label_order)  # threads start on first use
        self.refresh_adapters(force=True)

    # --- public API ------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.backend.model_name

    def serving_version(self, tag: str | None = None) -> int | None:
        return self.adapter_for(tag)[0]

    def answer(
        self,
        query: str,
        *,
        route: str = "auto",
        method: str | None = None,
        tag: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        top_logprobs: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Sequence[tuple[int, float]] = (),
        source: str = LOCAL,
        teach: bool = True,
        adapter_version: int | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer:
        """Answer one query through the loop; see the module docstring.

        ``source`` names who asked (an API key's name; ``local`` for in-process calls, never a secret): it is
        recorded with the interaction and the example, for per-source caps and ``agent store purge``.
        ``teach=False`` (a key without the ``teach`` right): the query is answered as usual, System 2
        included when the router sends it there, but no example is stored from it, it joins no automatic
        scope, and in background mode it is not queued for a label (that label would only be training data).

        ``top_logprobs``, the penalties and ``logit_bias`` shape System 1's pass (see
        :class:`~agent.backends.SamplingParams`); ``Answer.system1`` has its tokens and log-probs.
        ``adapter_version``: run System 1 with that served adapter instead of the one serving the tag (a client
        naming an adapter model); ``InvalidQueryError`` when this process does not serve it.

        Streaming: ``on_text`` receives the answer's text in pieces whose concatenation is ``Answer.text``,
        called from this thread before ``answer`` returns. The pieces arrive as tokens are decoded when the
        answer is System 1's whatever the router says (:meth:`streams_live`); otherwise the answer may still be
        replaced by System 2's vote, so the whole text comes in one piece once it is final. ``cancel``: set it
        (a client hung up) and the generation is dropped at its next decode step, System 2's too;
        :class:`~agent.errors.GenerationCancelled` is raised and nothing is recorded."""
        started = time.perf_counter()
        if not isinstance(query, str) or not query.strip():
            raise InvalidQueryError("query is empty")
        if route not in ROUTES:
            raise InvalidQueryError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
        if tag is not None and len(tag) > MAX_TAG_LENGTH:  # refused before any generation, not by the store after it
            raise InvalidQueryError(f"tag is {len(tag)} characters long; the most is {MAX_TAG_LENGTH}")
        self.refresh_adapters()
        scope = self._classify(query) if tag is None else None
        tag = scope.tag if scope else tag
        version, adapter = self._adapter(tag, adapter_version)
        s1_params = SamplingParams(
            n=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            stop=tuple(stop), seed=seed if seed is not None else self.config.seed, top_logprobs=top_logprobs,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=tuple(logit_bias),
        )
        messages = system1_messages(query)
        requests = [GenerationRequest(messages, s1_params, adapter)]
        routing = self.config.routing
        use_agreement = route == "auto" and routing.estimator == "agreement" and routing.router == "threshold"
        if use_agreement:
            sampled = SamplingParams(n=routing.agreement_samples, temperature=0.7, top_k=40,
                                     max_new_tokens=s1_params.max_new_tokens, seed=self.config.seed)
            requests.append(GenerationRequest(messages, sampled, adapter))
        live = on_text is not None and self.streams_live(route)
        if live:
            assert on_text is not None
            results = self._stream_first(requests, on_text, cancel)
        else:
            results = stream.generate(self.backend, requests, cancel=cancel)
        s1: Completion = results[0][0]
        tokens_s1 = s1.num_tokens + (sum(c.num_tokens for c in results[1]) if use_agreement else 0)
        kind = self.answer_kind(tag)
        if use_agreement:
            score = sample_agreement(normalise(s1.text, kind), [normalise(c.text, kind) for c in results[1]], kind)
            estimator = "agreement"
        else:
            score = logprob_confidence(s1.logprobs, routing.quantile)
            estimator = "logprob"
        decision = self._route(route, score, estimator, version)
        answer = Answer(
            text=s1.text, route="system1", confidence=score, method=None, adapter_version=version,
            tokens=tokens_s1, latency_ms=0.0, system1_text=s1.text, prompt_tokens=s1.prompt_tokens,
            tokens_system1=tokens_s1, route_reason={"estimator": decision.estimator, "score": decision.score,
                                                    "threshold": decision.threshold, "requested": route},
            finish_reason=s1.finish_reason, tag=tag, system1=s1,
        )
        if scope:
            answer.route_reason["scope"] = {"tag": scope.tag, "similarity": round(scope.similarity, 3),
                                            "general_similarity": round(scope.general_similarity, 3)}
        if not teach:
            answer.route_reason["teach"] = False
        deferred = None
        verdict = self.routing_memory.judge(query, self._method_name(method, tag)) if (
            decision.route == "system2" and route == "auto") else None
        if verdict is not None and (verdict.skip or verdict.explored):
            answer.route_reason["memory"] = verdict.as_dict()
        if verdict is not None and verdict.skip:
            answer.route_reason["system2"] = "skipped"  # System 2 never paid off for inputs like this one
        elif decision.route == "system2":
            if route == "auto" and self.config.system2.mode == "background":
                if teach:
                    deferred = self._defer_system2(answer, query, method, tag, source,
                                                   explore=verdict is not None and verdict.explored)
                else:
                    answer.route_reason["system2"] = "not queued: the source may not teach"
            else:
                self._run_system2(answer, query, method, tag, cancel, teach=teach)
                if teach:
                    self._checked_by_system2(answer, s1.text, tag)
                # a source that may not teach does not shape the scopes either: its input joins no index
                if tag is None and answer.accepted and self.config.scoping.auto and teach:
                    tag = answer.tag = self._assign_scope(answer, query)
        if on_text is not None and not live and answer.text:
            on_text(answer.text)  # final now: System 2's vote is in, or the router kept System 1's answer
        answer.latency_ms = (time.perf_counter() - started) * 1000
        try:
            self._record(answer, query, tag, source, teach)
        finally:
            if deferred is not None:
                deferred.logged(answer.interaction_id)
        return answer

    def complete(self, prompt: Prompt, params: SamplingParams, tag: str | None = None, *,
                 adapter_version: int | None = None, on_delta: Callable[[Delta], None] | None = None,
                 cancel: threading.Event | None = None) -> tuple[list[Completion], int | None]:
        """Plain System 1 completions (any chat or raw prompt, ``n`` samples): no routing, nothing learned.

        ``on_delta`` receives each sample's text as it is decoded (:class:`~agent.backends.stream.Delta`, the
        last of a sample with its ``finish_reason``); ``cancel`` and ``adapter_version`` as for :meth:`answer`."""
        self.refresh_adapters()
        version, adapter = self._adapter(tag, adapter_version)
        request = GenerationRequest(prompt, params, adapter)
        if on_delta is None:
            return stream.generate(self.backend, [request], cancel=cancel)[0], version
        handle = stream.submit(self.backend, request, cancel=cancel)
        try:
            for delta in handle.deltas():
                on_delta(delta)
            return handle.result(), version
        except BaseException:
            handle.cancel()
            raise

    def streams_live(self, route: str) -> bool:
        """Whether an answer on ``route`` is System 1's whatever the router decides, so that its tokens can
        be sent as they are decoded: ``system1``, or ``auto`` when System 2 never replaces the answer inline
        (``system2.mode = "background"``, or the ``never`` router)."""
        if route == "system1":
            return True
        return route == "auto" and (self.config.system2.mode == "background" or self.config.routing.router == "never")

    def _stream_first(self, requests: list[GenerationRequest], on_text: Callable[[str], None],
                      cancel: threading.Event | None) -> list[list[Completion]]:
        """Run ``requests``, passing the first one's text to ``on_text`` as it is decoded."""
        handles = [stream.submit(self.backend, r, cancel=cancel) for r in requests]
        try:
            for delta in handles[0].deltas():
                if delta.text:
                    on_text(delta.text)
            return [h.result() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise

    def _adapter(self, tag: str | None, version: int | None) -> tuple[int | None, str | None]:
        """The adapter serving ``tag``, or the served adapter ``version`` when one is named."""
        if version is None:
            return self.adapter_for(tag)
        for slot in list(self._serving.values()):
            if slot[0] == version:
                return slot
        raise InvalidQueryError(f"adapter version {version} is not served here; GET /v1/models lists what is")

    def system1_batch(self, inputs: Sequence[str], tag: str | None = None, *, adapter: str | None = None,
                      max_new_tokens: int | None = None, batch: int = 16) -> list[Completion]:
        """System 1 alone, greedy, on many inputs: what evaluation, retention and benchmarks measure.

        Each input gets the System 1 prompt and the adapter serving ``tag`` (or ``adapter``: the name of
        a loaded adapter to run instead, such as a candidate being gated). Nothing is routed or logged;
        inputs are sent ``batch`` at a time so they share forward passes, at background priority (a user's
        System 1 answer goes first)."""
        self.refresh_adapters()
        name = adapter if adapter is not None else self.adapter_for(tag)[1]
        params = SamplingParams(max_new_tokens=max_new_tokens or self.config.max_new_tokens)
        out: list[Completion] = []
        for start in range(0, len(inputs), batch):
            chunk = inputs[start:start + batch]
            results = self.backend.generate([GenerationRequest(system1_messages(q), params, name, BACKGROUND)
                                             for q in chunk])
            out.extend(r[0] for r in results)
        return out

    def learnable_query(self, messages: Sequence[Message], n: int = 1) -> str | None:
        """The query to send through the learning loop when a chat is one, else None.

        A chat is learnable when it is a single user turn (optionally after a system message equal to
        this agent's own ``system_prompt``) asking for one answer: that is exactly the prompt System 1
        serves and trains on. Several turns, an assistant message, ``n > 1`` or a caller's own system
        prompt are answered by :meth:`complete` instead: dropping the caller's instruction silently
        would answer, and learn, a different question."""
        if n != 1 or not messages or messages[-1]["role"] != "user":
            return None
        if len(messages) == 1:
            return messages[0]["content"]
        first = messages[0]
        own_system = (len(messages) == 2 and first["role"] in ("system", "developer")
                      and self.config.system_prompt is not None and first["content"] == self.config.system_prompt)
        return messages[-1]["content"] if own_system else None

    def consolidate(
        self,
        *,
        scope: str | None = None,
        dry_run: bool = False,
        min_examples: int | None = None,
        epochs: int | None = None,
        progress: bool = False,
        on_step: Callable[[int, int, float], None] | None = None,
        stop: threading.Event | None = None,
    ) -> ConsolidationReport:
        """Run one consolidation now (see :mod:`agent.consolidation`) and serve its adapter if promoted.

        ``scope``: a task tag (its scoped adapter), or None (the general one); ``dry_run``: only list
        what would be trained on; ``min_examples``/``epochs`` override the config for this run;
        ``progress``: a progress bar on stderr; ``on_step(step, total, loss)``: called after each
        training step; ``stop``: set it to stop the run at the next step, changing nothing."""
        report = consolidate(self, scope=scope, dry_run=dry_run, min_examples=min_examples, epochs=epochs,
                             progress=progress, on_step=on_step, stop=stop)
        self.refresh_adapters(force=True)
        return report

    def rollback(self, version: int | None = None, scope: str | None = None) -> Adapter | None:
        """Serve an earlier adapter of ``scope`` again (None: the serving one's parent; 0: the base model)
        and switch to it now; other processes on the same store follow within seconds. Returns the row
        now serving, or None for the base model.

        Load-then-commit: the target's weights are loaded into the backend before the registry changes, so
        a version whose files are damaged is refused (:class:`AdapterError`) and nothing changes; with no
        version, an ancestor that fails to load is skipped for the next one."""
        if version == 0:
            row = self.store.rollback(0, scope=scope)
        else:
            target = self._load_first(self.store.rollback_targets(version, scope=scope), "roll back to", scope)
            row = self._commit_loaded(target, lambda: self.store.rollback(target.version, scope=scope))
        self.refresh_adapters(force=True)
        return row

    def promote(self, version: int) -> Adapter:
        """Serve adapter ``version`` in its scope now (load-then-commit, as :meth:`rollback`): a version whose
        weights do not load is refused with :class:`AdapterError` and the registry is left as it was."""
        row = self.store.get_adapter(version)
        if row is None:
            raise StoreError(f"cannot promote adapter v{version}: no such version")
        target = self._load_first([row], "promote", row.scope)
        self._commit_loaded(target, lambda: self.store.promote_adapter(version))
        self.refresh_adapters(force=True)
        return self.store.get_adapter(version) or row

    def _load_first(self, rows: list[Adapter], action: str, scope: str | None) -> Adapter:
        """The first of ``rows`` whose weights load into the backend; AdapterError naming each failure if none."""
        failures = []
        for row in rows:
            try:
                self.backend.load_adapter(f"v{row.version}", local_folder(self.store, row, self.config.adapters_path()))
                return row
            except Exception as exc:  # noqa: BLE001 - any failure to load means "cannot serve"
                logger.warning("cannot %s adapter v%s: its weights do not load: %s", action, row.version, exc)
                failures.append(f"v{row.version}: {exc}")
        serving = self.serving_version(scope)
        keeps = f"v{serving}" if serving else "the base model"
        raise AdapterError(f"cannot {action} adapter {'v' + str(rows[0].version) if len(rows) == 1 else 'any ancestor'}"
                           f": its weights do not load ({'; '.join(failures)}); nothing changed, {keeps} keeps serving")

    def _commit_loaded(self, row: Adapter, commit: Callable[[], Any]) -> Any:
        """Run the registry change ``commit`` for a loaded ``row``; if it fails, let the loaded copy retire."""
        try:
            return commit()
        except BaseException:
            with self._adapter_lock:
                name = f"v{row.version}"
                if name not in {n for _, n in self._serving.values()}:
                    self._retiring.append((time.monotonic(), name))
            raise

    def adapters(self) -> list[Adapter]:
        """Every adapter version in the registry, oldest first."""
        return self.store.list_adapters()

    def serving_adapters(self) -> dict[str | None, int]:
        """What this process serves now, per scope (None: general): the versions actually loaded, which
        differ from the registry's ``serving`` rows while one of those fails to load (:meth:`adapter_failures`)."""
        return {scope: version for scope, (version, _) in dict(self._serving).items()}  # a copy: no lock needed

    def takeover(self) -> dict[str | None, dict[str, Any]]:
        """Per scope this process serves an adapter for: ``version``, ``threshold`` (the confidence its answers
        need to stand without System 2; None: ``routing.threshold``) and ``records`` (the answers of it checked
        against System 2 that the threshold rests on, its gate's included)."""
        with self._takeover_lock:
            return {scope: {"version": version, "threshold": self._takeover.threshold(version),
                            "records": self._takeover.records(version)}
                    for scope, version in self.serving_adapters().items()}

    def adapter_failures(self) -> list[dict[str, Any]]:
        """Adapters the registry says serve but this process could not load: ``scope``, ``version``, ``error``
        and ``serving_version`` (what answers that scope instead; None: the base model)."""
        serving, errors = dict(self._serving), dict(self._load_errors)  # copies: refresh may change them meanwhile
        return [{"scope": scope, "version": version, "error": error,
                 "serving_version": serving[scope][0] if scope in serving else None}
                for scope, (version, error, _) in sorted(errors.items(), key=lambda i: i[0] or "")]

    def purge_source(self, source: str, dry_run: bool = False) -> PurgeReport:
        """Delete every example ``source`` taught and flag the adapters that learned from them
        ``needs_retrain`` (see ``store.sources``); serving does not change: roll back or consolidate."""
        return self.store.purge_source(source, dry_run=dry_run)

    def stats(self) -> dict[str, Any]:
        """The store's counts: examples by status and method, interactions by route, tokens spent."""
        if self._writer is not None:
            self._writer.flush(timeout=5.0)
        return self.store.stats()

    def runs(self, limit: int | None = 20) -> list[ConsolidationRun]:
        """Consolidation runs, newest first; every run ever started when ``limit`` is None."""
        return self.store.list_runs(limit=limit)

    def pending_examples(self) -> int:
        """Examples waiting for the next consolidation (also a cheap check that the store answers)."""
        return self.store.count_examples(status="pending")

    def running_consolidation(self) -> dict[str, Any] | None:
        """The consolidation running now on this store, in any process (a scheduler's child included): the
        holder of the store's consolidation lock, as ``{"pid", "host", "since"}``; None when none runs."""
        holder = self.store.lock_holder(CONSOLIDATION_LOCK)
        if holder is None:
            return None
        return {"pid": holder.pid, "host": holder.host, "since": holder.acquired_at}

    def start_scheduler(self) -> ConsolidationScheduler:
        """Consolidate in the background as ``config.scheduler`` says (pending count per scope and/or
        interval; in a child process unless ``scheduler.process = "thread"``). Not started by the
        constructor: an embedded agent consolidates only when asked to."""
        scheduler = self.consolidation_runner()
        if not scheduler.started:
            scheduler.start()
        return scheduler

    def consolidation_runner(self) -> ConsolidationScheduler:
        """What runs a consolidation the way the scheduler does (in a niced child process unless
        ``scheduler.process = "thread"``), with one run at a time: the scheduler, started or not (its
        triggers run only once :meth:`start_scheduler` was called). ``POST /admin/consolidate`` runs here."""
        if self.scheduler is None:
            self.scheduler = ConsolidationScheduler(self)
        return self.scheduler

    def start_write_behind(self, max_queued: int = 10_000) -> InteractionWriter:
        """Log plain System 1 answers through a bounded queue committed in batches by one thread
        (:mod:`store.writer`), instead of one transaction per answer; ``agent serve`` does (``server.write_behind``).
        A crash loses at most the rows still queued (~50 ms of System 1 logs), never an example; :meth:`close`
        flushes the queue. Reads through this façade (:meth:`stats`) flush it first."""
        if self._writer is None:
            self._writer = InteractionWriter(self.store, max_queued=max_queued)
        return self._writer

    def follow_promotions(self, interval_s: float = ADAPTER_POLL_SECONDS) -> None:
        """Check the registry every ``interval_s`` in a thread and serve what it says, traffic or not.

        Without it a promotion or rollback made by another process is picked up by the next request (which
        then waits for the load); ``agent serve`` follows, so an idle replica is current when traffic comes."""
        if self._follower is not None:
            return

        def follow() -> None:
            while not self._closing.wait(interval_s):
                try:
                    self.refresh_adapters()
                except Exception:  # noqa: BLE001 - the store may be away for a while; keep following
                    logger.exception("checking the adapter registry failed; trying again in %.0f s", interval_s)

        self._follower = threading.Thread(target=follow, name="s2agent-follow-promotions", daemon=True)
        self._follower.start()

    def close(self) -> None:
        """Stop the scheduler (a running consolidation stops at its next training step), the thread following
        promotions and the background System 2 workers (queries still waiting are dropped; a label in
        progress stops at its next call), then release the backend and the store."""
        self._closing.set()
        if self._follower is not None:
            self._follower.join()
        if self.scheduler is not None:
            self.scheduler.shutdown()
            self.scheduler = None
        self._system2_queue.close()
        if self.teacher is not None:
            self.teacher.close()
        if self._writer is not None:
            self._writer.close()
        self.backend.close()
        self.store.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- adapters --------------------------------------------------------------------------
    def refresh_adapters(self, force: bool = False) -> None:
        """Serve whatever the store says is serving now (promotion, rollback, from any process).

        A new adapter is loaded next to the old one and the pointer is swapped: requests in flight
        keep the adapter they started with; the old one is unloaded a minute later. One that does not
        load is never silent: an ERROR line, :meth:`adapter_failures` (``/readyz``, ``/v1/models``,
        ``/metrics``), the previous adapter (or the base model) serving meanwhile, and a new try every
        ``ADAPTER_RETRY_SECONDS`` or on ``force``.
        """
        now = time.monotonic()
        if not force and now - self._last_poll < ADAPTER_POLL_SECONDS:
            return
        with self._adapter_lock:
            self._last_poll = now
            before = dict(self._serving)
            wanted = {a.scope: a for a in self.store.list_adapters() if a.serving}
            for scope in list(self._load_errors):
                if scope not in wanted:
                    del self._load_errors[scope]
            for scope in list(self._serving):
                if scope not in wanted:
                    self._retiring.append((now, self._serving.pop(scope)[1]))
                    logger.info("no adapter serves scope %s any more: base model", scope or "general")
            for scope, row in wanted.items():
                current = self._serving.get(scope)
                if current and current[0] == row.version:
                    self._load_errors.pop(scope, None)
                    continue
                failed = self._load_errors.get(scope)
                if failed and failed[0] == row.version and not force and now - failed[2] < ADAPTER_RETRY_SECONDS:
                    continue
                name = f"v{row.version}"
                try:
                    self.backend.load_adapter(name, local_folder(self.store, row, self.config.adapters_path()))
                except Exception as exc:  # noqa: BLE001 - a bad adapter must never stop serving
                    instead = f"v{current[0]}" if current else (
                        f"the general adapter v{self._serving[None][0]}" if scope and None in self._serving
                        else "the base model")
                    logger.error("the registry says adapter v%s serves the %s scope, but it does not load here (%s); "
                                 "serving %s instead: restore its files or roll back (agent adapters rollback)",
                                 row.version, scope or "general", exc, instead)
                    self._load_errors[scope] = (row.version, str(exc), now)
                    continue
                self._load_errors.pop(scope, None)
                self._serving[scope] = (row.version, name)
                if isinstance(records := row.metrics.get("routing_records"), list):
                    with self._takeover_lock:
                        self._takeover.start(row.version, records)
                if current:
                    self._retiring.append((now, current[1]))
                logger.info("now serving adapter v%s for scope %s", row.version, scope or "general")
            serving_names = {name for _, name in self._serving.values()}
            keep = []
            for since, name in self._retiring:
                if name in serving_names:
                    continue
                if now - since > 60:
                    self.backend.unload_adapter(name)
                else:
                    keep.append((since, name))
            self._retiring = keep
            if force or self._serving != before:
                self._fit_scopes()
                with self._scope_lock:  # scopes may have been renamed or merged: regroup from the store
                    self._scope_index = None

    def _fit_scopes(self) -> None:
        """Refit the scope classifier on the inputs of the tags that have a serving adapter now.

        Every stored input of a tag counts, whatever its label's fate (pending, used, held out or
        rejected): the question is only what that tag's inputs look like."""
        cfg = self.config.scoping
        tags = sorted(scope for scope in self._serving if scope)
        if not cfg.classifier or not tags:
            self._scopes = None
            return
        limit = cfg.inputs_per_tag
        scoped = {tag: [e.input for e in self.store.sample_examples(None, limit, tag=tag)] for tag in tags}
        history = self.confident_history(limit)
        general = general_prompts() + [i.input for i in history if i.tag is None]
        self._scopes = ScopeClassifier(scoped, general, cfg.min_similarity)
        logger.info("scope classifier fitted: %s against %d untagged inputs",
                    ", ".join(f"{t} ({len(v)})" for t, v in scoped.items()), len(general))

    def _assign_scope(self, answer: Answer, query: str) -> str:
        """The automatic scope of an accepted, untagged System 2 example (see ``policies.scoping.ScopeIndex``):
        the scope of the most similar stored input, or of an input whose solution had the same shape (another
        phrasing of the same task), or a new one named after this input. Solutions are those of this process's
        examples since the index was last rebuilt (after a promotion: the phrasings are in the scopes by then)."""
        with self._scope_lock:
            if self._scope_index is None:
                limit = self.config.scoping.inputs_per_tag
                scoped = {tag: [e.input for e in self.store.sample_examples(None, limit, tag=tag)]
                          for tag in self.store.example_tags() if tag is not None}
                self._scope_index = ScopeIndex(scoped, self.config.scoping.auto_min_similarity)
            tag, similarity = self._scope_index.assign(query, _solution(answer))
        answer.route_reason["scope"] = {"tag": tag, "similarity": round(similarity, 3), "assigned": "auto"}
        return tag

    def _classify(self, query: str) -> ScopeDecision | None:
        return self._scopes.classify(query) if self._scopes else None

    def confident_history(self, limit: int, seed: int = 0) -> list[Interaction]:
        """What System 1 already does well: its confident answers, spread over the store's history.

        Confident means at or above the routing threshold, and never below 0.5 even when the threshold is
        set lower: retention data and the scope classifier's general side both read this."""
        return self.store.sample_confident_interactions(max(self.config.routing.threshold, 0.5), limit, seed=seed)

    def adapter_for(self, tag: str | None) -> tuple[int | None, str | None]:
        """The adapter serving ``tag``: its scoped adapter, else the general one; (version, backend name)."""
        slot = (self._serving.get(tag) if tag else None) or self._serving.get(None)
        return slot if slot else (None, None)

    # --- System 2 --------------------------------------------------------------------------
    def _checked_by_system2(self, answer: Answer, system1_text: str, tag: str | None) -> None:
        """System 2 accepted an answer to an input the adapter ``answer.adapter_version`` served: one more record
        of whether that adapter's own answer was right (:class:`~policies.routing.TakeoverEvidence`). Only for
        sources that may teach (the caller checks)."""
        if not answer.accepted or answer.adapter_version is None or answer.confidence is None or (
                self.config.routing.estimator != "logprob"):
            return
        kind = self.answer_kind(tag)
        right = answers_match(normalise(system1_text, kind), normalise(answer.text, kind), kind)
        with self._takeover_lock:
            self._takeover.add(answer.adapter_version, answer.confidence, right)

    def _route(self, route: str, score: float, estimator: str, version: int | None) -> RouteDecision:
        if route == "auto":
            with self._takeover_lock:
                threshold = self._takeover.threshold(version) if estimator == "logprob" else None
            decision = self.router.route(score, adapter_threshold=threshold)
            decision.estimator = estimator
            return decision
        return RouteDecision(route=route, estimator="forced", score=score, threshold=None)

    def _method(self, name: str, tag: str | None) -> System2Method:
        """The method called ``name`` (methods hold no model: ``teacher:cot`` is the same object as ``cot``,
        run on another LM). ``teacher:auto`` falls back to ``cot`` when ``system2.fallback`` is unset: the
        prompted methods that are useless on a small local model are what a strong teacher is good at."""
        on_teacher, name = split_method(name)
        if on_teacher and self.teacher is None:
            raise ConfigError(f"System 2 method 'teacher:{name}' needs a teacher: set [system2.teacher] base_url")
        key = (TEACHER_PREFIX + name if on_teacher and name == "auto" else name, tag)
        if name == "auto" and key not in self._methods:
            fallback = self.config.system2.fallback
            if fallback is not None and split_method(fallback)[1] == "auto":
                raise ConfigError("system2.fallback cannot be 'auto' itself; name a prompted method such as 'cot'")
            if fallback is not None:
                self._method(fallback, None)  # a teacher fallback without a teacher fails here
            second = split_method(fallback)[1] if fallback else ("cot" if on_teacher else None)
            self._methods[key] = Auto(self._method("pal", tag), self._method(second, tag) if second else None)
        if key not in self._methods:
            cfg = self.config.system2
            kwargs: dict[str, Any] = {"prompts": cfg.prompts.get(name), "temperature": cfg.temperature,
                                      "top_k": cfg.top_k}
            if cfg.max_new_tokens:
                kwargs["max_new_tokens"] = cfg.max_new_tokens
            if name == "pal":
                from agent.sandbox import run_programs
                from policies.system2.prompts import PAL_FAMILIES

                kwargs["executor"] = run_programs
                kwargs["family"] = tag if tag in PAL_FAMILIES else None
            try:
                self._methods[key] = make_method(name, **kwargs)
            except UnknownMethodError as exc:
                raise ConfigError(str(exc)) from None
        return self._methods[key]

    def answer_kind(self, tag: str | None) -> str:
        """How answers for ``tag`` are compared (``kinds_by_tag``, else ``answer_kind``)."""
        return self.config.answer_kind_for(tag)

    def _method_name(self, method: str | None, tag: str | None) -> str:
        """The System 2 method a query runs: the request's, its tag's (``methods_by_tag``), else the default."""
        cfg = self.config.system2
        return method or cfg.methods_by_tag.get(tag or "") or cfg.method

    def _run_system2(self, answer: Answer, query: str, method_name: str | None, tag: str | None,
                     cancel: threading.Event | None = None, *, teach: bool = True) -> None:
        """System 2 on ``query`` into ``answer``; its outcome is remembered (:attr:`routing_memory`) when the
        source may teach."""
        name = answer.method = answer.route_reason["asked"] = self._method_name(method_name, tag)
        try:
            result = self.system2(query, method=name, tag=tag, cancel=cancel)
        except (ConfigError, InvalidQueryError, GenerationCancelled):
            raise
        except Exception as exc:  # noqa: BLE001 - System 2 failing must never fail the request
            logger.warning("System 2 (%s) failed, answering with System 1: %s", name, exc)
            answer.error = f"{type(exc).__name__}: {exc}"
        else:
            self._apply_system2(answer, result)
        if teach:
            self.routing_memory.record(query, name, bool(answer.accepted))

    def system2(self, query: str, *, method: str | None = None, tag: str | None = None, k: int | None = None,
                threshold: float | None = None, cancel: threading.Event | None = None,
                priority: int = BACKGROUND) -> System2Result:
        """Run System 2 alone on ``query``: ``k`` samples and the consistency decision; nothing is logged.

        Useful to label data offline; ``answer`` uses it for the queries it routes to System 2. ``priority``: the
        local engine's for its samples (:data:`agent.backends.IDLE`: only while serving has nothing else to do,
        as background labels run).
        """
        cfg = self.config.system2
        name = self._method_name(method, tag)
        solver = self._method(name, tag)  # an unknown name, or a teacher method without a teacher: ConfigError
        on_teacher, base = split_method(name)
        deadline = time.monotonic() + cfg.timeout_s
        lm = self._lm(deadline, cancel, priority)
        options = {"k": k or cfg.samples, "threshold": cfg.agreement_threshold if threshold is None else threshold}
        teacher_fallback = (base == "auto" and not on_teacher and self.teacher is not None
                            and (cfg.teacher.auto or (cfg.fallback or "").startswith(TEACHER_PREFIX)))
        if (on_teacher or teacher_fallback) and cfg.teacher.withholds(tag):
            assert self.teacher is not None
            self.teacher.count(withheld=1)  # the privacy switch: the same method, on the local model
            result = self._method(base, tag).solve(query, lm, **options)
            return replace(result, extra={**result.extra, "teacher": "withheld"})
        if on_teacher:
            assert self.teacher is not None
            teacher_lm = self.teacher.lm(deadline)
            result = solver.solve(query, teacher_lm, **options)
            return self._taught(result, teacher_lm, TEACHER_PREFIX + result.method)
        if teacher_fallback:
            assert self.teacher is not None
            auto = self._method(TEACHER_PREFIX + "auto", tag)
            assert isinstance(auto, Auto)
            teacher_lm = self.teacher.lm(deadline)
            result = auto.solve(query, lm, fallback_lm=teacher_lm, **options)
            by_teacher = result.extra.get("answered_by") == "fallback"
            return self._taught(result, teacher_lm, TEACHER_PREFIX + result.method if by_teacher else result.method)
        return solver.solve(query, lm, **options)

    def _taught(self, result: System2Result, teacher_lm: TeacherLM, method: str) -> System2Result:
        """``result`` named after the model that answered, with what the teacher was paid for it."""
        usage = teacher_lm.usage.as_dict()
        usage["cost"] = self.config.system2.teacher.cost(usage["prompt_tokens"], usage["completion_tokens"])
        return replace(result, method=method, extra={**result.extra, "teacher": usage})

    def teacher_stats(self) -> dict[str, Any] | None:
        """The teacher's counters since start (see ``TeacherClient.stats``), or None without a teacher."""
        return self.teacher.stats() if self.teacher is not None else None

    def _apply_system2(self, answer: Answer, result: System2Result) -> None:
        decision = result.decision
        answer.method = result.method  # with ``auto``: the method whose answer this is
        if "tried" in result.extra:
            answer.route_reason["system2_tried"] = result.extra["tried"]
        answer.tokens_system2 = result.tokens
        teacher = result.extra.get("teacher")
        if teacher is not None:
            answer.route_reason["teacher"] = teacher
        if isinstance(teacher, dict):
            answer.teacher_prompt_tokens = teacher["prompt_tokens"]
            answer.teacher_completion_tokens = teacher["completion_tokens"]
            answer.teacher_cost = teacher["cost"]
        answer.system2_calls = result.calls
        answer.tokens += result.tokens
        # For audit: what each sample wrote (a PAL program, a chain of thought), logged with the interaction
        # that the example points to (`agent store show ID`).
        answer.route_reason["samples"] = sample_audit(result.samples)
        answer.votes = dict(decision.votes)
        answer.agreement = decision.agreement
        answer.accepted = bool(decision.accepted and decision.answer)
        if decision.answer:
            answer.text = decision.answer
            answer.route = "system2"
        else:
            answer.error = "System 2 gave no parsable answer"

    def _lm(self, deadline: float, cancel: threading.Event | None = None, priority: int = BACKGROUND):
        """System 2's LM on the local backend, at ``priority``: every call is dropped at the next decode step once
        ``deadline`` (``system2.timeout_s``) passes or ``cancel`` is set, instead of decoding on for nobody."""
        seed = self.config.seed

        def run(calls: Sequence[Call]) -> list[list[Completion]]:
            if self._closing.is_set():
                raise System2Timeout("System 2 stopped: the agent is closing")
            if time.monotonic() > deadline:
                raise System2Timeout(f"System 2 exceeded {self.config.system2.timeout_s:.0f} s")
            requests = [
                GenerationRequest(
                    [{"role": role, "content": content} for role, content in call.messages],
                    SamplingParams(n=call.n, temperature=call.temperature, top_k=call.top_k,
                                   max_new_tokens=call.max_new_tokens, stop=tuple(call.stop), seed=seed),
                    priority=priority,
                )
                for call in calls
            ]
            try:
                return stream.generate(self.backend, requests, cancel=cancel, deadline=deadline)
            except GenerationCancelled as exc:
                if cancel is not None and cancel.is_set():
                    raise
                raise System2Timeout(f"System 2 exceeded {self.config.system2.timeout_s:.0f} s") from exc

        return run

    # --- store -----------------------------------------------------------------------------
    def _record(self, answer: Answer, query: str, tag: str | None, source: str, teach: bool) -> None:
        """Log the interaction, and System 2's example (when ``source`` may teach). A plain System 1 answer goes
        through the write-behind queue when one runs (:meth:`start_write_behind`; its ``interaction_id`` stays
        None); an answer that System 2 labelled, or will label in the background, is written now: its example
        points to it."""
        fields = dict(
            input=query, tag=tag, route=answer.route, system1_answer=answer.system1_text,
            confidence=answer.confidence, final_answer=answer.text, method=answer.method,
            adapter_version=answer.adapter_version, tokens_system1=answer.tokens_system1,
            tokens_system2=answer.tokens_system2, system2_calls=answer.system2_calls,
            latency_ms=answer.latency_ms, route_reason=answer.route_reason, votes=answer.votes,
            accepted=answer.accepted, error=answer.error, teacher_prompt_tokens=answer.teacher_prompt_tokens,
            teacher_completion_tokens=answer.teacher_completion_tokens, source=source,
        )
        if self._writer is not None and answer.method is None and "system2" not in answer.route_reason:
            self._writer.submit(fields)
            return
        answer.interaction_id = self.store.log_interaction(**fields)
        if teach:
            self._record_example(answer, query, tag, source)

    def _record_example(self, answer: Answer, query: str, tag: str | None, source: str | None) -> None:
        """Keep System 2's answer as an example: ``pending`` if it passed the filter, else ``rejected`` with
        its votes; nothing when System 2 gave no parsable answer. Inline and background labels both come here."""
        if answer.method and answer.votes is not None and answer.route == "system2":
            self.store.add_example(
                input=query, target=answer.text, method=answer.method, votes=answer.votes,
                agreement=answer.agreement, status="pending" if answer.accepted else "rejected",
                kind="system2", tag=tag, interaction_id=answer.interaction_id, source=source,
            )

    # --- background System 2 ---------------------------------------------------------------
    def _defer_system2(self, answer: Answer, query: str, method: str | None, tag: str | None,
                       source: str, explore: bool = False) -> Deferred | None:
        """Offer ``query`` to the background queue; the user keeps System 1's ``answer``, which says whether
        System 2 was ``queued`` or ``dropped`` (queue full) in ``route_reason["system2"]``."""
        item = Deferred(query, method, tag, answer.system1_text, answer.confidence, answer.adapter_version,
                        source=source, explore=explore)
        queued = self._system2_queue.offer(item)
        answer.route_reason["system2"] = "queued" if queued else "dropped"
        return item if queued else None

    def _label_order(self, waiting: Sequence[Deferred]) -> list[float]:
        """Which waiting query to label next on the queue's ranked turns (highest first; every other turn takes
        the oldest: :class:`agent.background.System2Queue`): one the System 2 memory would now skip comes first,
        since skipping costs a judgement and frees the queue; then by the chance that System 2 pays off for it
        (:attr:`policies.system2_memory.MemoryVerdict.expected_yield`: sums that were all accepted before 0.8
        and more, a kind not seen yet 0.5, sorting that never was below 0.2). A query queued to explore is
        ranked by its chance, as it will be labelled whatever."""
        scores = [0.5] * len(waiting)
        by_method: dict[str, list[int]] = {}
        for i, item in enumerate(waiting):
            by_method.setdefault(self._method_name(item.method, item.tag), []).append(i)
        for name, indices in by_method.items():
            verdicts = self.routing_memory.judge_many([waiting[i].query for i in indices], name)
            for i, verdict in zip(indices, verdicts or ()):
                scores[i] = math.inf if verdict.skip and not waiting[i].explore else verdict.expected_yield
        return scores

    def _label_deferred(self, item: Deferred) -> Label:
        """System 2 on a queued query, recorded as the inline path records it (linked to its interaction).

        The System 2 memory judges the query again first. It judged it when the query was queued, but a queue
        that labels only in serving's idle time lags minutes behind the traffic, and the labels done meanwhile
        are evidence: in the live replay nearly all of the first hundred queries were queued before any label
        told the memory that sorting and general questions never pay off, and labelling them (up to 8 s each,
        alone) held back the sums behind them, which do. Such a query is skipped, as it would be if asked now; one
        queued to explore (the memory said skip, and it was drawn to run anyway) is not judged again."""
        name = self._method_name(item.method, item.tag)
        verdict = None if item.explore else self.routing_memory.judge(item.query, name)
        if verdict is not None and verdict.skip:
            if item.interaction_id is not None:
                self.store.add_background_label(item.interaction_id, method=None, route_reason={
                    "system2": "skipped", "memory": verdict.as_dict()})
            return Label(accepted=False, tokens=0, skipped=True)
        result = self.system2(item.query, method=item.method, tag=item.tag, priority=IDLE)
        answer = Answer(text=item.system1_text, route="system1", confidence=item.confidence, method=result.method,
                        adapter_version=item.adapter_version, tokens=0, latency_ms=0.0,
                        system1_text=item.system1_text, tag=item.tag, interaction_id=item.interaction_id)
        self._apply_system2(answer, result)
        self._checked_by_system2(answer, item.system1_text, item.tag)
        if item.interaction_id is not None:  # the System 1 answer's row says what System 2 then spent and decided
            self.store.add_background_label(
                item.interaction_id, method=result.method, tokens_system2=answer.tokens_system2,
                system2_calls=answer.system2_calls, accepted=bool(answer.accepted), votes=answer.votes,
                teacher_prompt_tokens=answer.teacher_prompt_tokens,
                teacher_completion_tokens=answer.teacher_completion_tokens,
                # the samples too, as inline: audit, and the programs a consolidation's variations start from
                route_reason={"system2": "labelled", "samples": answer.route_reason.get("samples", [])})
        self.routing_memory.record(item.query, name, bool(answer.accepted))
        tag = item.tag
        if tag is None and answer.accepted and self.config.scoping.auto:
            tag = self._assign_scope(answer, item.query)  # the example joins its scope; the logged answer stays
        self._record_example(answer, item.query, tag, item.source)
        return Label(accepted=bool(answer.accepted and answer.route == "system2"), tokens=result.tokens)

    def background_stats(self) -> dict[str, int]:
        """Background System 2 (``system2.mode = "background"``) since this agent started: queries
        ``queued``, ``dropped`` (queue full, or waiting at close), ``labelled``, ``accepted`` into the buffer,
        ``skipped`` at their turn (see :meth:`_label_deferred`), ``failed``, System 2 ``tokens`` spent, and
        ``waiting`` now."""
        return self._system2_queue.stats()


def sample_audit(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """What each System 2 sample wrote (a PAL program, a chain of thought) and answered, as an interaction keeps
    it in ``route_reason["samples"]``: for audit (``agent store show``), and for the variations a consolidation
    makes of solved questions (:mod:`agent.variations`)."""
    return [{"answer": s.answer, "trace": s.trace[:AUDIT_TRACE_CHARS]} for s in samples]


def _solution(answer: Answer) -> str | None:
    """The trace (a PAL program, a chain of thought) of the first System 2 sample that gave the accepted answer
    (of the first sample with a trace when none reads exactly like it)."""
    samples = answer.route_reason.get("samples", ())
    return solving_trace(samples, answer.text) or next((s["trace"] for s in samples if s.get("trace")), None)
