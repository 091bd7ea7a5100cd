"""The test doubles the suite shares, one definition each: a scripted language model and a scripted System 2 method.

Both stand in at a seam the runtime itself defines, so a test that uses them exercises the real code on
either side of it:

- :class:`ScriptedLM` is an :data:`policies.lm.LM`: the only way a policy (a System 2 method, the USC
  filter) talks to a model. The runtime adapts its backend to that callable; a test passes this one and
  decides, per call, what the "model" says. Everything the policy does with the replies (prompts it
  builds, batching, parsing, voting, cost accounting) is the real code.
- :class:`Arithmetic` is a :class:`policies.system2.base.System2Method`, registered the way a user adds a
  method (a class and a ``METHODS`` entry; the ``arith`` fixture in ``tests/conftest.py`` does it). It
  labels sums exactly and splits its votes on anything else, so the agent tests know in advance which
  answers are accepted, while System 1, the store, training, the gate and serving stay real.

:data:`QUESTIONS` and :func:`make_config` are the learning setup built around :class:`Arithmetic`; the
worker scripts (``tests/agent/_consolidate_worker.py``) import them too, so a second process learns
exactly what the test in the first one expects.

:func:`script_engine` and :func:`scripted_generate` script a stand-in of vLLM's ``AsyncLLM`` (the vLLM backend's
tests: one on plain stand-in classes, one on vLLM's real classes).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from policies.lm import Call
from policies.system2.base import Sample, System2Method

if TYPE_CHECKING:
    from agent.config import AgentConfig


@dataclass
class Gen:
    """One generated sample, as a policy reads it (:class:`policies.lm.Generation`)."""

    text: str
    num_tokens: int = 3


def user_text(call: Call) -> str:
    """The last user turn of a call: the part of the prompt a scripted reply usually depends on."""
    return [content for role, content in call.messages if role == "user"][-1]


class ScriptedLM:
    """An :data:`policies.lm.LM` that answers the ``i``-th sample of each call with ``respond(call, i)``.

    ``respond`` may also be a list of texts (sample ``i`` gets ``texts[i % len(texts)]``) or one text for
    every sample. Every batch it receives is recorded in :attr:`batches`, and every generation it returns
    in :attr:`generations`, so a test can check what the policy asked for and what it was charged.
    """

    def __init__(self, respond: Callable[[Call, int], str] | Sequence[str] | str) -> None:
        if isinstance(respond, str):
            respond = [respond]
        if not callable(respond):
            texts = list(respond)
            respond = lambda call, i: texts[i % len(texts)]  # noqa: E731
        self.respond = respond
        self.batches: list[list[Call]] = []
        self.generations: list[Gen] = []

    def __call__(self, calls: Sequence[Call]) -> list[list[Gen]]:
        self.batches.append(list(calls))
        out = [[Gen(self.respond(call, i)) for i in range(call.n)] for call in calls]
        self.generations.extend(g for gens in out for g in gens)
        return out

    @property
    def calls(self) -> list[Call]:
        """Every call received, in order, across batches."""
        return [c for batch in self.batches for c in batch]

    @property
    def tokens(self) -> int:
        """Tokens of every generation returned so far: what a policy should report it spent."""
        return sum(g.num_tokens for g in self.generations)


class Arithmetic(System2Method):
    """Answers 'What is a + b?' exactly, with ``k`` agreeing votes; anything else gets split votes (rejected)."""

    name = "arith"
    answer_kind = "number"

    def __init__(self, **_: object) -> None:
        pass  # takes (and ignores) whatever the agent passes every method: prompts, temperature, ...

    def sample(self, query, lm, k):
        match = re.search(r"(\d+) \+ (\d+)", query)
        if match:
            value = str(int(match[1]) + int(match[2]))
            return [Sample(f"Answer: {value}", value, tokens=3) for _ in range(k)], 1
        return [Sample("Answer: x", str(i % 2), tokens=3) for i in range(k)], 1


QUESTIONS = [f"What is {a} + {b}?" for a, b in zip(range(11, 35), range(40, 64))]
"""24 distinct sums: :class:`Arithmetic` accepts every one, so each becomes a pending example."""


def make_config(model_dir: str | Path, db: str | Path, epochs: int = 2) -> AgentConfig:
    """An agent on ``model_dir`` that sends every query to :class:`Arithmetic` (register it as
    ``METHODS["arith"]`` first) and consolidates after 4 examples, with a gate every candidate passes
    (``tests/agent/test_consolidation.py`` tests the gate itself)."""
    from agent.config import AgentConfig

    config = AgentConfig(model=str(model_dir), db=str(db), threads=1, max_new_tokens=8, seed=0)
    config.system2.samples = 4
    config.system2.max_new_tokens = 16
    config.system2.method = "arith"
    config.routing.threshold = 1.0  # a random model is never this sure: every query goes to System 2
    config.scoping.auto = False  # untagged examples stay untagged: the tests of the general adapter need them
    c = config.consolidation
    c.min_examples, c.epochs, c.learning_rate, c.batch_size, c.rank = 4, epochs, 1e-2, 8, 4
    c.retention_threshold = 0.0  # a random model has no behaviour worth retaining
    c.gate_margin = 1.0
    c.retention_prompts = 8
    return config


def script_engine(engine: type, model_dir: str | Path):
    """Reset a stand-in of vLLM's ``AsyncLLM`` (``tests/agent/test_backend_vllm.py``, ``test_vllm_api.py``): no
    instances yet, no request held, and every generation emits " A B 0123" in ``model_dir``'s tokens, then its
    EOS (see :func:`scripted_generate`). Returns the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    engine.instances = []
    engine.stream = tok.encode(" A B 0123", add_special_tokens=False)
    engine.eos = tok.eos_token_id
    engine.hold = None
    return tok


async def scripted_generate(engine: Any, max_tokens: int, request_id: str, output: Callable[[list[int], str | None], Any]):
    """What a stand-in of ``AsyncLLM.generate`` yields: one output per token, cumulative, as vLLM's default
    (``CUMULATIVE``) output kind does, of ``engine.stream`` then its EOS cut at ``max_tokens``; ``output(tokens,
    finish_reason)`` builds each (``finish_reason`` None until the last). While ``engine.hold`` is an unset event
    the request stays in flight; a cancelled request's id is recorded in ``engine.cancelled`` (where the real
    ``generate`` aborts it in the engine)."""
    try:
        while engine.hold is not None and not engine.hold.is_set():
            await asyncio.sleep(0.005)
        tokens = (type(engine).stream + [engine.eos])[:max_tokens]
        for k in range(1, len(tokens) + 1):
            last = k == len(tokens)
            yield output(tokens[:k], ("stop" if tokens[-1] == engine.eos else "length") if last else None)
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        engine.cancelled.append(request_id)
        raise
