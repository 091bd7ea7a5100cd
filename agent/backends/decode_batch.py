"""The state of rows decoded together between two steps, and the three edits iteration-level scheduling needs.

A :class:`DecodeBatch` is rows + one KV cache + the attention mask over it + each row's next position +
each row's pending next-token logits. Scheduling per step (Orca's idea) needs:

- :func:`merge`: rows prefilled just now join rows already decoding. Their caches have different lengths,
  so the shorter is padded *on the left* with masked-out zeros: keys are stored after the rotary
  embedding, and each row keeps its own position ids, so padding changes no row's attention;
- :func:`select`: finished or abandoned rows leave at once;
- :func:`trim`: after rows left, columns that no remaining row attends to (left padding of rows now gone)
  are cut, so a batch that once held a long prompt does not keep paying for it.

Only transformers' plain ``DynamicCache`` layers (full attention) are edited this way; a model with
sliding-window or recurrent layers is refused by :func:`check_mergeable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from agent.backends.base import SamplingParams


@dataclass
class Row:
    """One sequence (one of a request's ``n`` samples) being decoded."""

    owner: Any
    """Who waits for it: the request's index for a plain ``generate``, the scheduler's job otherwise."""
    request: int
    sample: int
    params: SamplingParams
    generator: torch.Generator | None
    adapter: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] | None = None
    top_logprobs: list[list[tuple[str, float]]] | None = None
    text: str | None = None
    """Set when a stop string cut the text, or when the row finished."""
    finish_reason: str | None = None
    emitted: int = 0
    """Characters of the text already streamed to the caller."""


@dataclass
class DecodeBatch:
    rows: list[Row]
    cache: Any
    """A ``transformers.DynamicCache`` with one batch row per entry of ``rows``."""
    mask: torch.Tensor
    """[rows, cache length + 0]: 1 where a row attends (its prompt and tokens), 0 on padding."""
    next_pos: torch.Tensor
    """[rows, 1]: the position id of each row's next token."""
    logits: torch.Tensor
    """[rows, vocabulary]: each row's logits for the token it picks at the next step."""

    def __len__(self) -> int:
        return len(self.rows)


def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def check_mergeable(cache: Any) -> None:
    """Refuse caches whose layers are not plain full-attention ``DynamicLayer``s (see the module docstring)."""
    from transformers.cache_utils import DynamicLayer

    for layer in _layers(cache):
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"continuous batching needs full-attention cache layers, not {type(layer).__name__}")


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(a: DecodeBatch | None, b: DecodeBatch) -> DecodeBatch:
    """``a``'s rows then ``b``'s, in one cache (``a`` may be None: nothing was decoding)."""
    if a is None or not a.rows:
        return b
    check_mergeable(a.cache)
    check_mergeable(b.cache)
    la, lb = a.mask.shape[1], b.mask.shape[1]
    width = max(la, lb)
    for x, y in zip(_layers(a.cache), _layers(b.cache)):
        x.keys = torch.cat([_pad_left(x.keys, width - la, 2), _pad_left(y.keys, width - lb, 2)], dim=0)
        x.values = torch.cat([_pad_left(x.values, width - la, 2), _pad_left(y.values, width - lb, 2)], dim=0)
    mask = torch.cat([_pad_left(a.mask, width - la, 1), _pad_left(b.mask, width - lb, 1)], dim=0)
    return DecodeBatch(a.rows + b.rows, a.cache, mask, torch.cat([a.next_pos, b.next_pos]),
                       torch.cat([a.logits, b.logits]))


def select(batch: DecodeBatch, keep: list[int]) -> DecodeBatch:
    """Only the rows at ``keep`` (indices into ``batch.rows``), with leftover padding trimmed."""
    if len(keep) == len(batch.rows):
        return batch
    index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    if keep:
        batch.cache.batch_select_indices(index)
    out = DecodeBatch([batch.rows[i] for i in keep], batch.cache, batch.mask[index], batch.next_pos[index],
                      batch.logits[index])
    return trim(out)


def trim(batch: DecodeBatch) -> DecodeBatch:
    """Cut the leading cache columns that no row attends to."""
    if not batch.rows:
        return batch
    used = batch.mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else batch.mask.shape[1]
    if first == 0:
        return batch
    for layer in _layers(batch.cache):
        layer.keys = layer.keys[:, :, first:, :]
        layer.values = layer.values[:, :, first:, :]
    batch.mask = batch.mask[:, first:]
    return batch
