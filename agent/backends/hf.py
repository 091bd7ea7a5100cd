"""Transformers + PEFT backend: the CPU default.

Decoding is a small explicit loop instead of ``model.generate`` for three reasons that matter here:
- ``n`` samples of one prompt share a single prefill: the prompt's KV cache is computed once and its
  rows are repeated (``generate(num_return_sequences=k)`` recomputes a long few-shot prompt k times);
- each sequence stops at its own stop string and leaves the batch, instead of every sample being
  decoded to ``max_new_tokens``;
- one batch may mix LoRA adapters (PEFT's per-row ``adapter_names``), so a hot-swap needs no pause;
- the loop is exposed as steps (:meth:`HFBackend.prefill_steps`, :meth:`HFBackend.step`), so that the
  scheduler (:mod:`agent.backends.batching`) can add rows to a running batch and remove rows from it between
  steps, and prefill a long prompt in chunks with decode steps of other rows in between.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator, Sequence

import torch

from agent.backends.base import Completion, GenerationRequest, validate_adapter_dir
from agent.backends.decode_batch import DecodeBatch, Row, select
from agent.backends.sampling import pick, shape_logits
from agent.errors import AdapterError, PromptTooLongError
from agent.prompting import Prompt, render_prompt

logger = logging.getLogger(__name__)

BASE = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch."""
MIN_SHARED_PREFIX = 32
"""Below this many shared prompt tokens, a separate prefix pass costs more than it saves..."""
MIN_SHARED_SAVING = 256
"""...unless it saves this many prompt tokens in all: System 1's chat template shares 27 tokens, which made
batches of 2 and 4 prompts ~10 % slower when computed apart, and a batch of 16 37 % faster (0.018 -> 0.012 s
per prompt, 3 new tokens each, the embedded model in bfloat16, 2 cores)."""


class HFBackend:
    """Implements :class:`agent.backends.base.Backend` with transformers on CPU (or one GPU)."""

    def __init__(
        self,
        model_path: str,
        *,
        model_name: str | None = None,
        system_prompt: str | None = None,
        threads: int | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_path = model_path
        self.model_name = model_name or model_path
        self.system_prompt = system_prompt
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        # A prefill keeps only its last position's logits (``logits_to_keep=1``): transformers hands the head a
        # strided slice of the hidden states, and torch's CPU bfloat16 matmul takes a slow path for it, ~0.6 s
        # for a batch of 16 against the vocabulary (3 ms on a contiguous copy). That made every System 1 batch
        # ~3x slower once an adapter was loaded. The head gets a contiguous input, a copy of one row per prompt.
        head = self.base_model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_contiguous_input)
        self.model = self.base_model
        self.context_length = int(getattr(self.base_model.config, "max_position_embeddings", 2048))
        eos = self.base_model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.add(self.tokenizer.eos_token_id)
        self.adapters: dict[str, str] = {}
        self._lock = threading.RLock()

    # --- prompts ---------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> list[int]:
        return render_prompt(self.tokenizer, prompt, self.system_prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.render(prompt))

    # --- adapters --------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        validate_adapter_dir(path)
        with self._lock:
            if name in self.adapters:
                return
            from peft import PeftModel

            try:
                if self.model is self.base_model:
                    self.model = PeftModel.from_pretrained(self.base_model, path, adapter_name=name).eval()
                else:
                    self.model.load_adapter(path, adapter_name=name, is_trainable=False)
            except Exception as exc:  # noqa: BLE001 - PEFT raises many kinds; all mean "unusable adapter"
                raise AdapterError(f"adapter {path} does not load onto {self.model_name}: {exc}") from exc
            self.adapters[name] = path
            logger.info("loaded adapter %s from %s", name, path)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if self.adapters.pop(name, None) is None:
                return
            remaining = next(iter(self.adapters), None)
            if remaining is not None and self.model.active_adapter == name:
                self.model.set_adapter(remaining)  # else PEFT picks one itself, with a warning
            self.model.delete_adapter(name)
            if remaining is None:  # no adapter left: take the LoRA layers out again, so the base model runs bare
                self.base_model = self.model.unload()
                self.model = self.base_model

    def close(self) -> None:
        pass

    # --- generation ------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Run ``requests`` as one batch to the end (the scheduler in :mod:`agent.backends.batching` instead
        calls :meth:`prepare`, :meth:`prefill_steps` and :meth:`step` itself, admitting and dropping rows per step)."""
        prompts = [self.prepare(r) for r in requests]
        with self._lock, torch.inference_mode():
            *_, batch = self.prefill_steps([(i, r, p) for i, (r, p) in enumerate(zip(requests, prompts))], chunk=None)
            rows = list(batch.rows)
            while batch is not None and batch.rows:
                batch, _ = self.step(batch)
        out: list[list[Completion]] = [[] for _ in requests]
        for row in rows:
            out[row.request].append(completion(row))
        return out

    def prepare(self, request: GenerationRequest) -> list[int]:
        """``request``'s prompt as token ids, after checking it fits the context and its adapter is loaded."""
        ids = self.render(request.prompt)
        if len(ids) + request.params.max_new_tokens > self.context_length:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens + {request.params.max_new_tokens} new tokens exceeds the "
                f"context window of {self.context_length} tokens"
            )
        if request.adapter is not None and request.adapter not in self.adapters:
            raise AdapterError(f"adapter {request.adapter!r} is not loaded")
        return ids

    def _forward(self, *, adapter_names: Sequence[str], **kwargs):
        """One forward pass of rows that run with ``adapter_names`` (one per row, :data:`BASE` for none).

        Rows of one adapter (a scope's queries, an evaluation) run PEFT's plain path with that adapter active:
        its per-row path splits every LoRA layer's input by adapter, which made such a batch ~20 % slower here.
        A mixed batch, and rows of the base model beside loaded adapters (skipped by that split, cheaper than
        switching the adapters off and on), take the per-row path. Called under :attr:`lock`, so switching
        the active adapter cannot race another pass."""
        if self.model is self.base_model:
            return self.model(**kwargs)
        names = set(adapter_names)
        if len(names) > 1 or BASE in names:
            return self.model(**kwargs, adapter_names=list(adapter_names))
        (name,) = names
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
        return self.model(**kwargs)

    def prefill_steps(self, items: Sequence[tuple[Any, GenerationRequest, list[int]]],
                      chunk: int | None) -> Iterator[DecodeBatch | None]:
        """Forward passes over the prompts of ``items`` (owner, request, prompt ids), at most ``chunk`` prompt
        positions each (None: all at once): yields None after each pass but the last, then a batch of their
        rows, ``n`` per request, each with the logits of its first token. Each ``next`` is called under
        :attr:`lock` and inference mode; the scheduler runs decode steps of other rows between them, so a
        long prompt holds a short request back by one chunk, not by its whole prefill (chunked prefill).

        Prompts that all run with one adapter and share a long prefix (few-shot PAL or CoT prompts) have the
        prefix computed once; each prompt's cache is computed once and repeated for its ``n`` samples."""
        from transformers import DynamicCache

        requests = [r for _, r, _ in items]
        prompts = [p for _, _, p in items]
        pad = self.tokenizer.pad_token_id
        adapters = [r.adapter or BASE for r in requests]
        cache = DynamicCache()
        # LoRA changes the prefix's keys and values: share it only among rows of one adapter.
        shared = _common_prefix(prompts) if len(set(adapters)) == 1 and len(prompts) > 1 else 0
        if shared < MIN_SHARED_PREFIX and shared * (len(prompts) - 1) < MIN_SHARED_SAVING:
            shared = 0
        width = chunk or max(len(p) for p in prompts)
        for start in range(0, shared, width):
            end = min(shared, start + width)
            head = torch.tensor([prompts[0][start:end]], device=self.device)
            self._forward(input_ids=head, cache=cache, use_cache=True, adapter_names=adapters[:1], logits_to_keep=1,
                          position_ids=torch.arange(start, end, device=self.device)[None])
            yield None
        if shared:
            cache.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=self.device))
        tails = [p[shared:] for p in prompts]
        longest = max(len(t) for t in tails)
        input_ids = torch.tensor([[pad] * (longest - len(t)) + t for t in tails], device=self.device)
        mask = torch.tensor([[1] * shared + [0] * (longest - len(t)) + [1] * len(t) for t in tails], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        for start in range(0, longest, width):
            end = min(longest, start + width)
            out = self._forward(
                input_ids=input_ids[:, start:end], attention_mask=mask[:, :shared + end],
                position_ids=positions[:, start:end], cache=cache, use_cache=True, adapter_names=adapters,
                logits_to_keep=1,
            )
            if end < longest:
                yield None
        repeat = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.params.n)], device=self.device)
        rows: list[Row] = []
        for i, (owner, request, _) in enumerate(items):
            p = request.params
            # One generator per request, drawn from in row order: a seed fixes all n samples, and
            # neighbouring seeds share none of them.
            generator = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
            for k in range(p.n):
                detail = p.top_logprobs is not None
                rows.append(Row(owner, i, k, p, generator, adapters[i], len(prompts[i]),
                                tokens=[] if detail else None, top_logprobs=[] if detail else None))
        cache.batch_select_indices(repeat)
        yield DecodeBatch(rows, cache, mask[repeat], positions[repeat][:, -1:] + 1, out.logits[:, -1, :].float()[repeat])

    def step(self, batch: DecodeBatch) -> tuple[DecodeBatch, list[Row]]:
        """Pick each row's next token from its pending logits, let finished rows leave, and run one forward pass
        for the rest. Returns the smaller batch and the rows that finished now (their ``text`` set). Call under
        :attr:`lock` and inference mode."""
        logprobs = torch.log_softmax(batch.logits, dim=-1)
        finished: list[Row] = []
        keep: list[int] = []
        for k, row in enumerate(batch.rows):
            p = row.params
            token = pick(shape_logits(batch.logits[k], p, row.token_ids), p, row.generator)
            if token in self.eos_ids:
                row.finish_reason = "stop"
                finished.append(row)
                continue
            row.token_ids.append(token)
            row.logprobs.append(float(logprobs[k, token]))
            if row.tokens is not None and row.top_logprobs is not None:
                row.tokens.append(self.tokenizer.decode([token]))
                row.top_logprobs.append(self._top(logprobs[k], p.top_logprobs or 0))
            if p.stop and self._hit_stop(row):
                finished.append(row)
                continue
            if len(row.token_ids) >= p.max_new_tokens:
                row.finish_reason = "length"
                finished.append(row)
                continue
            keep.append(k)
        for row in finished:
            if row.text is None:
                row.text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        batch = select(batch, keep)
        if batch.rows:
            step = torch.tensor([[row.token_ids[-1]] for row in batch.rows], device=self.device)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
            out = self._forward(
                input_ids=step, attention_mask=batch.mask, position_ids=batch.next_pos, cache=batch.cache,
                use_cache=True, adapter_names=[row.adapter for row in batch.rows], logits_to_keep=1,
            )
            batch.next_pos = batch.next_pos + 1
            batch.logits = out.logits[:, -1, :].float()
        return batch, finished

    def drop(self, batch: DecodeBatch, owners: set[Any]) -> DecodeBatch:
        """``batch`` without the rows of ``owners`` (callers that went away)."""
        return select(batch, [k for k, row in enumerate(batch.rows) if row.owner not in owners])

    def text_so_far(self, row: Row) -> str:
        """The row's text as decoded now (its final text once it finished)."""
        if row.text is not None:
            return row.text
        return self.tokenizer.decode(row.token_ids, skip_special_tokens=True)

    def _top(self, logprobs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
        return [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]

    def _hit_stop(self, row: Row) -> bool:
        """Check the decoded tail for a stop string; on a hit, cut the text there and finish the row."""
        longest = max(len(s) for s in row.params.stop)
        tail = self.tokenizer.decode(row.token_ids[-(longest + 8):], skip_special_tokens=True)
        if not any(s in tail for s in row.params.stop):
            return False
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        cut = min(text.find(s) for s in row.params.stop if s in text)
        row.text = text[:cut]
        row.finish_reason = "stop"
        return True

    @property
    def lock(self) -> threading.RLock:
        """Held around every forward pass and adapter change: PEFT's adapter set must not change mid-pass."""
        return self._lock


def cpu_dtype(name: str) -> torch.dtype:
    """``name`` (``float32``, ``bfloat16``) as a torch dtype; ``auto``: bfloat16 where the CPU computes it natively
    (AVX512-BF16 or AMX; there a decode step reads half the bytes and MKL's slow float32 paths for 2-3 rows are
    avoided), float32 elsewhere (emulated bfloat16 would be slower than float32)."""
    if name != "auto":
        return getattr(torch, name)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own feature probes
    return torch.bfloat16 if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes) else torch.float32


def completion(row: Row) -> Completion:
    """A finished row as the protocol's :class:`Completion`."""
    return Completion(row.text or "", row.token_ids, row.logprobs, row.finish_reason or "length", row.prompt_tokens,
                      tokens=row.tokens, top_logprobs=row.top_logprobs)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the module's first positional input as a contiguous tensor (a no-op when it already
    is; None, leaving the call as it is, when it has none)."""
    return (args[0].contiguous(), *args[1:]) if args else None


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    first = prompts[0]
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n
