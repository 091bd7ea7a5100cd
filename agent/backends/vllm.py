"""vLLM backend: the optional GPU engine, on vLLM's async engine, with a LoRA adapter chosen per request.

What is verified and what is not
--------------------------------
No GPU is available where this project's CI runs. This module has run against a real engine once (vLLM 0.26.0
on an H200: ``bench/gpu_check.sh`` and the behavioural tests below passed; the README has the figures). It
follows vLLM's online-serving API (``vllm==0.33``), the one vLLM's own OpenAI server drives:

- ``AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., enable_lora=True, max_loras=..., max_lora_rank=...,
  max_model_len=..., gpu_memory_utilization=..., ...))`` (``vllm.v1.engine.async_llm``);
- ``AsyncLLM.generate(TokensPrompt(prompt_token_ids=...), SamplingParams(...), request_id,
  lora_request=LoRARequest(name, int_id, path) | None, priority=...)``: an async generator of ``RequestOutput`` whose
  ``outputs`` (``CompletionOutput``: ``index``, cumulative ``token_ids``, ``finish_reason``, ``stop_reason``,
  ``logprobs``) grow as the engine decodes; cancelling the task that iterates it aborts the request in the
  engine (vLLM catches the ``CancelledError`` and calls ``abort``);
- ``AsyncLLM.add_lora``/``remove_lora`` load and free an adapter's weights; ``shutdown`` stops the engine;
- with ``SamplingParams(logprobs=k)`` each step of ``CompletionOutput.logprobs`` maps token ids to ``Logprob``
  (the sampled token's ``.logprob``, the ``k`` likeliest with their ``.rank``); vLLM's V1 sampler reports raw
  log-probs (before temperature, top-k, top-p), as the HF backend does; OpenAI's ``presence_penalty``,
  ``frequency_penalty`` and ``logit_bias`` are ``SamplingParams`` fields of the same names.

Checked without a GPU: this module's logic against a scripted stand-in of that API
(``tests/agent/test_backend_vllm.py``), and every class, keyword and call it hands vLLM against vLLM's real
Python API (``tests/agent/test_vllm_api.py``, run by CI in the environment ``.ci/vllm-api.sh`` builds: the
wheel without its CUDA dependencies). The behavioural tests (greedy determinism, ``n`` samples, stop strings,
adapters) run only where vLLM and a CUDA GPU exist.

Design
------
- **One engine, many callers.** The agent calls backends from threads (the server's thread pool, the
  background labeller); the engine lives on an asyncio loop in one thread of its own. :meth:`submit` hands the
  request to that loop and returns a :class:`~agent.backends.stream.Handle` at once: text deltas as the engine
  decodes, the result, ``cancel()``. vLLM batches whatever requests are running at each step (continuous
  batching on the GPU), so concurrent callers share it without any lock here.
- **Cancellation.** A request whose caller cancels (the handle, its ``cancel`` event, a passed deadline;
  checked every :data:`WATCH_S`) has its task cancelled, which aborts it in the engine.
- **Prompts** are rendered by :func:`agent.prompting.render_prompt` with the model's own Hugging Face
  tokenizer and handed over as token ids, so both backends (and training) see byte-identical prompts; text
  is decoded with the same tokenizer and cut at the first stop string as the HF backend does; the
  end-of-sequence token is not part of ``token_ids``.
- **Adapters.** :meth:`load_adapter` loads the weights into the engine (``add_lora``) under a fresh integer
  id, so an adapter that does not load is refused there (the agent's load-then-commit hot-swap relies on it)
  and a hot-swap is a new name with a new id; :meth:`unload_adapter` refuses new requests for the name at once
  and frees the weights when no running request uses them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Coroutine, Sequence, TypeVar

from agent.backends.base import (
    Completion,
    GenerationRequest,
    SamplingParams,
    validate_adapter_dir,
)
from agent.backends.stream import Delta, Handle, results, text_delta
from agent.errors import AdapterError, PromptTooLongError
from agent.prompting import Prompt, render_prompt

logger = logging.getLogger(__name__)

INSTALL_HINT = "the vLLM backend needs a GPU and `pip install s2agent[vllm]`"
WATCH_S = 0.05
"""How often a running request checks its caller's cancel event and deadline."""
T = TypeVar("T")


@dataclass(frozen=True)
class _Adapter:
    lora_id: int
    path: str


@dataclass
class _Job:
    """One vLLM request: a slice of one of our requests' ``n`` samples."""

    ids: list[int]
    params: SamplingParams
    n: int
    seed: int | None
    lora: Any  # a vllm LoRARequest or None
    first: int = 0
    """The index of its first sample among the request's ``n``."""


class VLLMBackend:
    """Implements :class:`agent.backends.base.Backend` (with ``submit``) on one vLLM ``AsyncLLM``."""

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
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.inputs import TokensPrompt
            from vllm.lora.request import LoRARequest
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        from transformers import AutoTokenizer

        self._vllm_sampling_params = vllm.SamplingParams
        # A streamed request reads the engine's output at every step; any other only its last, as vLLM's own
        # server asks for it: the engine's process then sends nothing, and this loop does nothing, per step.
        self._output_kind = {True: RequestOutputKind.CUMULATIVE, False: RequestOutputKind.FINAL_ONLY}
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
            gpu_memory_utilization=gpu_memory_utilization,
            scheduling_policy="priority",  # GenerationRequest.priority: System 1 before System 2's samples
        ) | engine_kwargs
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if enable_lora:
            kwargs.update(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank)
        args = AsyncEngineArgs(**kwargs)  # a keyword vLLM does not take fails here, before any thread starts
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s2agent-vllm", daemon=True)
        self._thread.start()
        try:
            self.engine = self._wait(_build_engine(AsyncLLM, args))
        except BaseException:
            self._stop_loop()
            raise
        engine_len = getattr(getattr(self.engine, "model_config", None), "max_model_len", None)
        self.context_length = int(max_model_len or engine_len or 2048)
        self.eos_ids = _eos_ids(model_path, self.tokenizer)
        self.adapters: dict[str, _Adapter] = {}
        self._ids = itertools.count(1)  # vLLM wants a globally unique lora_int_id > 0
        self._request_ids = itertools.count()
        self._adapters_lock = threading.Lock()
        self._running: Counter[int] = Counter()
        """Adapter id -> requests running with it (the loop's thread only)."""
        self._to_remove: set[int] = set()
        """Unloaded adapters whose weights are freed once their last request ends (the loop's thread only)."""
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # --- the engine's loop -----------------------------------------------------------------------------------
    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine's loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

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
            adapter = _Adapter(next(self._ids), str(Path(path).resolve()))
        try:
            loaded = self._wait(self.engine.add_lora(self._lora_request(name, adapter.lora_id, adapter.path)))
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; all mean "unusable adapter"
            raise AdapterError(f"adapter {path} does not load onto {self.model_name}: {exc}") from exc
        if loaded is False:
            raise AdapterError(f"adapter {path} does not load onto {self.model_name}: the engine refused it")
        with self._adapters_lock:
            self.adapters[name] = adapter
        logger.info("loaded adapter %s from %s (vLLM id %d)", name, path, adapter.lora_id)

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` now; free its weights once no running request uses them."""
        with self._adapters_lock:
            adapter = self.adapters.pop(name, None)
        if adapter is not None and not self._closed:
            self._loop.call_soon_threadsafe(self._retire, adapter.lora_id)

    def _retire(self, lora_id: int) -> None:
        if self._running[lora_id]:
            self._to_remove.add(lora_id)
            return
        self._to_remove.discard(lora_id)
        self._spawn(self._remove(lora_id))

    async def _remove(self, lora_id: int) -> None:
        try:
            await self.engine.remove_lora(lora_id)
        except Exception:  # noqa: BLE001 - the weights stay until the engine evicts them; nothing fails
            logger.warning("vLLM could not free adapter id %d", lora_id, exc_info=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Fail what still runs, stop the engine and its loop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wait(self._cancel_all())
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the process may be exiting anyway
            logger.debug("vLLM engine shutdown failed", exc_info=True)
        self._stop_loop()
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- generation ------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, *, cancel: threading.Event | None = None,
               deadline: float | None = None) -> Handle:
        """Start ``request`` and return at once: its handle streams text deltas, gives the result, cancels."""
        handle = Handle(request, cancel=cancel, deadline=deadline)
        try:
            jobs = self._jobs(request)
        except Exception as exc:  # noqa: BLE001 - handed to the caller through result()
            handle.fail(exc)
            return handle
        self._start(handle, jobs)
        return handle

    def generate(self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None,
                 deadline: float | None = None) -> list[list[Completion]]:
        """Run ``requests`` concurrently on the engine; a bad one is refused before any runs, the first failure
        is raised and the others are cancelled."""
        planned = [self._jobs(r) for r in requests]
        handles = [Handle(r, cancel=cancel, deadline=deadline, stream=False) for r in requests]
        for handle, jobs in zip(handles, planned):
            self._start(handle, jobs)
        return results(handles)

    def _start(self, handle: Handle, jobs: list[_Job]) -> None:
        if self._closed:
            raise RuntimeError("the vLLM backend is closed")
        self._loop.call_soon_threadsafe(self._begin, handle, jobs)

    def _begin(self, handle: Handle, jobs: list[_Job]) -> None:
        """On the loop, in submission order: count the request's adapters as in use before anything later (an
        unload) can look, then run it."""
        if self._closed:  # queued just before close() cancelled what runs
            handle.fail(RuntimeError("the vLLM backend is closed"))
            return
        loras = [job.lora.lora_int_id for job in jobs if job.lora is not None]
        self._running.update(loras)
        self._spawn(self._serve(handle, jobs, loras))

    def _jobs(self, request: GenerationRequest) -> list[_Job]:
        """``request`` as vLLM requests, after checking it fits the context and its adapter is loaded.

        - greedy: one sample is decoded and stands for all ``n`` (every greedy sample is the same);
        - seeded sampling: sample ``j`` runs as its own request with seed ``seed + j``, as in the HF
          backend, so each sample is reproducible on its own and the ``n`` samples differ;
        - unseeded sampling: one request with ``n`` samples (vLLM shares the prompt's prefill).
        """
        ids = self.render(request.prompt)
        p = request.params
        if len(ids) + p.max_new_tokens > self.context_length:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens + {p.max_new_tokens} new tokens exceeds the "
                f"context window of {self.context_length} tokens"
            )
        lora = None
        if request.adapter is not None:
            with self._adapters_lock:
                adapter = self.adapters.get(request.adapter)
            if adapter is None:
                raise AdapterError(f"adapter {request.adapter!r} is not loaded")
            lora = self._lora_request(request.adapter, adapter.lora_id, adapter.path)
        if p.n < 1:
            return []
        if p.temperature <= 0:
            return [_Job(ids, p, 1, None, lora)]
        if p.seed is not None:
            return [_Job(ids, p, 1, p.seed + j, lora, first=j) for j in range(p.n)]
        return [_Job(ids, p, p.n, None, lora)]

    async def _serve(self, handle: Handle, jobs: list[_Job], loras: list[int]) -> None:
        """Run one request's ``jobs`` on the engine: stream its text, then finish (or fail) its handle; ``loras``:
        the adapter ids it holds in use (:meth:`_begin`), released at the end."""
        p = handle.request.params
        copies = p.n if p.temperature <= 0 else 1  # a greedy decode stands for all n samples
        done: list[Completion | None] = [None] * p.n
        emitted = [0] * p.n

        async def run(job: _Job) -> None:
            request_id = f"s2agent-{next(self._request_ids)}"
            async for output in self.engine.generate(self._tokens_prompt(prompt_token_ids=job.ids),
                                                     self._sampling_params(job, handle.stream), request_id,
                                                     lora_request=job.lora, priority=handle.request.priority):
                for sample in output.outputs:
                    final = sample.finish_reason is not None
                    completion = self._completion(sample, job) if final else None
                    for index in range(job.first + sample.index, job.first + sample.index + copies):
                        if handle.stream:
                            text = completion.text if completion else _cut(self._decode(sample.token_ids), p.stop)
                            piece, emitted[index] = text_delta(text, emitted[index], p.stop, final)
                            if piece or final:
                                handle.publish(Delta(index, piece, len(sample.token_ids),
                                                     completion.finish_reason if completion else None))
                        if completion is not None:
                            done[index] = completion if index == job.first + sample.index else _copy(completion)

        runs = [asyncio.ensure_future(run(job)) for job in jobs]
        try:
            while not all(r.done() for r in runs):
                await asyncio.wait(runs, timeout=WATCH_S, return_when=asyncio.FIRST_EXCEPTION)
                failed = [r for r in runs if r.done() and not r.cancelled() and r.exception() is not None]
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
                if handle.expired():
                    handle.fail(handle.why_dropped())
                    return
            if any(c is None for c in done):
                raise RuntimeError("vLLM ended a request without finishing all of its samples")
            handle.finish([c for c in done if c is not None])
        except asyncio.CancelledError:
            handle.fail(RuntimeError("the vLLM backend closed before the request finished"))
            raise
        except Exception as exc:  # noqa: BLE001 - a failed request fails its caller, not the engine's loop
            handle.fail(exc)
        finally:
            for r in runs:
                r.cancel()  # aborts in the engine whatever still runs
            await asyncio.gather(*runs, return_exceptions=True)
            self._running.subtract(loras)
            for lora_id in set(loras) & self._to_remove:
                if not self._running[lora_id]:
                    self._retire(lora_id)

    def _sampling_params(self, job: _Job, stream: bool):
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
            output_kind=self._output_kind[stream],
        )

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _completion(self, sample, job: _Job) -> Completion:
        token_ids = list(sample.token_ids)
        logprobs = _sampled_logprobs(sample, token_ids)
        stop_reason = getattr(sample, "stop_reason", None)
        finish = "length" if sample.finish_reason == "length" else "stop"
        # The end-of-sequence token ends a completion but is not part of it (as in the HF backend).
        if finish == "stop" and not isinstance(stop_reason, str) and token_ids and token_ids[-1] in self.eos_ids:
            token_ids.pop()
            logprobs = logprobs[: len(token_ids)]
        full = self._decode(token_ids)
        text = _cut(full, job.params.stop)
        if len(text) < len(full):
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


async def _build_engine(engine_class: Any, args: Any) -> Any:
    """Build the engine on the loop that will drive it (its output handler is a task of that loop)."""
    return engine_class.from_engine_args(args)


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string (as the HF backend cuts it)."""
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


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
