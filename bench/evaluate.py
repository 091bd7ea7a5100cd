"""Shared measuring helpers for the benchmarks: System 1 and System 2 accuracy, tokens and time per query.

Queries are sent concurrently so the backend batches them, as it does when serving.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from tqdm import tqdm

from agent import Agent
from bench.tasks import Item
from policies.answers import answers_match, normalise
from policies.system2.base import System2Result

WORKERS = 8
"""Concurrent System 2 queries: their calls share forward passes in the backend's batcher."""


@dataclass
class Measure:
    accuracy: float
    tokens_per_query: float
    seconds_per_query: float
    n: int
    outputs: list[str] = field(default_factory=list, repr=False)
    teacher_tokens: int = 0
    """Prompt and completion tokens the System 2 teacher spent on these queries (0 without a teacher)."""


def teacher_tokens(results: Sequence[System2Result]) -> int:
    """What the teacher read and wrote for ``results`` (``extra["teacher"]``, when a teacher ran)."""
    spent = [r.extra.get("teacher") for r in results]
    return sum(t.get("prompt_tokens", 0) + t.get("completion_tokens", 0) for t in spent if isinstance(t, dict))


def correct(output: str | None, gold: str, kind: str) -> bool:
    return answers_match(normalise(output or "", kind), normalise(gold, kind), kind)


def system1(agent: Agent, items: Sequence[Item], kind: str, adapter: str | None = None,
            max_new_tokens: int = 48, batch: int = 16, desc: str = "System 1") -> Measure:
    """Greedy System 1 on ``items`` (the serving adapter, or the adapter loaded under ``adapter``).

    ``WORKERS`` chunks of ``batch`` items are in flight at once, as System 2's queries are: the engine
    fills the rows a short answer leaves with the next chunk's, so one answer that runs to
    ``max_new_tokens`` does not hold fifteen finished rows (and the measured seconds) behind it."""
    chunks = [[i.input for i in items[start:start + batch]] for start in range(0, len(items), batch)]
    started = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        jobs = pool.map(lambda chunk: agent.system1_batch(chunk, adapter=adapter, max_new_tokens=max_new_tokens,
                                                          batch=batch), chunks)
        completions = [c for done in tqdm(jobs, total=len(chunks), desc=desc, unit="batch", leave=False)
                       for c in done]
    seconds = time.perf_counter() - started
    outputs = [c.text for c in completions]
    tokens = sum(c.num_tokens for c in completions)
    n = max(1, len(items))
    accuracy = sum(correct(o, i.answer, kind) for o, i in zip(outputs, items)) / n
    return Measure(accuracy, tokens / n, seconds / n, len(items), outputs)


def system2(agent: Agent, method_name: str, items: Sequence[Item], k: int, threshold: float, kind: str,
            tag: str | None = None, desc: str | None = None) -> tuple[Measure, list[System2Result]]:
    """Run a System 2 method ``k`` times per item; accuracy is that of the majority answer."""
    started = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        jobs = pool.map(lambda item: agent.system2(item.input, method=method_name, tag=tag, k=k,
                                                   threshold=threshold), items)
        results = list(tqdm(jobs, total=len(items), desc=desc or f"System 2 ({method_name}, k={k})", leave=False))
    seconds = time.perf_counter() - started
    n = max(1, len(items))
    accuracy = sum(correct(r.decision.answer, i.answer, kind) for r, i in zip(results, items)) / n
    return Measure(accuracy, sum(r.tokens for r in results) / n, seconds / n, len(items),
                   [r.decision.answer or "" for r in results], teacher_tokens(results)), results
