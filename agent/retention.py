"""Retention by likelihood: does a candidate adapter still *assign* the serving model's answers their
probability, whatever text it would regenerate?

The text measure (:func:`agent.consolidation.retained`) asks the candidate to regenerate each retention
answer and compares strings: exact, or token F1 >= 0.8 for long answers. A 135M model's regenerated
paragraph rarely reaches that even when it says the same thing, so a general adapter read 0.14 there and
could never be promoted. This measure scores the serving model's answers as they are, teacher-forced,
under both models loaded as adapters of one PEFT model (the base model, when nothing serves, is the same
weights with the adapter disabled: no second copy in memory):

- ``retention_likelihood``: per retention example, ``exp(min(0, Δ))`` where Δ is the candidate's mean
  per-token log-probability of the serving answer minus the serving model's own: the share of per-token
  probability the candidate keeps (geometric mean), capped at 1 so that an example the candidate got
  surer of cannot mask one it lost; averaged over the examples. 1.0 = kept everything.
- ``retention_logprob_delta``: the mean Δ, uncapped (nats per token; positive = surer than serving).
- ``retention_kl``: the mean per-token KL(serving || candidate) of the next-token distributions along the
  serving answers (nats per token; 0 = the same distribution, also where the answer was not greedy).

Calibrated in ``tests/agent/test_retention.py``: the serving model against itself scores 1.0; an adapter
that answers everything with digits scores near 0; an adapter trained on retention data alone keeps >= 0.9.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from agent.prompting import IGNORE_INDEX, TrainingExample, system1_messages
from agent.training import answer_logits, encode_examples

logger = logging.getLogger(__name__)

SCORE_BATCH = 4
"""Retention sequences scored per forward pass (each row's logits are vocabulary-wide)."""
SCORE_MAX_LENGTH = 256
"""Tokens of prompt + answer scored; a longer answer is scored on its head (System 1 answers are at most
``max_new_tokens``, 128 by default, so this covers them whole)."""


@dataclass
class LikelihoodRetention:
    """How much of the serving model's answer probability a candidate keeps (see the module docstring)."""

    score: float
    logprob_delta: float
    kl: float
    n: int

    def as_metrics(self) -> dict[str, float | int]:
        """The fields under the names the consolidation report uses."""
        return {"retention_likelihood": round(self.score, 4), "retention_logprob_delta": round(self.logprob_delta, 4),
                "retention_kl": round(self.kl, 4), "retention_likelihood_n": self.n}


@contextlib.contextmanager
def active(model, adapter: str | None) -> Iterator[None]:
    """``model`` answering as ``adapter``, or as the bare base model when ``adapter`` is None."""
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield


def compare(model, rows: list[tuple[list[int], list[int]]], pad_id: int, reference: str | None,
            candidate: str | None) -> LikelihoodRetention:
    """Score ``candidate`` against ``reference`` (adapter names of the PEFT ``model``; None: the base) on
    encoded (prompt, answer) ``rows``."""
    scores: list[float] = []
    deltas: list[float] = []
    kl_sum = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), SCORE_BATCH):
            batch = rows[start:start + SCORE_BATCH]
            with active(model, reference):
                ref_logits, targets = answer_logits(model, batch, pad_id)
            with active(model, candidate):
                cand_logits, _ = answer_logits(model, batch, pad_id)
            ref = torch.log_softmax(ref_logits, -1)
            cand = torch.log_softmax(cand_logits, -1)
            mask = targets != IGNORE_INDEX
            index = targets.clamp(min=0).unsqueeze(-1)
            delta = (cand.gather(-1, index) - ref.gather(-1, index)).squeeze(-1) * mask
            per_row = delta.sum(-1) / mask.sum(-1).clamp(min=1)
            kl = (ref.exp() * (ref - cand)).sum(-1) * mask
            kl_sum += float(kl.sum())
            tokens += float(mask.sum())
            for d in per_row.tolist():
                deltas.append(d)
                scores.append(math.exp(min(0.0, d)))
    n = len(scores)
    return LikelihoodRetention(score=sum(scores) / n if n else float("nan"),
                               logprob_delta=sum(deltas) / n if n else float("nan"),
                               kl=kl_sum / tokens if tokens else float("nan"), n=n)


def likelihood_retention(model_path: str, pairs: Sequence[tuple[str, str]], candidate: str, serving: str | None,
                         *, system_prompt: str | None = None, device: str | torch.device = "cpu") -> LikelihoodRetention:
    """Score the candidate adapter folder ``candidate`` against ``serving`` (an adapter folder; None: the
    base model) on retention ``pairs`` of (prompt, the serving model's answer), on ``device``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not pairs:
        return LikelihoodRetention(float("nan"), float("nan"), float("nan"), 0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, candidate, adapter_name="candidate")
    if serving is not None:
        model.load_adapter(serving, adapter_name="serving")
    rows, _, _ = encode_examples(tokenizer, [TrainingExample(system1_messages(p), a) for p, a in pairs],
                                 SCORE_MAX_LENGTH, system_prompt)
    result = compare(model, rows, tokenizer.pad_token_id, "serving" if serving is not None else None, "candidate")
    logger.info("likelihood retention %.3f (log-prob delta %.3f nats/token, KL %.3f) on %d examples",
                result.score, result.logprob_delta, result.kl, result.n)
    return result
