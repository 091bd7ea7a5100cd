"""The one protocol every generation backend implements.

It is shaped after vLLM's offline API: a batch of requests in, ``n`` completions per request out, each
request naming the LoRA adapter it runs with. That lets one batch mix adapters, so a hot-swap never
has to wait for, or disturb, requests in flight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from agent.errors import AdapterError
from agent.prompting import Prompt


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request. ``temperature == 0`` is greedy decoding."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None
    """None: only each sampled token's log-prob (``Completion.logprobs``, always there); ``k >= 0``: also each
    token's text and its ``k`` likeliest alternatives (``Completion.tokens``, ``Completion.top_logprobs``)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI's meaning)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was already generated."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling; a tuple so that params stay hashable."""

    @property
    def shapes_logits(self) -> bool:
        """Whether penalties or biases change the logits before a token is picked."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


INTERACTIVE = 0
"""The priority of work a user waits for: System 1 answers, plain completions."""
BACKGROUND = 1
"""The priority of work that can wait a little for it: System 2's samples, evaluation and retention batches."""
IDLE = 2
"""The priority of work nobody waits for: System 2 labelling queries in the background
(``system2.mode = "background"``). The CPU engine runs it only when nothing more urgent runs or waits, so that
labelling takes the time serving leaves idle, not the users' (:mod:`agent.backends.batching`)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    """Name of a loaded adapter, or ``None`` for the base model."""
    priority: int = INTERACTIVE
    """Lower runs first, as in vLLM's priority scheduling. The CPU engine admits lower values first and, while
    rows of a lower value decode, prefills a higher value's prompt a chunk at a time between several of their
    steps; :data:`IDLE` rows wait whole while anything else runs (:mod:`agent.backends.batching`). vLLM's
    scheduler orders and preempts by it."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    """Natural-log probability of each generated token under the sampling distribution's model."""
    finish_reason: str
    """``"stop"`` (end of sequence or a stop string) or ``"length"`` (ran into max_new_tokens)."""
    prompt_tokens: int = 0
    tokens: list[str] | None = None
    """Each generated token's text, when ``SamplingParams.top_logprobs`` asked for it."""
    top_logprobs: list[list[tuple[str, float]]] | None = None
    """Per generated token, its likeliest alternatives (text, log-prob), most likely first."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Backend(Protocol):
    model_name: str
    context_length: int

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Run a batch; returns, per request, ``params.n`` completions.

        A backend that schedules per decode step also has ``submit(request, *, cancel=None, deadline=None)``
        returning a :class:`agent.backends.stream.Handle` (token deltas, ``cancel()``), and takes the same
        ``cancel``/``deadline`` keywords here; :func:`agent.backends.stream.submit` and
        :func:`agent.backends.stream.generate` call any backend that way."""
        ...

    def count_tokens(self, prompt: Prompt) -> int:
        """Number of tokens ``prompt`` takes once templated."""
        ...

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter folder under ``name``; raises :class:`AdapterError` if it is unusable."""
        ...

    def unload_adapter(self, name: str) -> None: ...

    def close(self) -> None: ...


ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""The weights file of a PEFT adapter folder, beside ``adapter_config.json``."""


def validate_adapter_dir(path: str | Path) -> None:
    """Refuse a missing, incomplete or corrupted adapter folder before it reaches PEFT."""
    folder = Path(path)
    config = folder / "adapter_config.json"
    weights = folder / ADAPTER_WEIGHTS
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    if not config.is_file() or not weights.is_file():
        raise AdapterError(f"adapter folder {folder} is incomplete: needs adapter_config.json and {ADAPTER_WEIGHTS}")
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter config {config} is corrupted: {exc}") from exc
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise AdapterError(f"adapter weights {weights} are corrupted: {exc}") from exc
