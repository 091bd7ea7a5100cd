"""Generation backends: one protocol (:mod:`agent.backends.base`), two engines.

- ``hf``: transformers + PEFT, CPU by default (:mod:`agent.backends.hf`);
- ``vllm``: GPU, multi-LoRA with per-request adapters (:mod:`agent.backends.vllm`, optional extra).
"""

from __future__ import annotations

from agent.backends.base import Backend, Completion, GenerationRequest, SamplingParams
from agent.errors import AdapterError, ConfigError, PromptTooLongError
from agent.prompting import Message, Prompt

__all__ = [
    "AdapterError",
    "Backend",
    "Completion",
    "GenerationRequest",
    "Message",
    "Prompt",
    "PromptTooLongError",
    "SamplingParams",
    "make_backend",
]


def make_backend(kind: str, model_path: str, *, model_name: str, system_prompt: str | None = None,
                 threads: int | None = None, max_batch: int = 16, batch_wait_ms: float = 5.0) -> Backend:
    """Build the backend named in the config (``hf`` or ``vllm``)."""
    if kind == "hf":
        from agent.backends.batching import BatchingBackend
        from agent.backends.hf import HFBackend

        engine = HFBackend(model_path, model_name=model_name, system_prompt=system_prompt, threads=threads)
        return BatchingBackend(engine, max_batch=max_batch, max_wait_ms=batch_wait_ms)
    if kind == "vllm":
        from agent.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, model_name=model_name, system_prompt=system_prompt)
    raise ConfigError(f"unknown backend {kind!r}; choose 'hf' or 'vllm'")
