"""One configuration object for the whole runtime.

Values come from, in increasing order of precedence: the defaults below, a TOML file
(``--config agent.toml``), environment variables (``S2AGENT_<FIELD>`` for top-level fields,
``S2AGENT_<SECTION>__<FIELD>`` for sections, e.g. ``S2AGENT_ROUTING__THRESHOLD=0.4``), and CLI flags.
Every field is documented where it is defined; that text is what the README's reference shows.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from agent.errors import ConfigError


def default_data_dir() -> Path:
    """``$S2AGENT_HOME``, else ``$XDG_DATA_HOME/s2agent``, else ``~/.local/share/s2agent``."""
    if env := os.environ.get("S2AGENT_HOME"):
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "s2agent"


@dataclass
class RoutingConfig:
    """When does a query leave System 1 for System 2?"""

    router: str = "threshold"
    """``threshold`` (System 2 when confidence < threshold), ``always`` (bootstrap a task) or ``never``."""
    estimator: str = "logprob"
    """``logprob``: a low quantile of System 1's token probabilities (no extra generation);
    ``agreement``: share of ``agreement_samples`` sampled System 1 answers that match the greedy one."""
    threshold: float = 0.5
    """Confidence below which System 2 runs. ``agent calibrate`` fits it from the store."""
    quantile: float = 0.1
    """Quantile of token probabilities used by the ``logprob`` estimator (0 = the minimum)."""
    agreement_samples: int = 4
    """Samples drawn by the ``agreement`` estimator."""


@dataclass
class System2Config:
    """How System 2 runs and which of its outputs become training data."""

    method: str = "cot"
    """Default method: ``cot``, ``rar``, ``s2a``, ``bsm`` or ``pal`` (the one that beats System 1 with
    the embedded 135M model on its task families)."""
    methods_by_tag: dict[str, str] = field(default_factory=dict)
    """Method per task tag, e.g. ``{arithmetic = "pal"}``."""
    samples: int = 8
    """System 2 samples per query (the paper uses 8)."""
    agreement_threshold: float = 0.75
    """Share of samples that must agree for the answer to be kept as a training example."""
    temperature: float = 0.7
    """Sampling temperature of System 2 runs (the samples must differ for a vote to mean anything)."""
    top_k: int = 40
    max_new_tokens: int | None = None
    """Length limit of each System 2 generation; default: each method's own (PAL 160, CoT 256, ...)."""
    timeout_s: float = 300.0
    """A System 2 run taking longer than this falls back to the System 1 answer."""
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    """Prompt overrides per method, e.g. ``[system2.prompts.cot] user = "...{question}..."``."""
    mode: Literal["inline", "background"] = "inline"
    """``inline``: when the router sends a query to System 2, the user waits for System 2's answer (the
    paper's loop: the better answer now, and a training example). ``background``: the user gets System 1's
    answer at once and the query is labelled later by System 2 from a bounded queue (training data
    without the wait, but the user keeps System 1's less reliable answer). Only the router's decisions are
    deferred: a request for ``route="system2"`` always runs inline."""
    queue_size: int = 256
    """Background mode: queries waiting for a System 2 label; when full, new ones are dropped (and counted).
    At about one second per label on 2 CPU cores this is a few minutes of backlog."""
    workers: int = 1
    """Background mode: threads labelling queued queries. Their generations share the backend (and its
    micro-batcher) with serving, so more workers mostly queue up behind the same cores."""


@dataclass
class ConsolidationConfig:
    """How the buffer is distilled into a LoRA adapter, and when that adapter may serve."""

    min_examples: int = 16
    """Refuse to train on fewer pending examples."""
    holdout_fraction: float = 0.2
    """Seeded share of pending examples kept out of training to gate the candidate."""
    replay_ratio: float = 0.5
    """Earlier ``used`` examples mixed in, per new example (replay against forgetting)."""
    retention_ratio: float = 0.25
    """Retention examples (System 1's own confident answers) mixed in, per task example."""
    retention_threshold: float = 0.9
    """The candidate must keep this share of the serving model's answers on the retention holdout."""
    retention_prompts: int = 64
    """How many retention prompts (store history first, then the 128 shipped general prompts) are used;
    about half train, the other half is the retention holdout that gates the candidate."""
    gate_margin: float = 0.0
    """The candidate may be at most this much less accurate than the serving model on the holdout."""
    eval_file: str | None = None
    """Optional fixed JSONL eval set (``input``, ``answer``) the candidate must not get worse on."""
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    epochs: int = 3
    learning_rate: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    """Training sequences are cut to this many tokens."""
    resume: bool = False
    """Start from the serving adapter's weights instead of a fresh adapter."""
    bf16: str = "auto"
    """``auto`` (bf16 autocast when the CPU supports it), ``on`` or ``off``."""
    seed: int = 0
    per_tag: bool = False
    """Train one scoped adapter per task tag instead of one general adapter."""


@dataclass
class ScopingConfig:
    """Which scoped adapter (``consolidation.per_tag``) serves an input that came without a tag."""

    classifier: bool = False
    """Send an untagged input to a scoped adapter when it resembles that tag's training inputs more than
    any untagged input (nearest neighbour over character n-grams, see ``policies/scoping.py``)."""
    min_similarity: float = 0.6
    """Cosine similarity to the nearest training input of a tag needed to assign that tag."""
    inputs_per_tag: int = 500
    """Inputs per tag (and untagged ones) the classifier compares against; refitted when adapters change."""


@dataclass
class SchedulerConfig:
    """Background consolidation (``agent serve`` and embedded agents that ask for it)."""

    enabled: bool = True
    """Whether ``agent serve`` consolidates in the background (``--no-train`` sets it false: a replica that
    only serves, following the promotions another process makes in the shared store). An embedded
    ``Agent`` never starts the scheduler by itself, whatever this says: call ``Agent.start_scheduler()``."""
    interval_minutes: float | None = 60.0
    """Every this many minutes, consolidate each scope (each task tag with ``consolidation.per_tag``, else
    the general adapter) that has at least ``consolidation.min_examples`` examples to train on; 0 or unset:
    off. A quiet scope still learns within the hour, and the cost is bounded to one run per scope per hour."""
    min_pending: int | None = 64
    """Consolidate a scope as soon as this many of its examples are pending (with ``consolidation.per_tag``
    each tag is counted on its own); 0 or unset: off. 64 pending examples give about 51 to train on and 13
    held out for the gate (``consolidation.min_examples`` is 16). In ``agent bench loop`` on addition a round
    of 31 new examples trained a worse candidate that the gate refused; the first round, ~95, was promoted."""
    check_seconds: float = 30.0
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


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None
    """Token for ``/admin/*`` (also ``S2AGENT_ADMIN_TOKEN``); admin routes are refused when unset."""
    max_body_bytes: int = 1_000_000
    max_tokens_limit: int = 1024
    """Largest ``max_tokens`` a request may ask for."""


@dataclass
class AgentConfig:
    """Everything the runtime needs; every section has working defaults."""

    model: str = "default"
    """``default`` (embedded SmolLM2-135M-Instruct), a local folder, a ``.gguf`` file or a Hugging Face id."""
    backend: str = "hf"
    """``hf`` (transformers + peft, CPU) or ``vllm`` (GPU, ``pip install s2agent[vllm]``)."""
    db: str | None = None
    """SQLite path or SQLAlchemy URL; default ``<data dir>/agent.db``."""
    adapters_dir: str | None = None
    """Where adapter versions live; default ``adapters/`` beside the database file."""
    cache_dir: str | None = None
    """Model cache (the dequantized embedded model); default ``$XDG_CACHE_HOME/s2agent``."""
    threads: int | None = None
    """Torch CPU threads; default: all cores."""
    system_prompt: str | None = None
    """System message for every chat prompt; default: the model's own chat template default."""
    max_new_tokens: int = 128
    """System 1's answer length limit."""
    answer_kind: str = "text"
    """How answers are compared: ``text``, ``yesno``, ``number``, ``choice`` or ``verdict``."""
    kinds_by_tag: dict[str, str] = field(default_factory=dict)
    max_batch: int = 16
    """Most sequences decoded together when concurrent requests are batched."""
    batch_wait_ms: float = 5.0
    """How long a request waits for others to share its forward pass."""
    seed: int | None = None
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    system2: System2Config = field(default_factory=System2Config)
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig)
    scoping: ScopingConfig = field(default_factory=ScopingConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    # ----------------------------------------------------------------------------------------
    def db_url(self) -> str:
        return self.db or str(default_data_dir() / "agent.db")

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
        """Defaults < TOML file < ``S2AGENT_*`` environment < ``overrides`` (dotted keys allowed)."""
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


_NOT_CONFIG_ENV = {"S2AGENT_HOME", "S2AGENT_CACHE_DIR", "S2AGENT_ADMIN_TOKEN", "S2AGENT_TEST_POSTGRES_URL"}


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
    setattr(target, name, _coerce(types[name], value, dotted, source, from_string))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, key: str, source: str, from_string: bool) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    base = typing.get_origin(tp) or tp
    if optional:
        if value is None or (from_string and str(value).lower() in ("", "none", "null")):
            return None
        base = typing.get_origin(args[0]) or args[0]
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
                import json

                value = json.loads(value)
            if not isinstance(value, base):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} (from {source}) expects {tp}, got {value!r}") from None
    return value
