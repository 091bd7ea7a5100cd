"""Generation backends: one protocol (:mod:`agent.backends.base`), two engines.

- ``hf``: transformers + PEFT, CPU by default (:mod:`agent.backends.hf`);
- ``vllm``: GPU, multi-LoRA with per-request adapters (:mod:`agent.backends.vllm`, optional extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.backends.base import BACKGROUND, IDLE, INTERACTIVE, Backend, Completion, GenerationRequest, SamplingParams
from agent.errors import AdapterError, ConfigError, PromptTooLongError
from agent.prompting import Message, Prompt

if TYPE_CHECKING:
    from agent.config import AgentConfig

__all__ = [
    "BACKGROUND",
    "IDLE",
    "INTERACTIVE",
    "AdapterError",
    "Backend",
    "Completion",
    "GenerationRequest",
    "Message",
    "Prompt",
    "PromptTooLongError",
    "SamplingParams",
    "backend_for",
    "make_backend",
    "serving_dtype",
]


def make_backend(kind: str, model_path: str, *, model_name: str, system_prompt: str | None = None,
                 threads: int | None = None, max_batch: int = 16, batch_wait_ms: float = 5.0,
                 prefill_chunk: int | None = 256, idle_share: float = 0.0, dtype: str = "auto",
                 vllm_engine: dict[str, Any] | None = None) -> Backend:
    """Build the backend named in the config (``hf`` or ``vllm``); ``dtype``: the ``hf`` engine's
    (:attr:`agent.config.AgentConfig.dtype`); ``vllm_engine``: the ``[vllm]`` section's engine arguments
    (:meth:`agent.config.VLLMConfig.engine_kwargs`)."""
    if kind == "hf":
        from agent.backends.batching import BatchingBackend
        from agent.backends.hf import HFBackend, cpu_dtype

        engine = HFBackend(model_path, model_name=model_name, system_prompt=system_prompt, threads=threads,
                           dtype=cpu_dtype(dtype))
        return BatchingBackend(engine, max_batch=max_batch, max_wait_ms=batch_wait_ms, prefill_chunk=prefill_chunk,
                               idle_share=idle_share)
    if kind == "vllm":
        from agent.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, model_name=model_name, system_prompt=system_prompt, **(vllm_engine or {}))
    raise ConfigError(f"unknown backend {kind!r}; choose 'hf' or 'vllm'")


def backend_for(config: AgentConfig, model_path: str) -> Backend:
    """The backend ``config`` asks for, on the model in ``model_path`` (the agent's, and the benchmarks')."""
    from agent.models import display_name

    return make_backend(config.backend, model_path, model_name=display_name(config.model),
                        system_prompt=config.system_prompt, threads=config.threads, max_batch=config.max_batch,
                        batch_wait_ms=config.batch_wait_ms, prefill_chunk=config.prefill_chunk,
                        idle_share=config.idle_share, dtype=config.dtype, vllm_engine=config.vllm.engine_kwargs())


def serving_dtype(config: AgentConfig) -> str:
    """The dtype the serving model computes in, by name: with the weights, it decides System 1's greedy answers."""
    if config.backend == "vllm":
        return config.vllm.dtype
    from agent.backends.hf import cpu_dtype

    return str(cpu_dtype(config.dtype)).removeprefix("torch.")
