"""vLLM backend: the optional GPU engine, with a LoRA adapter chosen per request.

What is verified and what is not
--------------------------------
No GPU and no vLLM are available where this project's CI runs, so this module has **not been run
against a real vLLM engine**. It follows vLLM's documented offline API (``vllm>=0.10``):

- ``vllm.LLM(model=..., enable_lora=True, max_loras=..., max_lora_rank=..., max_model_len=...)``;
- ``LLM.generate(prompts, sampling_params, use_tqdm=False, lora_request=[...])`` where ``prompts`` is
  a list of ``vllm.inputs.TokensPrompt(prompt_token_ids=...)``, ``sampling_params`` a list with one
  ``vllm.SamplingParams`` per prompt and ``lora_request`` a list with one
  ``vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)`` (or ``None``) per prompt;
- each returned ``RequestOutput.outputs[i]`` (a ``CompletionOutput``) carries ``token_ids``,
  ``finish_reason`` (``"stop"``/``"length"``), ``stop_reason`` (the matched stop string, a stop token
  id, or ``None`` for end of sequence) and, with ``SamplingParams(logprobs=k)``, ``logprobs``: one
  ``{token_id: Logprob}`` mapping per generated token that holds the sampled token's ``.logprob`` and
  the ``k`` likeliest tokens with their ``.rank``;
- OpenAI's ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` are ``SamplingParams`` fields
  of the same names and meaning;
- vLLM's V1 sampler reports ``raw_logprobs`` by default: the log-softmax of the model's logits before
  temperature, top-k and top-p, which is what the HF backend reports too.

Checked without a GPU: the import guard and this module's mapping logic (``tests/agent/test_backend_vllm.py``),
and every class and keyword this module hands vLLM, against vLLM's real Python API
(``tests/agent/test_vllm_api.py``, run by CI in the environment ``.ci/vllm-api.sh`` builds: vLLM's wheel
without its CUDA dependencies). The behavioural tests (greedy determinism, ``n`` samples, stop strings,
logprobs, per-request adapters) run only where vLLM and a CUDA GPU exist.

Design
------
- Prompts are rendered by :func:`agent.prompting.render_prompt` with the model's own Hugging Face
  tokenizer and handed to vLLM as token ids, so both backends (and training) see byte-identical
  prompts. Generated text is decoded with the same tokenizer and cut at the first stop string the
  same way the HF backend does; the end-of-sequence token is not part of ``token_ids``.
- Adapters: vLLM loads a LoRA lazily the first time a request names it, so :meth:`load_adapter` only
  validates the folder and assigns a fresh integer id; a hot-swap is a new name with a new id.
  Unloading forgets the name at once and asks the engine to drop the weights before the next batch.
- ``vllm.LLM`` is not thread-safe: :meth:`generate` holds a lock around the engine. vLLM batches the
  requests of one call internally, so concurrency comes from passing many requests at once.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from agent.backends.base import (
    Completion,
    GenerationRequest,
    SamplingParams,
    validate_adapter_dir,
)
from agent.errors import AdapterError, PromptTooLongError
from agent.prompting import Prompt, render_prompt

logger = logging.getLogger(__name__)

INSTALL_HINT = "the vLLM backend needs a GPU and `pip install s2agent[vllm]`"


@dataclass(frozen=True)
class _Adapter:
    lora_id: int
    path: str


@dataclass
class _Job:
    """One vLLM request: a slice of one of our requests' ``n`` samples."""

    request: int
    ids: list[int]
    params: SamplingParams
    n: int
    seed: int | None
    lora: Any  # a vllm LoRARequest or None


class VLLMBackend:
    """Implements :class:`agent.backends.base.Backend` on one vLLM engine."""

    def __init__(
        self,
        model_path: str,
        *,
        model_name: str | None = None,
        system_prompt: str | None = None,
        enable_lora: bool = True,
        max_loras: int = 4,
        max_lora_rank: int = 64,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
            from vllm.inputs import TokensPrompt
            from vllm.lora.request import LoRARequest
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        from transformers import AutoTokenizer

        self._vllm_sampling_params = vllm.SamplingParams
        self._tokens_prompt = TokensPrompt
        self._lora_request = LoRARequest
        self.model_path = model_path
        self.model_name = model_name or model_path
        self.system_prompt = system_prompt
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        kwargs: dict[str, Any] = dict(
            model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, **engine_kwargs,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if enable_lora:
            kwargs.update(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank)
        self.llm = vllm.LLM(**kwargs)
        self.context_length = int(max_model_len or _engine_max_model_len(self.llm) or 2048)
        self.eos_ids = _eos_ids(model_path, self.tokenizer)
        self.adapters: dict[str, _Adapter] = {}
        self._ids = itertools.count(1)  # vLLM wants a globally unique lora_int_id > 0
        self._to_remove: list[int] = []
        self._adapters_lock = threading.Lock()
        """Guards the adapter map; never held while the engine runs, so a hot-swap never waits."""
        self._engine_lock = threading.Lock()
        """vLLM's ``LLM`` is not thread-safe: one caller at a time drives the engine."""

    # --- prompts ---------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> list[int]:
        return render_prompt(self.tokenizer, prompt, self.system_prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.render(prompt))

    # --- adapters --------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        if not self.enable_lora:
            raise AdapterError(f"{self.model_name} was started with enable_lora=False; cannot load {name!r}")
        validate_adapter_dir(path)
        rank = _adapter_rank(path)
        if rank is not None and rank > self.max_lora_rank:
            raise AdapterError(
                f"adapter {path} has rank {rank}, above this engine's max_lora_rank={self.max_lora_rank}"
            )
        with self._adapters_lock:
            if name in self.adapters:
                return
            self.adapters[name] = _Adapter(next(self._ids), str(Path(path).resolve()))
        logger.info("registered adapter %s from %s (vLLM loads it on first use)", name, path)

    def unload_adapter(self, name: str) -> None:
        with self._adapters_lock:
            adapter = self.adapters.pop(name, None)
            if adapter is not None:
                self._to_remove.append(adapter.lora_id)

    def close(self) -> None:
        with self._engine_lock:
            llm, self.llm = getattr(self, "llm", None), None
            if llm is None:
                return
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                try:
                    shutdown()
                except Exception:  # noqa: BLE001 - best effort; the process may be exiting anyway
                    logger.debug("vLLM engine shutdown failed", exc_info=True)
            del llm, engine
            import gc

            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass

    # --- generation ------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        if not requests:
            return []
        prompts = [self.render(r.prompt) for r in requests]
        loras: list[Any] = []
        with self._adapters_lock:
            snapshot = dict(self.adapters)
        for request, ids in zip(requests, prompts):
            if len(ids) + request.params.max_new_tokens > self.context_length:
                raise PromptTooLongError(
                    f"prompt of {len(ids)} tokens + {request.params.max_new_tokens} new tokens exceeds the "
                    f"context window of {self.context_length} tokens"
                )
            if request.adapter is None:
                loras.append(None)
                continue
            adapter = snapshot.get(request.adapter)
            if adapter is None:
                raise AdapterError(f"adapter {request.adapter!r} is not loaded")
            loras.append(self._lora_request(request.adapter, adapter.lora_id, adapter.path))
        jobs = self._plan(requests, prompts, loras)
        if not jobs:
            return [[] for _ in requests]
        with self._engine_lock:
            if self.llm is None:
                raise RuntimeError("the vLLM backend is closed")
            self._drop_removed_adapters()
            outputs = self.llm.generate(
                [self._tokens_prompt(prompt_token_ids=job.ids) for job in jobs],
                [self._sampling_params(job) for job in jobs],
                use_tqdm=False,
                lora_request=[job.lora for job in jobs] if any(job.lora is not None for job in jobs) else None,
            )
        results: list[list[Completion]] = [[] for _ in requests]
        for job, output in zip(jobs, outputs):
            for sample in output.outputs:
                results[job.request].append(self._completion(sample, job))
        for i, request in enumerate(requests):
            p = request.params
            if p.temperature <= 0 and len(results[i]) < p.n:  # greedy: one decode, replicated
                first = results[i][0]
                results[i] += [_copy(first) for _ in range(p.n - len(results[i]))]
        return results

    @staticmethod
    def _plan(requests: Sequence[GenerationRequest], prompts: list[list[int]], loras: list[Any]) -> list[_Job]:
        """Turn our requests into vLLM requests.

        - greedy: one sample is decoded and copied ``n`` times (every greedy sample is the same);
        - seeded sampling: sample ``j`` runs as its own request with seed ``seed + j``, as in the HF
          backend, so each sample is reproducible on its own and the ``n`` samples differ;
        - unseeded sampling: one request with ``n`` samples (vLLM shares the prompt's prefill).
        """
        jobs: list[_Job] = []
        for i, (request, ids, lora) in enumerate(zip(requests, prompts, loras)):
            p = request.params
            if p.n < 1:
                continue
            if p.temperature <= 0:
                jobs.append(_Job(i, ids, p, 1, None, lora))
            elif p.seed is not None:
                jobs += [_Job(i, ids, p, 1, p.seed + j, lora) for j in range(p.n)]
            else:
                jobs.append(_Job(i, ids, p, p.n, None, lora))
        return jobs

    def _sampling_params(self, job: _Job):
        p = job.params
        greedy = p.temperature <= 0
        return self._vllm_sampling_params(
            n=job.n,
            temperature=0.0 if greedy else float(p.temperature),
            top_p=1.0 if greedy else float(p.top_p),
            top_k=-1 if greedy or p.top_k <= 0 else int(p.top_k),
            seed=job.seed,
            max_tokens=p.max_new_tokens,
            stop=list(p.stop) or None,
            stop_token_ids=sorted(self.eos_ids),
            logprobs=p.top_logprobs or 0,  # the sampled token's logprob, and the k likeliest when asked
            presence_penalty=float(p.presence_penalty),
            frequency_penalty=float(p.frequency_penalty),
            logit_bias=dict(p.logit_bias) or None,
            skip_special_tokens=True,
        )

    def _completion(self, sample, job: _Job) -> Completion:
        token_ids = list(sample.token_ids)
        logprobs = _sampled_logprobs(sample, token_ids)
        stop_reason = getattr(sample, "stop_reason", None)
        finish = "length" if sample.finish_reason == "length" else "stop"
        # The end-of-sequence token ends a completion but is not part of it (as in the HF backend).
        if finish == "stop" and not isinstance(stop_reason, str) and token_ids and token_ids[-1] in self.eos_ids:
            token_ids.pop()
            logprobs = logprobs[: len(token_ids)]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [text.find(s) for s in job.params.stop if s in text]
        if hits:
            text = text[: min(hits)]
            finish = "stop"
        completion = Completion(text, token_ids, logprobs, finish, len(job.ids))
        k = job.params.top_logprobs
        if k is not None:  # as the HF backend reports them: each token's text, its k likeliest alternatives
            completion.tokens = [self.tokenizer.decode([t]) for t in token_ids]
            completion.top_logprobs = [self._top(step, k) for step in sample.logprobs[: len(token_ids)]]
        return completion

    def _top(self, step: dict[int, Any], k: int) -> list[tuple[str, float]]:
        """The ``k`` likeliest tokens of one step (vLLM returns them with their rank, beside the sampled one)."""
        ranked = sorted((e.rank, token, e.logprob) for token, e in step.items() if e.rank is not None and e.rank <= k)
        return [(self.tokenizer.decode([token]), float(logprob)) for _, token, logprob in ranked]

    def _drop_removed_adapters(self) -> None:
        """Ask the engine to free the weights of unloaded adapters (called with the engine lock held)."""
        with self._adapters_lock:
            pending, self._to_remove = self._to_remove, []
        remove = getattr(getattr(self.llm, "llm_engine", None), "remove_lora", None)
        if not callable(remove):
            return
        for lora_id in pending:
            try:
                remove(lora_id)
            except Exception:  # noqa: BLE001 - an adapter that was never used was never loaded
                logger.debug("vLLM remove_lora(%s) failed", lora_id, exc_info=True)


def _sampled_logprobs(sample, token_ids: list[int]) -> list[float]:
    """The sampled token's logprob at each step, from ``CompletionOutput.logprobs``."""
    steps = getattr(sample, "logprobs", None)
    if steps is None:
        raise RuntimeError("vLLM returned no logprobs although SamplingParams(logprobs=0) asked for them")
    out: list[float] = []
    for token, step in zip(token_ids, steps):
        entry = step[token]
        out.append(float(getattr(entry, "logprob", entry)))
    return out


def _copy(c: Completion) -> Completion:
    return Completion(c.text, list(c.token_ids), list(c.logprobs), c.finish_reason, c.prompt_tokens)


def _engine_max_model_len(llm) -> int | None:
    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    value = getattr(config, "max_model_len", None)
    return int(value) if value else None


def _eos_ids(model_path: str, tokenizer) -> set[int]:
    """The same end-of-sequence set as the HF backend: generation_config's ids plus the tokenizer's."""
    from transformers import AutoConfig, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: transformers falls back to the model config
        eos = getattr(AutoConfig.from_pretrained(model_path), "eos_token_id", None)
    ids: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _adapter_rank(path: str) -> int | None:
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
    ranks = [rank] if isinstance(rank, int) else []
    pattern = config.get("rank_pattern") if isinstance(config, dict) else None
    if isinstance(pattern, dict):
        ranks += [r for r in pattern.values() if isinstance(r, int)]
    return max(ranks) if ranks else None
