"""Picking one token from a row's logits: penalties and biases, then greedy or temperature/top-k/top-p sampling.

Kept apart from the decode loop so that the rules OpenAI documents for ``presence_penalty``,
``frequency_penalty`` and ``logit_bias`` live in one small place:
``logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``, then ``logit[t] += bias[t]``.
The log-probs a completion reports stay the model's own (before penalties, biases and temperature), as
vLLM's default ``raw_logprobs`` are.
"""

from __future__ import annotations

import torch

from agent.backends.base import SamplingParams


def shape_logits(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """``logits`` (one row, vocabulary-sized) with the penalties and biases of ``params`` applied."""
    if not params.shapes_logits:
        return logits
    logits = logits.clone()
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(generated, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    for token, bias in params.logit_bias:
        if 0 <= token < logits.numel():
            logits[token] += bias
    return logits


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token: argmax at temperature 0, else a draw from the temperature/top-k/top-p distribution."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, index = torch.sort(scores, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p
        scores = scores.scatter(0, index[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
