"""One configuration object for the whole runtime.

Values come from, in increasing order of precedence: the defaults below, a TOML file
(``--config agent.toml``), environment variables (``S2AGENT_<FIELD>`` for top-level fields,
``S2AGENT_<SECTION>__<FIELD>`` for sections, e.g. ``S2AGENT_ROUTING__THRESHOLD=0.4``), and CLI flags.
Every field is documented where it is defined; that text is what the README's reference shows.

Every value is checked where it is set, and an error names the key and where the value came from:
its type (from the annotation), its allowed values (a ``Literal[...]`` annotation, or ``choices`` in the
field's metadata when they come from a registry such as ``policies.system2.METHODS``), its range
(``within("[0, 1]", default)``), and for ``system2.prompts`` every template, formatted once. The loader
checks each value as it reads it (TOML, environment, overrides), a section built in code checks itself
in ``__post_init__``, and ``AgentConfig.validate()`` (which ``Agent`` calls) checks the whole tree again
for values assigned after construction.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from agent.auth import entry_problems
from agent.errors import ConfigError
from policies.answers import AnswerKind
from policies.system2 import METHODS
from policies.system2.prompts import template_problems


def default_data_dir() -> Path:
    """``$S2AGENT_HOME``, else ``$XDG_DATA_HOME/s2agent``, else ``~/.local/share/s2agent``."""
    if env := os.environ.get("S2AGENT_HOME"):
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "s2agent"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``; a plain path is returned as it is."""
    if "://" not in url:
        return url
    # Imported here, where a URL is shown: loading a configuration needs no database library.
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: mask what looks like user:password@
        return re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url)


# --- how a field states its range --------------------------------------------------------------------
class Interval:
    """A range of numbers written as in mathematics: ``[0, 1]``, ``(0, inf)``, ``[1, 65535]``, ``[0, 1)``."""

    def __init__(self, text: str) -> None:
        body = text.strip()
        low, comma, high = body[1:-1].partition(",")
        if body[:1] not in ("[", "(") or body[-1:] not in ("]", ")") or not comma:
            raise ValueError(f"not an interval: {text!r}")
        self.text = text
        self.low, self.high = float(low), float(high)
        self.low_included, self.high_included = body[0] == "[", body[-1] == "]"

    def __contains__(self, value: float) -> bool:
        above = self.low < value or (self.low_included and value == self.low)
        below = value < self.high or (self.high_included and value == self.high)
        return above and below

    def __str__(self) -> str:
        return self.text


def within(interval: str, default: Any) -> Any:
    """A dataclass field whose value (unless it is an optional field's ``None``) must lie in ``interval``."""
    return field(default=default, metadata={"range": Interval(interval)})


def _url_problems(value: object) -> list[str]:
    """A field's ``check``: why ``value`` is not an http(s) URL (none when it is)."""
    if value is None or (isinstance(value, str) and value.startswith(("http://", "https://"))):
        return []
    return [f"must be an http:// or https:// URL such as http://host:8000/v1; got {value!r}"]


# --- System 2 method names ----------------------------------------------------------------------------
TEACHER_PREFIX = "teacher:"
"""``teacher:<method>`` runs a System 2 method of ``policies.system2.METHODS`` on ``[system2.teacher]``."""


def split_method(name: str) -> tuple[bool, str]:
    """``("teacher:cot")`` -> ``(True, "cot")``; ``("cot")`` -> ``(False, "cot")``."""
    if name.startswith(TEACHER_PREFIX):
        return True, name[len(TEACHER_PREFIX):]
    return False, name


class MethodNames:
    """The method names a config (or a request) may use: each registered method, and each on the teacher.

    A live view of ``METHODS``: a method registered after import (the documented way to add one) is a
    valid name at once, with its ``teacher:`` twin."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and split_method(name)[1] in METHODS

    def __iter__(self):
        yield from METHODS
        yield from (TEACHER_PREFIX + name for name in METHODS)


METHOD_NAMES = MethodNames()


# --- the sections --------------------------------------------------------------------------------------
Router = Literal["threshold", "always", "never"]
"""The routers of ``policies.routing.ROUTERS``."""


@dataclass
class RoutingConfig:
    """When does a query leave System 1 for System 2?"""

    router: Router = "threshold"
    """``threshold`` (System 2 when confidence < threshold), ``always`` (bootstrap a task) or ``never``."""
    estimator: Literal["logprob", "agreement"] = "logprob"
    """``logprob``: a low quantile of System 1's token probabilities (no extra generation);
    ``agreement``: share of ``agreement_samples`` sampled System 1 answers that match the greedy one."""
    threshold: float = within("[0, 1]", 0.5)
    """Confidence below which System 2 runs (1: every query). ``agent calibrate`` fits it from the store."""
    quantile: float = within("[0, 1]", 0.1)
    """Quantile of token probabilities used by the ``logprob`` estimator (0 = the minimum)."""
    takeover_precision: float = within("[0, 1]", 0.9)
    """A promoted adapter answers alone only at confidences where its answers agreed with System 2's at least
    this often: first its answers to the gate's held-out inputs, then every input it served that System 2
    still answered (``policies.routing.TakeoverEvidence``; never below ``threshold``; ``logprob`` estimator;
    at least 5 answers). So a scope's first adapter, better than the base model but often wrong, leaves
    System 2 the inputs it is unsure of, and takes them over as its answers prove right. 0: every adapter is
    routed at ``threshold``."""
    agreement_samples: int = within("[1, inf)", 4)
    """Samples drawn by the ``agreement`` estimator."""
    memory: bool = True
    """Skip System 2 for inputs like ones it already ran on in vain (``policies/system2_memory.py``): when at
    least ``memory_min_evidence`` of the ``memory_neighbours`` most similar earlier inputs (cosine similarity
    >= ``memory_min_similarity``) ran System 2 with the same method and fewer than ``memory_min_yield`` of them
    got an accepted answer, System 1's answer stands. Only sources that may teach leave outcomes, so a client
    cannot switch System 2 off for others; rebuilt from the store at start (inline System 2 runs)."""
    memory_neighbours: int = within("[1, inf)", 8)
    """Most similar earlier System 2 inputs the memory consults."""
    memory_min_evidence: int = within("[1, inf)", 4)
    """Similar earlier inputs needed before System 2 is skipped (at most ``memory_neighbours``)."""
    memory_min_similarity: float = within("(0, 1]", 0.6)
    """Cosine similarity (the scope classifier's features) for an earlier input to count as evidence."""
    memory_min_yield: float = within("[0, 1]", 0.2)
    """System 2 is skipped when the share of the similar inputs it paid off for is below this."""
    memory_repeat_failures: int = within("[0, inf)", 1)
    """An input asked again that System 2 (the same method) failed on this many times, and never answered, is
    skipped at once, whatever the similar inputs say (0: no such rule)."""
    memory_explore: float = within("[0, 1]", 0.05)
    """Share of the inputs the memory would skip that still run System 2, so that a kind of input System 2
    has learned to handle (a new method, a teacher, a better model) is noticed."""
    memory_size: int = within("[1, inf)", 1000)
    """Outcomes kept per System 2 method (the newest; 16 KiB each)."""

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.memory_min_evidence > self.memory_neighbours:
            raise ConfigError(f"config key 'routing.memory_min_evidence' ({self.memory_min_evidence}) must be at most "
                              f"'routing.memory_neighbours' ({self.memory_neighbours})")


@dataclass
class TeacherConfig:
    """A stronger model behind an OpenAI-compatible endpoint that System 2 may run on (``teacher:<method>``).

    The student stays the local model: the consistency filter, the store, consolidation and the gate are
    the same whichever model wrote the votes. Only ``/chat/completions`` is used."""

    base_url: str | None = field(default=None, metadata={"check": _url_problems})
    """The endpoint's API root, e.g. ``http://gpu-host:8000/v1`` (vLLM, another ``agent serve``, a hosted
    API); unset: no teacher, and ``teacher:*`` methods are a configuration error."""
    model: str = "default"
    """The ``model`` field sent with each request (vLLM: the served model name)."""
    api_key_env: str | None = None
    """The NAME of an environment variable holding the API key, sent as ``Authorization: Bearer``; the key
    itself never belongs in a config file. Unset: no key is sent."""
    max_concurrency: int = within("[1, inf)", 8)
    """Most requests in flight to the teacher at once, from all queries of this process together."""
    timeout_s: float = within("(0, inf)", 30.0)
    """One HTTP request taking longer than this fails (and may be retried); ``system2.timeout_s`` still
    bounds the whole System 2 run."""
    max_retries: int = within("[0, inf)", 3)
    """Retries of a request after a 429, a 5xx, a timeout or a connection error (other 4xx: none)."""
    backoff_s: float = within("(0, inf)", 0.5)
    """First retry delay; it doubles with each retry, with jitter (x0.5-1.5). A ``Retry-After`` header
    is honoured instead, up to ``max_backoff_s``."""
    max_backoff_s: float = within("(0, inf)", 30.0)
    """The longest wait before one retry, ``Retry-After`` included."""
    breaker_failures: int = within("[1, inf)", 5)
    """After this many failed requests in a row the circuit breaker opens: System 2 runs that need the
    teacher are skipped (System 1 answers, the skip is counted) for ``breaker_cooldown_s``."""
    breaker_cooldown_s: float = within("(0, inf)", 30.0)
    """How long the breaker stays open before one request may try the teacher again."""
    use_n: bool = True
    """Ask for the ``k`` samples with the API's ``n``. An endpoint that answers with fewer choices is
    remembered as one without ``n`` and topped up with parallel requests; False: always parallel."""
    auto: bool = True
    """With a teacher configured, ``auto`` runs the local programs first and asks the teacher (``fallback``,
    else ``cot``) only when they do not agree: cheap questions stay local, the teacher is paid for the rest.
    False: ``auto`` stays local; the teacher runs only for ``teacher:*`` methods."""
    price_prompt_per_1m: float | None = within("[0, inf)", None)
    """Price of 1M prompt tokens (any currency); with ``price_completion_per_1m`` it turns the teacher's
    token counts into a cost in ``/metrics`` and ``agent store stats``. Unset: tokens only."""
    price_completion_per_1m: float | None = within("[0, inf)", None)
    """Price of 1M completion tokens, as ``price_prompt_per_1m``."""
    never_send: list[str] = field(default_factory=list)
    """The privacy switch: task tags (scopes) whose queries never reach the teacher, whatever the method
    asked for. Such a query runs the same method on the local model instead (``teacher:cot`` -> ``cot``;
    ``auto`` stays local); the tag is the request's or the one the scope classifier assigned.
    ``"*"`` keeps every query local, untagged ones included."""

    def __post_init__(self) -> None:
        _check_fields(self, prefix="system2.teacher")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """What the tokens cost at the configured prices; None when no price is set."""
        if self.price_prompt_per_1m is None and self.price_completion_per_1m is None:
            return None
        return (prompt_tokens * (self.price_prompt_per_1m or 0.0)
                + completion_tokens * (self.price_completion_per_1m or 0.0)) / 1e6

    def withholds(self, tag: str | None) -> bool:
        """Whether a query of ``tag`` must never be sent to the teacher (``never_send``)."""
        return "*" in self.never_send or (tag is not None and tag in self.never_send)


@dataclass
class System2Config:
    """How System 2 runs and which of its outputs become training data."""

    method: str = field(default="auto", metadata={"choices": METHOD_NAMES})
    """Default method: ``auto`` (program-aided first, ``fallback`` when no program agrees), ``cot``,
    ``rar``, ``s2a``, ``bsm``, ``pal`` (the one that beats System 1 with the embedded 135M model) or
    ``direct``; any of them as ``teacher:<method>`` runs it on ``[system2.teacher]``."""
    fallback: str | None = field(default=None, metadata={"choices": METHOD_NAMES})
    """The prompted method ``auto`` asks when the programs do not agree (e.g. ``cot``); None: none, the
    System 1 answer stands. Off by default: prompted methods score 0 with the embedded 135M model and
    cost seconds per query (see the README); set it with a larger model."""
    methods_by_tag: dict[str, str] = field(default_factory=dict, metadata={"choices": METHOD_NAMES})
    """Method per task tag, e.g. ``{arithmetic = "pal", legal = "teacher:cot"}``."""
    samples: int = within("[1, inf)", 4)
    """System 2 samples per query. The paper uses 8; measured here (README, System 2 cost per number of
    samples), program-aided k = 4 keeps 0.97 of the accuracy of k = 8 at half the time a user waits."""
    agreement_threshold: float = within("[0, 1]", 0.75)
    """Share of samples that must agree for the answer to be kept as a training example."""
    temperature: float = within("[0, inf)", 0.7)
    """Sampling temperature of System 2 runs (the samples must differ for a vote to mean anything)."""
    top_k: int = within("[0, inf)", 40)
    """Sample each System 2 token from the ``top_k`` most likely ones (0: from all of them)."""
    max_new_tokens: int | None = within("[1, inf)", None)
    """Length limit of each System 2 generation; default: each method's own (PAL 160, CoT 256, ...)."""
    timeout_s: float = within("(0, inf)", 60.0)
    """A System 2 run taking longer than this falls back to the System 1 answer: the most an inline
    System 2 adds to a user's wait (program-aided k = 4 takes about 0.5-1 s per query on 2 idle cores)."""
    prompts: dict[str, dict[str, str]] = field(default_factory=dict, metadata={"templates": True})
    """Prompt overrides per method, e.g. ``[system2.prompts.cot] user = "...{query}..."``; the names and
    placeholders of each method's templates are in ``policies/system2/prompts.py``. Every template is
    formatted once at start, so a misspelt name or placeholder is an error naming it."""

    mode: Literal["inline", "background"] = "inline"
    """``inline``: when the router sends a query to System 2, the user waits for System 2's answer (the
    paper's loop: the better answer now, and a training example). ``background``: the user gets System 1's
    answer at once and the query is labelled later by System 2 from a bounded queue (training data
    without the wait, but the user keeps System 1's less reliable answer). Only the router's decisions are
    deferred: a request for ``route="system2"`` always runs inline."""
    queue_size: int = within("[1, inf)", 256)
    """Background mode: queries waiting for a System 2 label; when full, new ones are dropped (and counted).
    At about one second per label on 2 CPU cores this is a few minutes of backlog."""
    workers: int = within("[1, inf)", 1)
    """Background mode: threads labelling queued queries. Their generations share the backend (and its
    micro-batcher) with serving, so more workers mostly queue up behind the same cores."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """``[system2.teacher]``: a stronger model System 2 may run on (``teacher:<method>``)."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class ConsolidationConfig:
    """How the buffer is distilled into a LoRA adapter, and when that adapter may serve."""

    min_examples: int = within("[1, inf)", 16)
    """Refuse to train on fewer pending examples."""
    holdout_fraction: float = within("[0, 1)", 0.2)
    """Seeded share of pending examples kept out of training to gate the candidate."""
    replay_ratio: float = within("[0, inf)", 0.5)
    """Earlier ``used`` examples mixed in, per new example (replay against forgetting), with ``replay = "ratio"``."""
    replay: Literal["ratio", "all"] = "all"
    """Which earlier ``used`` examples of the scope a run trains on again. ``all`` (the default): every one, up
    to ``replay_cap``, so each round trains what one batch consolidation of everything accepted so far would;
    ``ratio``: a seeded sample of ``replay_ratio`` per new example (cheaper rounds, but a round's fresh adapter
    sees little of the scope's history). Measured (README, ``agent bench loop --task addition``): System 1
    ended at 0.62 with ``all`` (batch distillation of the same examples: 0.42) and 0.54 with ``ratio``
    (batch: 0.63), and System 2's share fell to 0.03 against 0.38."""
    replay_cap: int = within("[0, inf)", 2000)
    """Most replayed examples in one run, either ``replay`` mode (a seeded sample when there are more):
    bounds a round's training time as a scope's history grows."""
    variations: int = within("[0, inf)", 192)
    """A run trains on at least this many task examples where program-aided System 2 solved enough of them
    (``agent.variations``): new questions of each wording it solved at least 3 times, with numbers drawn from
    the range the scope asked and quoted words from the model's vocabulary, labelled by one of its programs
    that reproduces the wording's other accepted answers; ``holdout_fraction`` more join the gate's holdout.
    A scope's first run has a few dozen real examples, which teach the answer's form more than the task.
    0: real examples only."""
    retention_ratio: float = within("[0, inf)", 0.25)
    """Retention examples (System 1's own confident answers) mixed in, per task example, in a run of the
    general adapter (``scoped_retention_ratio`` for a scoped one)."""
    scoped_retention_ratio: float = within("[0, inf)", 0.0)
    """``retention_ratio`` for a scoped adapter, which answers only the inputs of its scope and whose
    retention is reported, not gated. Off by default: on 120 sums retention data cost a scoped adapter
    0.16 on held-out sums and 40 % more training time (README, LoRA knobs), and its first run's time decides
    how soon a scope stops waiting on System 2."""
    general_update_scale: float = within("(0, 1]", 0.6)
    """The share of its trained LoRA update a general adapter serves with (every ``lora_B`` scaled before
    the gate: ``agent.training.scale_update``), a point between the base model and the trained adapter
    (WiSE-FT's interpolation). Taught 300 sums (seeds 0, 1, 2, one machine), 0.6 of the update kept 82, 79
    and 74 of the 86 general facts the base model knew where the whole one kept 74, 76 and 72, and answered
    0.80, 0.76 and 0.82 of sums it never saw against 0.70, 0.74 and 0.78 (README, "Teaching the general
    adapter by import"); 0.5 kept as many facts but fell to 0.56 on unseen sums in one seed. Not applied with
    ``resume``, where it would shrink what earlier rounds learned again each round; scoped adapters always
    serve their whole update."""
    retention_threshold: float = within("[0, 1]", 0.9)
    """The candidate must keep this share of the serving model's answers on the retention holdout, as
    ``retention_measure`` counts it (a general adapter only: a scoped one's retention is reported)."""
    retention_measure: Literal["text", "likelihood"] = "likelihood"
    """What the gate compares with ``retention_threshold``. ``likelihood``: the share of per-token
    probability the candidate keeps on the serving model's retention answers, teacher-forced
    (``agent/retention.py``); ``text``: the share of answers it regenerates exactly (or at token F1 >= 0.8
    when long). Both are reported in every run. ``likelihood`` is the default because a 135M model rarely
    regenerates a paragraph word for word even when it keeps its meaning (the general adapter read 0.14
    on ``text`` and could never be promoted), while likelihood separates the known cases: the serving
    model against itself 1.0, an adapter answering everything with digits ~0, one trained on the
    retention data alone >= 0.9 (``tests/agent/test_retention.py``)."""
    retention_kl_weight: float = within("[0, inf)", 0.0)
    """Weight of a KL term against the base model on the retention prompts and the serving model's answers
    (``agent.training.retention_kl``; the base logits come from the same model with the adapter disabled):
    retention by distribution instead of, or beside (``retention_ratio``), training on one sampled answer
    per prompt. 0: off (the default until ``agent bench knobs`` measures it)."""
    retention_prompts: int = within("[0, inf)", 168)
    """How many retention prompts (store history first, then the 168 shipped ones: 128 general prompts and
    40 number questions, ``agent.data.retention_prompts``) are used; about half train, the other half is the
    retention holdout that gates the candidate. A general adapter taught 300 sums kept 21 of 25 general facts
    the base model knew with 64 general prompts, 22-24 with 128; with the number questions beside them, 77
    and 75 of 85 on the finer set against 72 and 75 without (README, "Teaching the general adapter by
    import")."""
    gate_margin: float = within("[0, 1]", 0.0)
    """The candidate may be at most this much less accurate than the serving model on the holdout."""
    eval_file: str | None = None
    """Optional fixed JSONL eval set (``input``, ``answer``) the candidate must not get worse on."""
    rank: int = within("[1, inf)", 16)
    """LoRA rank: the width of the low-rank update added to each target module."""
    alpha: int = within("[1, inf)", 32)
    """LoRA scaling numerator: the update is scaled by ``alpha / rank``."""
    dropout: float = within("[0, 1)", 0.05)
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names of the base model's linear layers that get a LoRA update (default: attention and MLP)."""
    epochs: int = within("[1, inf)", 3)
    """Passes over the training mix."""
    min_steps: int = within("[0, inf)", 24)
    """At least this many optimizer steps: a small run (a scope's first few dozen examples) gets as many more
    epochs as it takes. 32 sums (`agent bench knobs --task addition --n-train 32`): 3 epochs (6 steps) learn
    0.14 of held-out sums, 24 steps 0.50, 48 steps 0.66 at 4x the time of 24. 0: ``epochs`` alone decides."""
    learning_rate: float = within("(0, inf)", 1e-3)
    """AdamW learning rate of the adapter weights."""
    batch_size: int = within("[1, inf)", 16)
    """Training sequences per optimizer step."""
    max_length: int = within("[1, inf)", 128)
    """Training sequences are cut to this many tokens: a long answer loses its tail, never its prompt; an
    example whose prompt alone does not fit is dropped (counted in the run's ``n_dropped_too_long``)."""
    resume: bool = False
    """Start from the serving adapter's weights instead of a fresh adapter."""
    bf16: Literal["auto", "on", "off"] = "auto"
    """``auto`` (bf16 autocast when the training device supports it: a CPU with avx512_bf16/AMX, a CUDA GPU of
    compute capability 8.0 or later), ``on`` or ``off``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where adapters are trained and scored: ``auto`` is the GPU when torch sees one, else the CPU. Beside a
    vLLM backend on the same GPU, training gets what ``[vllm] gpu_memory_utilization`` leaves (0.15 of it by
    default: a LoRA run on a 135M-1.5B model needs 1-6 GB); lower that setting for larger models."""
    seed: int = 0
    """Seeds the holdout split, replay sampling, the training order and the adapter's initial weights."""
    per_tag: bool = True
    """Train one scoped adapter per task tag (scope) and the general adapter on untagged examples only;
    False: one general adapter learns everything."""
    store_adapter_files: bool = True
    """Write each promoted adapter's files into the store, so replicas on other machines serve it from
    there (each into its own ``adapters_dir``); False: replicas need the adapters folder shared."""
    max_source_share: float = within("(0, 1]", 0.5)
    """The largest share of one consolidation's new training examples a single source (an API key) may
    contribute; the rest of its examples stay pending until other sources balance them, so no one client
    is most of what an adapter learns (``policies/sources.py``). A capped source alone trains on nothing.
    1: no cap. Never capped: ``local`` (in-process and CLI calls), ``anonymous`` (a server without keys),
    keys with the ``admin`` right, examples stored before sources were recorded, and ``uncapped_sources``."""
    uncapped_sources: list[str] = field(default_factory=list)
    """More source names (API key names) that ``max_source_share`` never cuts: sources you trust."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class ScopingConfig:
    """Which scoped adapter (``consolidation.per_tag``) serves an input that came without a tag."""

    classifier: bool = True
    """Send an untagged input to a scoped adapter when it resembles that tag's training inputs more than
    any untagged input (nearest neighbour over character n-grams, see ``policies/scoping.py``)."""
    min_similarity: float = within("[0, 1]", 0.6)
    """Cosine similarity to the nearest training input of a tag needed to assign that tag."""
    auto: bool = True
    """Group accepted, untagged System 2 examples into scopes by themselves: each joins the scope of its
    most similar stored input (at ``auto_min_similarity``) or starts a new one named after it; with
    ``consolidation.per_tag`` each scope then gets its own adapter."""
    auto_min_similarity: float = within("(0, 1]", 0.5)
    """Cosine similarity (same features as the classifier) to join an existing scope."""
    inputs_per_tag: int = within("[1, inf)", 500)
    """Inputs per tag (and untagged ones) the classifier compares against; refitted when adapters change."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class SchedulerConfig:
    """Background consolidation (``agent serve`` and embedded agents that ask for it)."""

    enabled: bool = True
    """Whether ``agent serve`` consolidates in the background (``--no-train`` sets it false: a replica that
    only serves, following the promotions another process makes in the shared store). An embedded
    ``Agent`` never starts the scheduler by itself, whatever this says: call ``Agent.start_scheduler()``."""
    interval_minutes: float | None = within("[0, 525600]", 60.0)
    """Every this many minutes, consolidate each scope (each task tag with ``consolidation.per_tag``, else
    the general adapter) that has at least ``consolidation.min_examples`` examples to train on; 0 or unset:
    off. A quiet scope still learns within the hour, and the cost is bounded to one run per scope per hour.
    At most a year (525,600): the scheduler's clock cannot hold much more."""
    min_pending: int | None = within("[0, inf)", 16)
    """Consolidate a scope as soon as this many of its examples are pending (with ``consolidation.per_tag``
    each tag is counted on its own); 0 or unset: off. 16 pending examples give about 13 to train on and 3
    held out: a scope starts learning after a dozen or two of its questions. Before variations
    (``consolidation.variations``) such a run taught the form of the answer, not the task (the live replay's
    first sums adapter, trained on 15 and gated on 4, answered 2 of 24 sums right), and the default was 32;
    now a run of sums trains on 192 and gates on ~45 more, and where a scope's questions cannot be varied,
    the calibrated takeover (``routing.takeover_precision``) keeps a weak first adapter from answering alone."""
    cooldown_minutes: float = within("[0, inf)", 15.0)
    """After a scope's run ends, its pending trigger waits this long before starting the next run of that scope
    (the interval trigger and a scope's first run never wait; 0: off). A run beside serving takes the cores it
    is lent (``lend_cores``), and in a busy scope the examples that arrive during one run are already enough
    for the next: back to back, runs would keep serving slow for good. In the live replay (README) the sums
    scope's second run started 20 s after its first was promoted and trained through the whole last window,
    where System 1's p50 was 1.73 s against 1.01 s before any run."""
    check_seconds: float = within("(0, inf)", 30.0)
    """How often the pending count is checked."""
    process: Literal["child", "thread"] = "child"
    """``child``: each consolidation runs in a separate process (``python -m agent.worker``) at a lower CPU
    priority with few torch threads, built from this same configuration; the serving process follows the
    promotion through the store. ``thread``: in a thread of this process (training then competes with
    serving for the same interpreter and torch thread pool)."""
    nice: int = 10
    """Child process: how much lower its CPU priority is than this process's (``os.nice``; 0-19)."""
    train_threads: int | None = None
    """Child process: torch threads for training; default: half the CPU cores, at least 1 (1 on 2 cores).
    The other half stays free for serving."""
    lend_cores: bool = True
    """Child process, CPU engine: while it runs, serving computes with ``train_threads`` fewer torch threads
    (at least one), so the child gets its cores instead of what a busy server leaves it: at ``nice`` alone,
    beside two clients that kept both cores busy, a training step took 54 s instead of 2.3 s and a scope's
    first run did not finish within the live replay. False: serving keeps every core while a run goes on."""

    pause_for_users: float = within("[0, inf)", 1.0)
    """Child process, CPU engine, with ``lend_cores``: the child pauses while users' requests (and inline System
    2, which a user waits for) are in the engine, which then computes with all its threads, for at most this
    many seconds in all (pauses add up over gaps shorter than that); it then computes as long beside them
    before it may pause again, so a server that is never idle still trains at about half the speed. 0: the
    child computes beside users. With users 1.5 s apart, System 1 took 0.88 s at p50 during a run (1.23 s
    without pauses, 0.87 s with nothing running), and the run 439 s instead of 356 s; at 2 s of pause for
    0.5 s of computing, a run in the live replay (two clients) trained 3x slower than without (README,
    "Serving while training")."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class VLLMConfig:
    """The vLLM engine (``backend = "vllm"``, a GPU): the arguments ``vllm.LLM`` is started with. The defaults
    start a model of up to ~8B parameters on one 80 GB GPU; on a smaller GPU lower ``max_model_len`` (the KV
    cache it reserves) and ``gpu_memory_utilization``."""

    max_model_len: int | None = within("[1, inf)", None)
    """Context window the engine reserves KV cache for; default: the model's own."""
    gpu_memory_utilization: float = within("(0, 1]", 0.85)
    """Share of the GPU's memory vLLM takes (weights, KV cache); what is left serves consolidation, which
    trains beside the engine."""
    tensor_parallel_size: int = within("[1, inf)", 1)
    """GPUs one model is split over."""
    max_loras: int = within("[1, inf)", 4)
    """Adapters in one batch (the serving adapters of several scopes, and one being swapped in)."""
    max_lora_rank: int = within("[1, inf)", 64)
    """Largest adapter rank the engine accepts (``consolidation.rank`` must not exceed it)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights and activations; ``auto``: the model's own (bf16 for most current models)."""
    enforce_eager: bool = False
    """No CUDA graphs: slower decoding, faster start and less memory (useful for tests)."""

    def __post_init__(self) -> None:
        _check_fields(self)

    def engine_kwargs(self) -> dict[str, Any]:
        """The keywords ``agent.backends.vllm.VLLMBackend`` passes on to ``vllm.LLM``."""
        return dataclasses.asdict(self)


@dataclass
class ServerConfig:
    """The OpenAI-compatible HTTP server (``agent serve``)."""

    host: str = "127.0.0.1"
    """Address to bind; ``0.0.0.0`` serves every interface, and needs API keys (``api_key``, ``api_keys``,
    ``api_keys_file``) or ``allow_unauthenticated``: anything but loopback is refused without them."""
    port: int = within("[1, 65535]", 8000)
    """TCP port to listen on."""
    write_behind: bool = True
    """Log plain System 1 answers through a bounded queue committed in batches (thousands of rows a second
    instead of hundreds); a crash loses at most ~50 ms of those logs, never a System 2 example."""
    admin_token: str | None = None
    """Token for ``/admin/*`` (also ``S2AGENT_ADMIN_TOKEN``); admin routes are refused when unset and no API
    key has the ``admin`` right. It opens ``/admin/*`` only, not ``/v1/*``."""
    api_key: str | None = field(default=None, repr=False, metadata={"secret": True})
    """One API key with every right (``agent serve --api-key KEY``, as vLLM's ``--api-key``): ``/v1/*`` then
    needs ``Authorization: Bearer KEY``. Its traffic is recorded under ``key-`` and 12 hex digits of its
    SHA-256, never the key itself."""
    api_keys: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False,
                                               metadata={"check": entry_problems, "secret": True})
    """Named API keys and their rights, ``name = {key_sha256 = "<sha256 hex of the key>", rights = [...]}``
    (``key = "..."`` instead of ``key_sha256`` works, but keeps the secret in the file); also
    ``S2AGENT_API_KEYS`` (the same table as JSON). Rights: ``answer`` (be served), ``teach`` (its traffic may
    become training data), ``steer`` (may set ``s2agent`` route, method, tag), ``admin`` (``/admin/*``;
    never capped per source). Without ``rights`` a key may only be answered. See ``agent/auth.py``."""
    api_keys_file: str | None = None
    """A file holding more keys in the ``api_keys`` format: JSON when it ends in ``.json``, TOML otherwise.
    Read when the server starts."""
    allow_unauthenticated: bool = False
    """Serve a non-loopback address without API keys (``--allow-unauthenticated``). Refused by default:
    without keys, anyone who can reach the port may teach the model and steer System 2."""
    max_body_bytes: int = within("[1, inf)", 1_000_000)
    """Larger request bodies are refused with a 413."""
    max_tokens_limit: int = within("[1, inf)", 1024)
    """Largest ``max_tokens`` a request may ask for."""
    max_prompts: int = within("[1, inf)", 32)
    """Most prompts one ``/v1/completions`` request may carry; more are refused with a 400 naming ``prompt``.
    Each prompt is a generation of its own: without a bound a 30 KB body of 1,500 prompts held the engine
    for 30 s."""
    max_sequences: int = within("[1, inf)", 64)
    """Most sequences one request may ask for (prompts × ``n``); more are refused with a 400 naming ``n``.
    64 is four batches of the default ``max_batch``."""
    max_queued: int = within("[1, inf)", 64)
    """Most generation requests held at once, running or waiting for the engine; one more is answered 503
    with ``Retry-After`` at once, instead of joining a queue that grows while every request in it waits."""
    read_timeout_s: float = within("(0, 3600]", 30.0)
    """A client has this long to send a request's head, and as long again for its body: a slower one gets
    a 408 or its connection closed, so that slow or silent connections cannot pile up."""
    keep_alive_s: float = within("(0, 3600]", 5.0)
    """An idle keep-alive connection is closed after this many seconds without a new request."""
    max_connections: int = within("[1, inf)", 512)
    """Most open connections and requests in flight (uvicorn's ``limit_concurrency``); past it a request is
    answered 503 before it is read, the last line of defence when clients open connections faster than
    the timeouts close them."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class AgentConfig:
    """Everything the runtime needs; every section has working defaults."""

    model: str = "default"
    """``default`` (embedded SmolLM2-135M-Instruct), a local folder, a ``.gguf`` file or a Hugging Face id."""
    backend: Literal["hf", "vllm"] = "hf"
    """``hf`` (transformers + peft, CPU) or ``vllm`` (GPU, ``pip install s2agent[vllm]``)."""
    db: str | None = None
    """SQLite path or SQLAlchemy URL; default ``<data dir>/agent.db``."""
    adapters_dir: str | None = None
    """Where adapter versions live; default ``adapters/`` beside the database file."""
    cache_dir: str | None = None
    """Model cache (the dequantized embedded model); default ``$XDG_CACHE_HOME/s2agent``."""
    threads: int | None = within("[1, inf)", None)
    """Torch CPU threads; default: all cores."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The ``hf`` backend's weights and activations. ``auto``: ``bfloat16`` on a CPU that computes it natively
    (AVX512-BF16 or AMX), ``float32`` elsewhere. On this project's 2-core AMD EPYC (AVX512-BF16)
    a System 1 decode step of the embedded model takes 0.040 s in bfloat16 against 0.069 s in float32, and 3
    rows 0.051 s against 0.138 s (README, "Serving in bfloat16"). Training computes in float32 (bfloat16
    autocast) either way; greedy answers of the two differ in places, so a figure measured in one is not
    exact in the other. (``vllm.dtype`` is vLLM's own.)"""
    system_prompt: str | None = None
    """System message for every chat prompt; default: the model's own chat template default."""
    max_new_tokens: int = within("[1, inf)", 128)
    """System 1's answer length limit."""
    answer_kind: AnswerKind = "text"
    """How answers are compared: ``text``, ``yesno``, ``number``, ``choice`` or ``verdict``."""
    kinds_by_tag: dict[str, AnswerKind] = field(default_factory=dict)
    """Answer kind per task tag, e.g. ``{arithmetic = "number"}``; other tags use ``answer_kind``."""
    max_batch: int = within("[1, inf)", 16)
    """Most sequences decoded together when concurrent requests are batched."""
    batch_wait_ms: float = within("[0, inf)", 5.0)
    """How long a request waits for others to share its forward pass."""
    prefill_chunk: int | None = within("[1, inf)", 256)
    """Most prompt tokens one prefill pass computes (``hf`` backend) before the running rows take a decode step:
    a long prompt delays the others by one chunk, not by its whole prefill. Unset: each prompt in one pass."""
    idle_share: float = within("[0, 0.9]", 0.0)
    """``hf`` backend: share of a busy engine's time that background System 2 labels (``system2.mode =
    "background"``) are guaranteed, beside all of its idle time; 0: idle time only. A user's request then
    takes about ``1 / (1 - idle_share)`` as long while labels wait: back to back, 1.43x at 0.25 and 1.87x at
    0.5 (a label's prefill pass outlasts a user's decode step). In the live replay at 0.25 the labels kept up
    with the traffic, but its users' median answer took 2.74 s in the first window against 1.25-1.50 s with
    idle time only (README, "Serving while training, and background System 2"): for a machine whose spare
    time does not keep up with the labels, and whose users accept slower answers for faster learning."""
    seed: int | None = None
    """Seeds sampling (System 2 and sampled System 1 answers) for reproducible runs; unset: not seeded."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """When a query goes to System 2."""
    system2: System2Config = field(default_factory=System2Config)
    """How System 2 runs."""
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig)
    """How the buffer becomes an adapter."""
    scoping: ScopingConfig = field(default_factory=ScopingConfig)
    """Which scoped adapter serves an untagged input."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """When consolidation runs in the background."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The HTTP server."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine (``backend = "vllm"``)."""

    def __post_init__(self) -> None:
        _check_fields(self)

    def validate(self) -> "AgentConfig":
        """Check every value of every section again (values assigned after construction are checked here);
        raises :class:`ConfigError` naming the first bad key. ``Agent`` calls it before it loads anything."""
        for section, obj in _sections(self):
            _check_fields(obj, prefix=section, source="code")
        return self

    # ----------------------------------------------------------------------------------------
    def answer_kind_for(self, tag: str | None) -> str:
        """How answers of scope ``tag`` are compared: ``kinds_by_tag[tag]``, else ``answer_kind``."""
        return self.kinds_by_tag.get(tag or "", self.answer_kind)

    def db_url(self) -> str:
        return self.db or str(default_data_dir() / "agent.db")

    def db_display(self) -> str:
        """:meth:`db_url` as a banner or a log line may show it: a URL's password replaced by ``***``, so that
        a PostgreSQL password never reaches a terminal or a log collector."""
        return mask_url(self.db_url())

    def adapters_path(self) -> Path:
        if self.adapters_dir:
            return Path(self.adapters_dir)
        db = self.db_url()
        if "://" in db and not db.startswith("sqlite"):
            return default_data_dir() / "adapters"
        return Path(db.split("///", 1)[-1]).expanduser().resolve().parent / "adapters"

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> "AgentConfig":
        """Defaults < TOML file < ``S2AGENT_*`` environment < ``overrides`` (dotted keys allowed).

        Each value is checked as it is read; the first bad one raises :class:`ConfigError` naming the key,
        its source and what it may be, so a loaded config is a valid one."""
        config = cls()
        if path:
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file not found: {path}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
            _apply(config, data, source=str(path))
        environ = os.environ if env is None else env
        for key, value in environ.items():
            if key.startswith("S2AGENT_") and key not in _NOT_CONFIG_ENV:
                dotted = key[len("S2AGENT_"):].lower().replace("__", ".")
                _set_dotted(config, dotted, value, source=key, from_string=True)
        if environ.get("S2AGENT_ADMIN_TOKEN"):
            config.server.admin_token = environ["S2AGENT_ADMIN_TOKEN"]
        if environ.get("S2AGENT_API_KEYS"):
            _set_dotted(config, "server.api_keys", environ["S2AGENT_API_KEYS"], source="S2AGENT_API_KEYS",
                        from_string=True)
        for key, value in (overrides or {}).items():
            if value is not None:
                _set_dotted(config, key, value, source=f"option {key}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "a configuration dict") -> "AgentConfig":
        """The configuration :meth:`to_dict` wrote, as it was: defaults overwritten by ``data`` alone (no file,
        no environment). This is how a child process gets its parent's effective configuration."""
        config = cls()
        _apply(config, data, source=source)
        return config


_NOT_CONFIG_ENV = {"S2AGENT_HOME", "S2AGENT_CACHE_DIR", "S2AGENT_ADMIN_TOKEN", "S2AGENT_API_KEYS",
                   "S2AGENT_TEST_POSTGRES_URL"}


def _apply(obj: Any, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
    for key, value in data.items():
        _set_dotted(obj, f"{prefix}{key}", value, source=source)


def _set_dotted(config: Any, dotted: str, value: Any, source: str, from_string: bool = False) -> None:
    *parents, name = dotted.split(".")
    target = config
    for part in parents:
        if not dataclasses.is_dataclass(target) or part not in _field_types(type(target)):
            raise ConfigError(f"unknown config section {dotted!r} (from {source})")
        target = getattr(target, part)
    if not dataclasses.is_dataclass(target):
        raise ConfigError(f"unknown config key {dotted!r} (from {source}): {'.'.join(parents)} is not a section")
    types = _field_types(type(target))
    if name not in types:
        known = ", ".join(sorted(types))
        raise ConfigError(f"unknown config key {dotted!r} (from {source}); known here: {known}")
    current = getattr(target, name)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config section {dotted!r} must be a table (from {source})")
        _apply(config, value, source, prefix=f"{dotted}.")
        return
    try:
        value = _coerce(types[name], value, dotted, source, from_string)
    except ConfigError:
        if not _fields(type(target))[name].metadata.get("secret"):
            raise
        raise ConfigError(f"config key {dotted!r} (from {source}) expects {types[name]}; the value is not shown, "
                          "it may hold secrets") from None
    _check_value(_fields(type(target))[name], types[name], value, dotted, source)
    setattr(target, name, value)


# --- checks ------------------------------------------------------------------------------------------
@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _sections(config: AgentConfig) -> list[tuple[str, Any]]:
    """``("", config)`` and ``(name, section)`` for each section."""
    found: list[tuple[str, Any]] = [("", config)]
    pending = [(name, getattr(config, name)) for name, tp in _field_types(AgentConfig).items()
               if dataclasses.is_dataclass(tp)]
    while pending:  # sections nest: [system2.teacher]
        name, section = pending.pop(0)
        found.append((name, section))
        pending += [(f"{name}.{sub}", getattr(section, sub)) for sub, tp in _field_types(type(section)).items()
                    if dataclasses.is_dataclass(tp)]
    return found


def _section_name(cls: type) -> str:
    """The key a section class has in ``AgentConfig`` (``RoutingConfig`` -> ``routing``)."""
    return next((name for name, tp in _field_types(AgentConfig).items() if tp is cls), "")


def _check_fields(obj: Any, prefix: str | None = None, source: str = "code") -> None:
    """Check every (non-section) field of one section; the first bad one raises :class:`ConfigError`."""
    section = _section_name(type(obj)) if prefix is None else prefix
    types = _field_types(type(obj))
    for name, f in _fields(type(obj)).items():
        if not dataclasses.is_dataclass(types[name]):
            _check_value(f, types[name], getattr(obj, name), f"{section}.{name}" if section else name, source)


def _choices(tp: Any, f: dataclasses.Field) -> tuple[Any, bool]:
    """The allowed values of a field (None: any) and whether they apply to a dict's values."""
    if "choices" in f.metadata:
        return f.metadata["choices"], typing.get_origin(tp) is dict
    if typing.get_origin(tp) is dict:  # dict[str, Literal[...]]
        tp, per_value = typing.get_args(tp)[1], True
    else:
        per_value = False
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp), per_value
    return None, False


def _check_value(f: dataclasses.Field, tp: Any, value: Any, key: str, source: str) -> None:
    """The one place a value is judged: its allowed values, its range, and for templates, each template."""
    where = f"config key {key!r} (from {source})"
    optional = type(None) in typing.get_args(tp)
    if value is None and optional:
        return
    choices, per_value = _choices(tp, f)
    if choices is not None:
        allowed = ", ".join(map(str, choices))
        if per_value and isinstance(value, Mapping):
            for tag, item in value.items():
                if item not in choices:
                    raise ConfigError(f"{where}: {tag!r} = {item!r} is not one of {allowed}")
        elif not per_value and value not in choices:
            raise ConfigError(f"{where} must be one of {allowed}; got {value!r}")
    interval = f.metadata.get("range")
    if interval is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{where} must be a number in {interval}; got {value!r}")
        if value not in interval:
            raise ConfigError(f"{where} must be in {interval}; got {value!r}")
    check = f.metadata.get("check")
    if check is not None:
        problems = check(value)
        if problems:
            raise ConfigError(f"{where}: {problems[0]}")
    if f.metadata.get("templates"):
        problems = template_problems(value)
        if problems:
            raise ConfigError("; ".join(f"config key '{key}.{name}' (from {source}) {problem}"
                                        for name, problem in problems))


def _coerce(tp: Any, value: Any, key: str, source: str, from_string: bool) -> Any:
    """``value`` as the annotated type (a string from the environment is parsed), or a :class:`ConfigError`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    base = typing.get_origin(tp) or tp
    if optional:
        if value is None or (from_string and str(value).lower() in ("", "none", "null")):
            return None
        base = typing.get_origin(args[0]) or args[0]
    if base is Literal:
        return value  # _check_value names the allowed values
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base in (int, float):
            if isinstance(value, bool) or (base is int and isinstance(value, float)):
                raise ValueError(value)
            return base(value)
        if base is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if base in (list, dict):
            if from_string:
                value = json.loads(value)
            if not isinstance(value, base):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} (from {source}) expects {tp}, got {value!r}") from None
    return value
