"""System 2 cost and label quality per number of samples k.

    agent bench system2 [--task last_letter_2] [--method pal] [--k 1,4,8] [--n 50]

For each k: System 2 accuracy (majority answer), seconds and generated tokens per query, the
consistency filter's acceptance rate and the accuracy of what it accepted (how clean the training
data is). The k samples of a query share one prefill, and concurrent queries share forward passes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from agent import Agent, AgentConfig
from bench import evaluate
from bench.tasks import TASKS
from policies.system2.prompts import PAL_FAMILIES


def run(config: AgentConfig, task_name: str, method: str, ks: list[int], n: int, threshold: float = 0.75) -> dict:
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; known: {', '.join(TASKS)}")
    task = TASKS[task_name](n_train=1, n_eval=n)
    tag = task.family if task.family in PAL_FAMILIES else None
    rows = []
    with tempfile.TemporaryDirectory() as home:
        config.db = str(Path(home) / "bench.db")
        config.max_batch = max(config.max_batch, 32)
        config.batch_wait_ms = max(config.batch_wait_ms, 20.0)
        with Agent(config) as agent:
            for k in ks:
                m, results = evaluate.system2(agent, method, task.eval, k, threshold, task.kind, tag=tag)
                accepted = [(r, i) for r, i in zip(results, task.eval) if r.decision.accepted]
                rows.append({
                    "k": k, "accuracy": m.accuracy, "seconds_per_query": m.seconds_per_query,
                    "tokens_per_query": m.tokens_per_query, "acceptance_rate": len(accepted) / len(results),
                    "accepted_accuracy": (sum(evaluate.correct(r.decision.answer, i.answer, task.kind)
                                              for r, i in accepted) / len(accepted)) if accepted else None,
                })
    return {"task": task.name, "method": method, "n": n, "threshold": threshold, "rows": rows}


def report(result: dict) -> str:
    lines = [f"{result['task']}, System 2 = {result['method']}, {result['n']} items, "
             f"accept when >= {result['threshold']:.0%} agree",
             f"{'k':>3}{'acc':>7}{'s/query':>9}{'tok/query':>11}{'accepted':>10}{'acc. of accepted':>18}"]
    for r in result["rows"]:
        acc_acc = "-" if r["accepted_accuracy"] is None else f"{r['accepted_accuracy']:.2f}"
        lines.append(f"{r['k']:>3}{r['accuracy']:>7.2f}{r['seconds_per_query']:>9.2f}{r['tokens_per_query']:>11.1f}"
                     f"{r['acceptance_rate']:>10.2f}{acc_acc:>18}")
    return "\n".join(lines)
