"""System 2 methods on the real embedded model (SmolLM2-135M-Instruct, CPU): structure, not quality,
except for PAL, which must get easy last-letter and addition items right.

Slow (a few minutes on 2 cores): run with ``pytest -m slow tests/policies/test_system2_slow.py``.
"""

from __future__ import annotations

import os
from itertools import groupby
from pathlib import Path
from typing import Sequence

import pytest

from policies.system2 import (
    BranchSolveMerge,
    Call,
    ChainOfThought,
    ProgramAided,
    RephraseAndRespond,
    System2Attention,
    format_judge_query,
)
from tests.fakes import Gen

pytestmark = pytest.mark.slow

MODEL_DIR = Path(os.environ.get("S2AGENT_CACHE_DIR", Path.home() / ".cache" / "s2agent")) / "models" / "SmolLM2-135M-Instruct"
MAX_NEW_TOKENS = 40


class TransformersLM:
    """The ``LM`` interface over plain ``model.generate``: calls that share sampling settings are
    run as one left-padded batch (each prompt repeated ``n`` times); stop strings cut the text."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer

    def __call__(self, calls: Sequence[Call]) -> list[list[Gen]]:
        import torch

        out: dict[int, list[Gen]] = {}
        key = lambda ic: (ic[1].temperature, ic[1].top_k, ic[1].max_new_tokens, ic[1].stop)  # noqa: E731
        for (temperature, top_k, max_new, stop), group in groupby(sorted(enumerate(calls), key=key), key=key):
            group = list(group)
            prompts = [
                self.tok.apply_chat_template(
                    [{"role": r, "content": c} for r, c in call.messages], tokenize=False, add_generation_prompt=True
                )
                for _, call in group
                for _ in range(call.n)
            ]
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else {"do_sample": False}
            torch.manual_seed(0)
            with torch.no_grad():
                ids = self.model.generate(
                    **enc,
                    max_new_tokens=min(max_new, MAX_NEW_TOKENS),
                    pad_token_id=self.tok.pad_token_id,
                    **sampling,
                )[:, enc.input_ids.shape[1] :]
            rows = iter(ids.tolist())
            for index, call in group:
                gens = []
                for _ in range(call.n):
                    tokens = [t for t in next(rows) if t != self.tok.pad_token_id]
                    text = self.tok.decode(tokens, skip_special_tokens=True)
                    for s in stop:
                        text = text.split(s)[0]
                    gens.append(Gen(text, len(tokens)))
                out[index] = gens
        return [out[i] for i in range(len(calls))]


@pytest.fixture(scope="module")
def lm():
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"the embedded model is not cached at {MODEL_DIR}")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    return TransformersLM(model, tok)


def check_structure(result, k, kind_values=None):
    assert len(result.samples) == k
    for s in result.samples:
        assert isinstance(s.trace, str) and s.tokens > 0
        assert s.answer is None or (isinstance(s.answer, str) and s.answer)
        if kind_values and s.answer is not None:
            assert s.answer in kind_values
    assert sum(result.decision.votes.values()) == k or result.decision.filter == "universal_self_consistency"
    assert result.tokens >= sum(s.tokens for s in result.samples)


def test_cot(lm):
    result = ChainOfThought(answer_kind="number").solve("What is 12 + 5?", lm, k=3)
    check_structure(result, 3)
    assert result.calls == 1


def test_rar_two_step(lm):
    result = RephraseAndRespond(variant="2step", answer_kind="yesno").solve("Is Paris in France?", lm, k=2)
    check_structure(result, 2, {"yes", "no"})
    assert result.calls == 3


def test_s2a(lm):
    query = "What is the capital of Italy? I think the answer is Milan, but I'm not sure."
    result = System2Attention(answer_kind="text").solve(query, lm, k=2)
    check_structure(result, 2)
    assert result.decision.filter == "universal_self_consistency"


def test_bsm(lm):
    query = format_judge_query("What is the capital of France?", "Paris.", "It is Lyon.")
    result = BranchSolveMerge(num_criteria=2).solve(query, lm, k=1)
    check_structure(result, 1, {"A", "B", "tie"})
    criteria = result.samples[0].extra["criteria"]
    assert 1 <= len(criteria) <= 2
    assert result.calls == 1 + 2 * len(criteria) + 2 * 1
    assert all(s.extra["swapped"] in (None, "A", "B", "tie") for s in result.samples)


@pytest.mark.parametrize(
    "query,expected",
    [
        ("Take the last letters of the words in 'garden window' and concatenate them.", "nw"),
        ("Take the last letters of the words in 'Tiger Music' and concatenate them.", "rc"),
        ("What is 56 + 29?", "85"),
        ("What is 73 + 18 - 40?", "51"),
    ],
)
def test_pal_gets_easy_items_right(lm, query, expected):
    sandbox = pytest.importorskip("agent.sandbox", reason="agent.sandbox (run_programs) is not written yet")
    pal = ProgramAided(executor=sandbox.run_programs, temperature=0.0)
    result = pal.solve(query, lm, k=1, threshold=1.0)
    assert result.answer == expected, result.samples[0].extra
