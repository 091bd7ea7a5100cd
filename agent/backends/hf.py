"""Transformers + PEFT backend: the CPU default.

Decoding is a small explicit loop instead of ``model.generate`` for three reasons that matter here:
- ``n`` samples of one prompt share a single prefill: the prompt's KV cache is computed once and its
  rows are repeated (``generate(num_return_sequences=k)`` recomputes a long few-shot prompt k times);
- each sequence stops at its own stop string and leaves the batch, instead of every sample being
  decoded to ``max_new_tokens``;
- one batch may mix LoRA adapters (PEFT's per-row ``adapter_names``), so a hot-swap needs no pause.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from agent.backends.base import (
    Completion,
    GenerationRequest,
    SamplingParams,
    validate_adapter_dir,
)
from agent.errors import AdapterError, PromptTooLongError
from agent.prompting import Prompt, render_prompt

logger = logging.getLogger(__name__)

BASE = "__base__"
MIN_SHARED_PREFIX = 32
"""Below this many shared prompt tokens, a separate prefix pass costs more than it saves."""
"""PEFT's name for "no adapter" in a mixed-adapter batch."""


@dataclass
class _Row:
    """One sequence being decoded."""

    request: int
    params: SamplingParams
    generator: torch.Generator | None
    adapter: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int
    text: str | None = None
    """Set early when a stop string cut the text; otherwise decoded at the end."""
    finish_reason: str | None = None


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
            self.model.delete_adapter(name)
            if self.adapters:
                self.model.set_adapter(next(iter(self.adapters)))
            else:  # no adapter left: take the LoRA layers out again, so the base model runs bare
                self.base_model = self.model.unload()
                self.model = self.base_model

    def close(self) -> None:
        pass

    # --- generation ------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        prompts = [self.render(r.prompt) for r in requests]
        for request, ids in zip(requests, prompts):
            if len(ids) + request.params.max_new_tokens > self.context_length:
                raise PromptTooLongError(
                    f"prompt of {len(ids)} tokens + {request.params.max_new_tokens} new tokens exceeds the "
                    f"context window of {self.context_length} tokens"
                )
            if request.adapter is not None and request.adapter not in self.adapters:
                raise AdapterError(f"adapter {request.adapter!r} is not loaded")
        with self._lock, torch.inference_mode():
            rows = self._decode(requests, prompts)
        out: list[list[Completion]] = [[] for _ in requests]
        for row in rows:
            out[row.request].append(
                Completion(row.text, row.token_ids, row.logprobs, row.finish_reason or "length", row.prompt_tokens)
            )
        return out

    def _forward(self, **kwargs):
        if self.model is not self.base_model:
            return self.model(**kwargs)
        kwargs.pop("adapter_names", None)
        return self.model(**kwargs)

    def _decode(self, requests: Sequence[GenerationRequest], prompts: list[list[int]]) -> list[_Row]:
        from transformers import DynamicCache

        pad = self.tokenizer.pad_token_id
        adapters = [r.adapter or BASE for r in requests]
        cache = DynamicCache()
        # Few-shot prompts (PAL, CoT) share a long prefix across queries: prefill it once, for the whole
        # batch, when every row runs with the same adapter (LoRA changes the prefix's keys and values).
        shared = _common_prefix(prompts) if len(set(adapters)) == 1 and len(prompts) > 1 else 0
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        if shared:
            head = torch.tensor([prompts[0][:shared]], device=self.device)
            self._forward(input_ids=head, cache=cache, use_cache=True, adapter_names=adapters[:1], logits_to_keep=1)
            cache.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=self.device))
        tails = [p[shared:] for p in prompts]
        width = max(len(t) for t in tails)
        input_ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=self.device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(t)) + [1] * len(t) for t in tails], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        out = self._forward(
            input_ids=input_ids, attention_mask=mask, position_ids=positions,
            cache=cache, use_cache=True, adapter_names=adapters, logits_to_keep=1,
        )
        # Share each prompt's prefill among its n samples.
        repeat = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.params.n)], device=self.device)
        rows: list[_Row] = []
        for i, request in enumerate(requests):
            p = request.params
            # One generator per request, drawn from in row order: a seed fixes all n samples, and
            # neighbouring seeds share none of them.
            generator = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
            for _ in range(p.n):
                rows.append(_Row(i, p, generator, adapters[i], [], [], len(prompts[i])))
        cache.batch_select_indices(repeat)
        logits = out.logits[:, -1, :].float()[repeat]
        mask = mask[repeat]
        next_pos = positions[repeat][:, -1:] + 1
        active = list(range(len(rows)))
        max_stop = max((len(s) for r in rows for s in r.params.stop), default=0)
        while active:
            logprobs = torch.log_softmax(logits, dim=-1)
            tokens = [self._pick(logits[k], rows[i]) for k, i in enumerate(active)]
            still: list[int] = []
            for k, i in enumerate(active):
                row, token = rows[i], tokens[k]
                if token in self.eos_ids:
                    row.finish_reason = "stop"
                    continue
                row.token_ids.append(token)
                row.logprobs.append(float(logprobs[k, token]))
                if row.params.stop and self._hit_stop(row, max_stop):
                    continue
                if len(row.token_ids) >= row.params.max_new_tokens:
                    row.finish_reason = "length"
                    continue
                still.append(k)
            if not still:
                break
            keep = torch.tensor(still, device=self.device)
            if len(still) < len(active):
                cache.batch_select_indices(keep)
                mask, next_pos = mask[keep], next_pos[keep]
            active = [active[k] for k in still]
            step = torch.tensor([[rows[i].token_ids[-1]] for i in active], device=self.device)
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=self.device)], dim=1)
            out = self._forward(
                input_ids=step, attention_mask=mask, position_ids=next_pos,
                cache=cache, use_cache=True, adapter_names=[rows[i].adapter for i in active], logits_to_keep=1,
            )
            next_pos = next_pos + 1
            logits = out.logits[:, -1, :].float()
        for row in rows:
            if row.text is None:
                row.text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        return rows

    def _hit_stop(self, row: _Row, max_stop: int) -> bool:
        """Check the decoded tail for a stop string; on a hit, cut the text there and finish the row."""
        tail_tokens = row.token_ids[-(max_stop + 8):]
        tail = self.tokenizer.decode(tail_tokens, skip_special_tokens=True)
        if not any(s in tail for s in row.params.stop):
            return False
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        cut = min(text.find(s) for s in row.params.stop if s in text)
        row.text = text[:cut]
        row.finish_reason = "stop"
        return True

    @staticmethod
    def _pick(logits: torch.Tensor, row: _Row) -> int:
        p = row.params
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        scores = logits / p.temperature
        if p.top_k and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, index = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(ordered, dim=-1) > p.top_p
            scores = scores.scatter(0, index[drop], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator))


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix all prompts share, leaving each at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    first = prompts[0]
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n
