"""Consolidation: distil the buffer into a new LoRA adapter, gate it, promote it, serve it.

One run (``agent consolidate``, ``Agent.consolidate()``, or the scheduler):
1. take the consolidation lock in the store (never two runs at once, across processes), reap runs
   that were killed, and remove half-written adapter folders they left;
2. data: the ``pending`` System 2 examples; a seeded, stable share of them becomes ``holdout`` and
   is never trained on; of the rest, no single source (API key) may be more than
   ``consolidation.max_source_share`` of what trains (``policies.sources``: its surplus stays pending for
   a later round); earlier ``used`` examples are replayed (a sample, or all of the scope's up to a cap:
   ``consolidation.replay``); where program-aided System 2 solved the questions, new questions of the
   same wordings labelled by a verified program of theirs fill the run up to ``consolidation.variations``
   (:mod:`agent.variations`; a share of them joins the holdout); retention examples (System 1's own
   confident answers, from the store's history and a shipped general prompt set, answered by the
   serving model now) keep current behaviour in place;
3. train a LoRA adapter (:mod:`agent.training`) into a temporary folder;
4. gate: candidate vs serving model on the task holdout (accuracy against the System 2 targets), on
   the retention holdout (agreement with the serving model's answers), and on a fixed eval file when
   configured; promote only if not worse on the task and retention stays above its threshold (a
   scoped adapter, which only ever serves its own tag, has its general retention reported, not gated);
5. promote: rename the folder into place, then commit the registry row, the examples it learned
   (``used``) and the run's outcome in one transaction: a crash at any moment leaves the old or the
   new adapter complete, never half of one, and never an adapter serving whose examples are still
   ``pending``. A folder renamed into place whose transaction never committed is removed by the next
   run's cleanup. The agent then hot-swaps the new adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from agent.adapter_cache import folder_files, local_folder
from agent.answer_cache import AnswerCache, model_identity
from agent.auth import OPERATOR_SOURCES, KeyRing
from agent.backends import Backend, Completion, serving_dtype
from agent.config import AgentConfig
from agent.data import retention_prompts
from agent.errors import ConfigError, ConsolidationInterrupted
from agent.prompting import TrainingExample, system1_messages
from agent.retention import likelihood_retention
from agent.training import TrainingDiverged, scale_update, train_lora, training_device
from agent.variations import Variations, make_variations, solved, vocabulary
from policies.answers import answers_match, normalise, similarity
from policies.routing import MIN_CALIBRATION_RECORDS, logprob_confidence, takeover_threshold
from policies.sources import cap_by_source
from store import Example, Interaction, Store

logger = logging.getLogger(__name__)

LOCK_NAME = "consolidation"
TMP_PREFIX = ".tmp-"
RETENTION_SIMILARITY = 0.8
"""Long answers count as retained when their token-level F1 with the old answer reaches this."""
SCOPED_RETENTION_HOLDOUT = 16
"""Held-out retention prompts a scoped run answers and scores. Its retention is reported, not gated, and every
held-out prompt costs a run beside live traffic an answer and a scoring pass: 64 of them were about a minute of a
sums scope's first run in the live replay, which decides how soon its adapter serves."""
STORE_CHECK_MAX_AGE_S = 300.0
"""A consolidation checks the store's pages (``PRAGMA quick_check``) before it writes, unless a check passed
this recently (its process opened the store with one moments ago); see :mod:`store.integrity`."""


@dataclass
class Learner(Protocol):
    """What consolidation needs from the runtime; :class:`agent.Agent` is one.

    Consolidation reads the buffer and the history from ``store``, trains on ``model_path``, and asks
    the runtime for System 1's answers (under the serving adapter, or a candidate it loads into
    ``backend``) to build retention targets and to gate the candidate."""

    config: AgentConfig
    store: Store
    model_path: str
    backend: Backend

    def refresh_adapters(self, force: bool = False) -> None: ...

    def adapter_for(self, tag: str | None) -> tuple[int | None, str | None]: ...

    def answer_kind(self, tag: str | None) -> str: ...

    def confident_history(self, limit: int, seed: int = 0) -> list[Interaction]: ...

    def system1_batch(self, inputs: Sequence[str], tag: str | None = None, *, adapter: Any = ...,
                      max_new_tokens: int | None = None) -> list[Completion]: ...


@dataclass
class ConsolidationReport:
    """What one consolidation run did, with every number the gate looked at."""

    status: str
    """``promoted``, ``rejected``, ``failed``, ``skipped`` or ``dry-run``."""
    reason: str
    run_id: int | None = None
    scope: str | None = None
    adapter_version: int | None = None
    parent_version: int | None = None
    n_new: int = 0
    n_deferred: int = 0
    """Pending examples left for a later round by the per-source cap (``consolidation.max_source_share``)."""
    n_replay: int = 0
    n_variations: int = 0
    """New questions made from the programs System 2 solved the scope with (``consolidation.variations``)."""
    n_retention: int = 0
    n_holdout: int = 0
    n_retention_holdout: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    train_preview: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def holdout_bucket(text: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per input: the same example is always held out."""
    digest = hashlib.sha256(f"{seed}:{text.strip().lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(text: str, cfg) -> bool:
    """Whether a task example with input ``text`` is in the seeded holdout share (``consolidation.holdout_fraction``)
    that gates candidates and is never trained on; the scheduler counts what would train by the same rule."""
    return holdout_bucket(text, cfg.seed) < cfg.holdout_fraction


def uncapped_sources(config: AgentConfig) -> set[str | None]:
    """The sources ``consolidation.max_source_share`` never cuts: the operator's own (``local``, ``anonymous``),
    keys with the ``admin`` right, ``consolidation.uncapped_sources``, and None (examples stored before
    sources were recorded). A keys file that cannot be read now counts for nothing: the cap errs on the
    strict side."""
    names: set[str | None] = {None, *OPERATOR_SOURCES, *config.consolidation.uncapped_sources}
    try:
        names |= KeyRing.load(config.server).admin_names()
    except ConfigError as exc:
        logger.warning("per-source caps: cannot read the API keys (%s); only the configured names are uncapped", exc)
    return names


def consolidate(
    agent: Learner,
    *,
    scope: str | None = None,
    dry_run: bool = False,
    min_examples: int | None = None,
    epochs: int | None = None,
    progress: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    stop: threading.Event | None = None,
) -> ConsolidationReport:
    """One consolidation run for ``scope`` (a task tag; None: the general adapter).

    Setting ``stop`` makes a running training stop at the next step, leaving serving untouched.
    """
    store, config = agent.store, agent.config.consolidation
    store.verify(max_age_s=STORE_CHECK_MAX_AGE_S)  # a damaged file is refused before the run writes to it
    if scope is not None and scope in store.pinned_scopes():
        return ConsolidationReport("skipped", f"scope {scope!r} is pinned (agent scopes unpin {scope} lets it "
                                   "learn again)", scope=scope)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not store.acquire_lock(LOCK_NAME, owner, ttl_s=900):
        holder = store.lock_holder(LOCK_NAME)
        who = f"pid {holder.pid} on {holder.host}" if holder else "another process"
        return ConsolidationReport("skipped", f"another consolidation is running ({who})", scope=scope)
    started = time.perf_counter()
    try:
        agent.refresh_adapters(force=True)  # another process may have promoted since: gate against what serves now
        cleanup_after_crash(agent, lock_owner=owner)
        return _consolidate_locked(agent, owner, scope, dry_run, min_examples or config.min_examples,
                                   epochs, progress, on_step, stop, started)
    finally:
        store.release_lock(LOCK_NAME, owner)


def cleanup_after_crash(agent: Learner, lock_owner: str | None = None) -> list[int]:
    """Mark killed runs ``crashed`` and delete the adapter folders they left behind; returns the run ids.

    Left behind: ``.tmp-*`` folders (half-written or never renamed), and ``vN`` folders renamed into place
    whose registry transaction never committed (N at or above the next version the registry would give).
    Folders are only touched while holding the consolidation lock (``lock_owner`` when the caller already
    holds it), since a live run in another process is writing its own temporary folder. Crashed runs are
    told apart by their process being gone, which needs no lock.
    """
    store = agent.store
    crashed = store.reap_crashed_runs()
    owner = lock_owner or f"{socket.gethostname()}:{os.getpid()}:cleanup-{uuid.uuid4().hex[:8]}"
    if lock_owner is None and not store.acquire_lock(LOCK_NAME, owner, ttl_s=900):
        return crashed  # a consolidation is running; it cleans up itself, and the next run does the rest
    try:
        root = agent.config.adapters_path()
        if root.is_dir():
            first_unregistered = store.next_adapter_version()
            for leftover in root.iterdir():
                name = leftover.name
                orphan = name[:1] == "v" and name[1:].isdigit() and int(name[1:]) >= first_unregistered
                if leftover.is_dir() and (name.startswith(TMP_PREFIX) or orphan):
                    logger.warning("removing adapter folder %s left by a killed consolidation", leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
    finally:
        if lock_owner is None:
            store.release_lock(LOCK_NAME, owner)
    return crashed


def _consolidate_locked(agent: Learner, owner, scope, dry_run, min_examples, epochs, progress, on_step, stop, started):
    store, cfg = agent.store, agent.config.consolidation
    tag_filter = scope if (scope is not None or cfg.per_tag) else None
    pending = [e for e in store.list_examples(status="pending", tag=tag_filter)
               if scope is not None or not cfg.per_tag or e.tag is None]
    to_holdout = [e for e in pending if in_holdout(e.input, cfg)]
    held = {e.id for e in to_holdout}
    cap = cap_by_source([e for e in pending if e.id not in held], lambda e: e.source, cfg.max_source_share,
                        uncapped_sources(agent.config))
    new = cap.selected
    if cap.deferred:
        logger.info("per-source cap (%.2f of a round): %d example(s) wait for a later round: %s",
                    cfg.max_source_share, len(cap.deferred),
                    ", ".join(f"{source}: {n}" for source, n in cap.deferred_by_source.items()))
    if len(new) < min_examples:
        waiting = (f" ({len(cap.deferred)} more wait: no source may be more than {cfg.max_source_share:g} of a "
                   "round)") if cap.deferred else ""
        return ConsolidationReport(
            "skipped", f"{len(new)} pending examples to train on, fewer than --min-examples {min_examples}{waiting}",
            scope=scope, n_new=len(new), n_deferred=len(cap.deferred), seconds=time.perf_counter() - started,
        )
    if to_holdout and not dry_run:
        store.set_example_status([e.id for e in to_holdout], "holdout")
    holdout = store.list_examples(status="holdout", tag=tag_filter) if not dry_run else to_holdout
    if scope is None and cfg.per_tag:  # the general adapter is gated on untagged examples only
        holdout = [e for e in holdout if e.tag is None]
    replay = replay_examples(store, cfg, len(new), tag_filter, untagged_only=scope is None and cfg.per_tag)
    variations = _variations(agent, scope, [*new, *replay], holdout)
    serving = store.serving_adapter(scope) or (store.serving_adapter(None) if scope else None)
    retention_inputs = _retention_inputs(agent, cfg)
    ratio = cfg.retention_ratio if scope is None else cfg.scoped_retention_ratio
    n_retention_train = min(int(ratio * (len(new) + len(replay) + len(variations.train))),
                            sum(1 for p in retention_inputs if not _held_out(p, cfg.seed)))
    report = ConsolidationReport(
        "dry-run", "", scope=scope, parent_version=serving.version if serving else None, n_new=len(new),
        n_deferred=len(cap.deferred), n_replay=len(replay), n_holdout=len(holdout),
        n_variations=len(variations.train),
    )
    if variations.train or variations.unverified:
        report.metrics["variations"] = variations.metrics()
    if dry_run:
        report.n_retention = n_retention_train
        report.reason = "nothing was trained (dry run)"
        report.train_preview = [{"input": e.input, "target": e.target, "source": src} for src, rows in
                                (("new", new), ("replay", replay), ("variation", variations.train)) for e in rows]
        report.seconds = time.perf_counter() - started
        return report

    run_id = store.start_run(scope=scope, config=asdict(cfg))
    report.run_id = run_id
    version = _next_version(agent)
    root = agent.config.adapters_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}v{version}-{uuid.uuid4().hex[:6]}"
    candidate = f"candidate-v{version}"
    loaded = False
    try:
        serving_name = agent.adapter_for(scope)[1]
        serving_folder = local_folder(store, serving, root) if serving else None
        served = ServingAnswers(agent, serving_name, serving_folder, stop)
        # Retention: the serving model's own answers are the targets to keep. Only the prompts this run reads
        # are answered (minutes of CPU for 64 prompts): the held-out half, and what trains of the rest.
        reported_only = scope is not None and cfg.retention_measure == "likelihood"
        asked = _retention_prompts_used(retention_inputs, n_retention_train, cfg.retention_kl_weight > 0, cfg.seed,
                                        max_holdout=SCOPED_RETENTION_HOLDOUT if reported_only else None)
        retention_answers = served(asked)
        retention_train, retention_holdout = split_retention(asked, retention_answers, cfg.seed)
        retention_kl_pairs = retention_train  # the KL term (retention_kl_weight) sees every training prompt
        retention_train = retention_train[:n_retention_train]
        report.n_retention, report.n_retention_holdout = len(retention_train), len(retention_holdout)
        report.metrics["retention_trained"] = [p for p, _ in retention_train]  # kept with the adapter: what it saw
        system_prompt = agent.config.system_prompt
        examples = [TrainingExample(system1_messages(e.input), e.target) for e in [*new, *replay, *variations.train]]
        examples += [TrainingExample(system1_messages(p), a) for p, a in retention_train]

        def step(i: int, total: int, loss: float) -> None:
            if stop is not None and stop.is_set():
                raise ConsolidationInterrupted(f"stopped at step {i} of {total} by shutdown")
            if i % 10 == 0:
                store.heartbeat(LOCK_NAME, owner)
            if on_step:
                on_step(i, total, loss)

        # never from an adapter flagged by `store purge`: it learned from examples taken back
        resume_from = serving_folder if (cfg.resume and serving and not serving.needs_retrain) else None
        stats = train_lora(
            agent.model_path, examples, cfg, tmp, resume_from=resume_from,
            system_prompt=system_prompt, epochs=epochs, on_step=step if not progress else _progress(step),
            kl_examples=[TrainingExample(system1_messages(p), a) for p, a in retention_kl_pairs],
        )
        if scope is None and resume_from is None and cfg.general_update_scale != 1:
            scale_update(tmp, cfg.general_update_scale)
            report.metrics["update_scale"] = cfg.general_update_scale
        report.metrics.update(train_steps=stats.steps, train_seconds=round(stats.seconds, 2),
                              first_loss=stats.first_loss, last_loss=stats.last_loss, bf16=stats.bf16,
                              n_train=len(examples) - stats.n_dropped, n_dropped_too_long=stats.n_dropped,
                              n_answers_cut=stats.n_truncated)
        if stats.last_kl is not None:
            report.metrics["train_retention_kl"] = stats.last_kl
        agent.backend.load_adapter(candidate, str(tmp))
        loaded = True
        passed, reason = _gate(agent, report, [*holdout, *variations.holdout], retention_holdout, candidate, served, scope,
                               candidate_folder=str(tmp), serving_folder=serving_folder)
        store.heartbeat(LOCK_NAME, owner)  # raises if the lock was taken over: then another run owns the registry
    except TrainingDiverged as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return _finish(agent, report, "failed", f"training diverged: {exc}", started)
    except ConsolidationInterrupted as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return _finish(agent, report, "failed", str(exc), started)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.exception("consolidation failed")
        _finish(agent, report, "failed", f"{type(exc).__name__}: {exc}", started)
        raise
    finally:
        if loaded:
            agent.backend.unload_adapter(candidate)

    final = root / f"v{version}"
    os.replace(tmp, final)  # the folder is complete before any registry row points at it
    report.adapter_version = version
    status = "promoted" if passed else "rejected"
    # One transaction: the adapter row (serving, or rejected), its examples marked used, the run finished.
    store.commit_adapter(
        version, str(final), report.parent_version, promote=passed, scope=scope, metrics=report.metrics,
        n_train=report.metrics.get("n_train", 0), run_id=run_id, used_examples=[e.id for e in new],
        reason=reason, n_holdout=report.n_holdout,
        files=folder_files(final) if passed and cfg.store_adapter_files else None,
    )
    return _finish(agent, report, status, reason, started, record=False)


def _variations(agent: Learner, scope: str | None, trained: Sequence[Example], holdout: Sequence[Example]) -> Variations:
    """New questions of the wordings program-aided System 2 solved (:mod:`agent.variations`), labelled by a
    verified program of theirs, up to ``consolidation.variations`` task examples to train on, and the
    ``holdout_fraction`` share more to gate on. None when the run already has that many."""
    cfg = agent.config.consolidation
    n_train = cfg.variations - len(trained)
    if n_train <= 0:
        return Variations()
    n_holdout = round(n_train * cfg.holdout_fraction / (1 - cfg.holdout_fraction))
    return make_variations(solved(agent.store, trained), n_train, n_holdout, agent.answer_kind(scope),
                           seed=cfg.seed, taken=[e.input for e in holdout],
                           words=lambda: vocabulary(agent.model_path))


def replay_examples(store: Store, cfg, n_new: int, tag: str | None, untagged_only: bool) -> list:
    """The earlier ``used`` examples a run trains on again, by ``consolidation.replay``.

    ``ratio`` (a seeded sample of ``replay_ratio`` per new example) keeps a round cheap, but then a round's
    adapter, trained from scratch, has seen most of the scope's history once or not at all: the loop
    lagged one batch consolidation of the same examples (0.47 against 0.80 on addition). ``all`` replays
    every used example of the scope, so each round is that batch consolidation; ``replay_cap`` bounds
    both (a seeded sample of the cap), so a scope with a long history does not make every round longer.
    """
    if cfg.replay == "all":
        used = [e for e in store.list_examples(status="used", tag=tag) if not untagged_only or e.tag is None]
        if len(used) <= cfg.replay_cap:
            return used
        return sorted(random.Random(cfg.seed).sample(used, cfg.replay_cap), key=lambda e: e.id)
    return store.sample_examples("used", min(int(cfg.replay_ratio * n_new), cfg.replay_cap), seed=cfg.seed, tag=tag)


def _finish(agent: Learner, report: ConsolidationReport, status: str, reason: str, started: float,
            record: bool = True) -> ConsolidationReport:
    report.status, report.reason = status, reason
    report.seconds = round(time.perf_counter() - started, 2)
    if record and report.run_id is not None:
        agent.store.finish_run(
            report.run_id, status, reason=reason, metrics=report.metrics, adapter_version=report.adapter_version,
            n_train=report.metrics.get("n_train", 0), n_holdout=report.n_holdout,
        )
    logger.info("consolidation %s: %s", status, reason)
    return report


def _next_version(agent: Learner) -> int:
    """Next version number, also past any folder a crash left without a registry row."""
    root = agent.config.adapters_path()
    on_disk = [int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()] if root.is_dir() else []
    return max([agent.store.next_adapter_version(), *(v + 1 for v in on_disk)])


def _retention_inputs(agent: Learner, cfg) -> list[str]:
    """Confident System 1 inputs from across the store's history, then the shipped retention prompts."""
    history = agent.confident_history(cfg.retention_prompts // 2, seed=cfg.seed)
    seen: set[str] = set()
    inputs: list[str] = []
    for text in [i.input for i in history] + retention_prompts():
        key = text.strip().lower()
        if key not in seen:
            seen.add(key)
            inputs.append(text)
    return inputs[: cfg.retention_prompts]


RETENTION_BATCH = 16
"""Retention prompts answered per call, between which a stop request is honoured."""


def _system1_answers(agent: Learner, inputs: Sequence[str], adapter: str | None,
                     stop: threading.Event | None = None) -> list[str]:
    """Greedy System 1 answers under the loaded adapter ``adapter`` (None: the base model); with ``stop``,
    answered ``RETENTION_BATCH`` at a time, raising :class:`ConsolidationInterrupted` once it is set (the
    retention answers come before training and take minutes on a busy CPU)."""
    if stop is None:
        return [c.text for c in agent.system1_batch(inputs, adapter=adapter)]
    answers: list[str] = []
    for start in range(0, len(inputs), RETENTION_BATCH):
        if stop.is_set():
            raise ConsolidationInterrupted("stopped before training by shutdown")
        answers += [c.text for c in agent.system1_batch(inputs[start:start + RETENTION_BATCH], adapter=adapter)]
    return answers


class ServingAnswers:
    """The serving model's greedy answers for one run, kept in the adapters folder's answer cache
    (:mod:`agent.answer_cache`) so that the next run with the same serving model does not decode them again."""

    CACHE_FILE = "serving-answers.json"

    def __init__(self, agent: Learner, name: str | None, folder: str | None,
                 stop: threading.Event | None = None) -> None:
        self.agent, self.name, self.stop = agent, name, stop
        config = agent.config
        self.identity = model_identity(agent.model_path, folder, config.system_prompt, config.max_new_tokens,
                                       serving_dtype(config))
        self.cache = AnswerCache(config.adapters_path() / self.CACHE_FILE)

    def __call__(self, inputs: Sequence[str]) -> list[str]:
        return self.cache.answers(self.identity, inputs,
                                  lambda missing: _system1_answers(self.agent, missing, self.name, stop=self.stop))


def _right(output: str, target: str, kind: str) -> bool:
    return answers_match(normalise(output, kind), normalise(target, kind), kind)


def _accuracy(outputs: Iterable[str], targets: Iterable[str], kind: str) -> float | None:
    pairs = list(zip(outputs, targets))
    if not pairs:
        return None
    return sum(_right(o, t, kind) for o, t in pairs) / len(pairs)


def split_retention(inputs: Sequence[str], answers: Sequence[str], seed: int
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, holdout) pairs of retention prompt and serving answer: a seeded half of the prompts, always
    the same ones, is held out to gate candidates. Long answers belong in both (``retained`` compares them
    by token overlap); only empty answers, which hold nothing to keep, are left out."""
    train: list[tuple[str, str]] = []
    holdout: list[tuple[str, str]] = []
    for prompt, answer in zip(inputs, answers):
        if answer.strip():
            (holdout if _held_out(prompt, seed) else train).append((prompt, answer))
    return train, holdout


def _held_out(prompt: str, seed: int) -> bool:
    """Whether a retention prompt is in the seeded half that gates candidates (never trained on)."""
    return holdout_bucket(prompt, seed + 1) < 0.5


def _retention_prompts_used(inputs: Sequence[str], n_train: int, all_train: bool, seed: int,
                            max_holdout: int | None = None) -> list[str]:
    """The retention prompts a run needs answers for, in order: every held-out one (the first ``max_holdout``
    when given), and of the others the first ``n_train`` (all of them with ``all_train``: the KL term reads
    every training prompt)."""
    used: list[str] = []
    trained = held = 0
    for prompt in inputs:
        if _held_out(prompt, seed):
            if max_holdout is None or held < max_holdout:
                used.append(prompt)
                held += 1
        elif all_train or trained < n_train:
            used.append(prompt)
            trained += 1
    return used


def retained(old: str, new: str) -> bool:
    """Does ``new`` keep the serving model's answer ``old``? Exact after normalisation, or close for long ones."""
    a, b = normalise(old, "text"), normalise(new, "text")
    if a is not None and a == b:
        return True
    return len(old.split()) > 5 and similarity(old, new) >= RETENTION_SIMILARITY


def _gate(agent: Learner, report, holdout, retention_holdout, candidate, served: ServingAnswers, scope, *,
          candidate_folder: str, serving_folder: str | None) -> tuple[bool, str]:
    cfg = agent.config.consolidation
    kind = agent.answer_kind(scope)
    m = report.metrics
    reasons: list[str] = []
    ok = True
    routing = agent.config.routing
    # the adapter's own takeover threshold, calibrated on its held-out answers, decides when it answers alone
    calibrated = routing.estimator == "logprob" and routing.takeover_precision > 0
    if holdout:
        inputs, targets = [e.input for e in holdout], [e.target for e in holdout]
        answers = agent.system1_batch(inputs, adapter=candidate)
        m["holdout_accuracy_candidate"] = _accuracy([c.text for c in answers], targets, kind)
        m["holdout_accuracy_serving"] = _accuracy(served(inputs), targets, kind)
        better = m["holdout_accuracy_candidate"] >= m["holdout_accuracy_serving"] - cfg.gate_margin
        ok &= better
        reasons.append(f"holdout accuracy {m['holdout_accuracy_serving']:.2f} -> {m['holdout_accuracy_candidate']:.2f}")
        if calibrated:
            records = [(round(logprob_confidence(c.logprobs, routing.quantile), 4), _right(c.text, t, kind))
                       for c, t in zip(answers, targets)]
            m["routing_records"] = records  # where serving's TakeoverEvidence starts from
            threshold = takeover_threshold(records, floor=routing.threshold, target_precision=routing.takeover_precision)
            if threshold > routing.threshold:
                m["routing_threshold"] = threshold
                precision = f"{routing.takeover_precision:g} of its held-out answers agree with System 2's"
                reasons.append(f"answers alone at confidence >= {threshold:.2f}, where {precision}"
                               if threshold <= 1.0 else
                               f"answers nothing alone yet: {len(records)} held-out answers are too few to tell"
                               if len(records) < MIN_CALIBRATION_RECORDS else
                               f"answers nothing alone yet: at no confidence do {precision}")
    else:
        reasons.append("no holdout examples yet")
        if calibrated:
            m["routing_records"] = []  # nothing to trust it by: System 2 checks its answers first
            reasons.append("answers nothing alone until System 2 has checked its answers")
    if retention_holdout:
        # The general adapter is gated by the configured measure and reports both. A scoped adapter never
        # answers general prompts: its retention is reported, not gated, by the likelihood measure only
        # (forward passes), without regenerating the text answers (minutes of decoding on a CPU).
        measures = {}
        if scope is None or cfg.retention_measure == "text":
            new_answers = _system1_answers(agent, [p for p, _ in retention_holdout], candidate)
            measures["text"] = m["retention"] = sum(
                retained(old, new) for (_, old), new in zip(retention_holdout, new_answers)) / len(new_answers)
            m["retention_examples"] = [{"input": p, "serving": old, "candidate": new}
                                       for (p, old), new in zip(retention_holdout[:5], new_answers)]
        if scope is None or cfg.retention_measure == "likelihood":
            likelihood = likelihood_retention(agent.model_path, retention_holdout, candidate_folder, serving_folder,
                                              system_prompt=agent.config.system_prompt, device=training_device(cfg))
            m.update(likelihood.as_metrics())
            measures["likelihood"] = likelihood.score
        m["retention_measure"] = cfg.retention_measure
        gated = measures[cfg.retention_measure]
        others = "".join(f" ({name} {value:.2f})" for name, value in measures.items() if name != cfg.retention_measure)
        both = f"retention {gated:.2f} by {cfg.retention_measure}{others}"
        if scope is None:
            ok &= gated >= cfg.retention_threshold
            reasons.append(f"{both}, needs >= {cfg.retention_threshold:.2f}")
        else:
            reasons.append(f"general {both} (not gated: this adapter serves only tag {scope!r})")
    if cfg.eval_file:
        items = [json.loads(line) for line in Path(cfg.eval_file).read_text().splitlines() if line.strip()]
        inputs, targets = [i["input"] for i in items], [str(i.get("answer", i.get("target"))) for i in items]
        m["eval_accuracy_candidate"] = _accuracy(_system1_answers(agent, inputs, candidate), targets, kind)
        m["eval_accuracy_serving"] = _accuracy(served(inputs), targets, kind)
        ok &= m["eval_accuracy_candidate"] >= m["eval_accuracy_serving"] - cfg.gate_margin
        reasons.append(f"eval file accuracy {m['eval_accuracy_serving']:.2f} -> {m['eval_accuracy_candidate']:.2f}")
    return ok, ("passed: " if ok else "gate failed: ") + "; ".join(reasons)


def _progress(step: Callable[[int, int, float], None]) -> Callable[[int, int, float], None]:
    """Wrap a step callback with a tqdm bar (only the CLI asks for one)."""
    from tqdm import tqdm

    bar: list[Any] = []

    def on_step(i: int, total: int, loss: float) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc="training", unit="step"))
        bar[0].update(1)
        bar[0].set_postfix(loss=f"{loss:.3f}")
        if i >= total:
            bar[0].close()
        step(i, total, loss)

    return on_step
