"""The learning curve of the live runtime: System 2 spend falling while System 1 accuracy rises.

    agent bench loop [--task last_letter_2] [--queries 400] [--round 100] [--method pal] [--out bench/out/loop]
                     [--teacher URL --teacher-model M]
                     [--replay ratio|all] [--batch each|final|none]

A stream of a task's training inputs goes through ``Agent.answer`` with routing on (the configured
threshold router); after each round of ``--round`` queries the runtime consolidates what System 2
taught (the same ``Agent.consolidate`` the scheduler calls), then this measures held-out System 1
accuracy (the serving adapter, greedy), the share of that round's queries routed to System 2, and
generated tokens per query (and, with ``--teacher URL --method teacher:pal``, the teacher's prompt and
completion tokens per query: the spend that falls as System 1 learns). Writes ``loop.json`` and
``learning_curve.png``.

Next to each round (``--batch each``; only after the last with ``final``) it measures **batch distillation
of the same examples**: one consolidation, from the base model, in a fresh store, on every example the loop
accepted so far (pending, used and held out: the same seeded holdout split), with the same settings,
evaluated on the same held-out set. A user's System 1 should end where that ends; the column shows the gap.
``--replay all`` sets ``consolidation.replay`` (every earlier example of the scope replayed each round)
to compare with the default ``ratio`` sample.
"""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from agent import Agent, AgentConfig
from bench import evaluate
from bench.tasks import TASKS, Task
from store import Store

BATCH_MODES = ("each", "final", "none")


@dataclass
class LoopSettings:
    task: str = "last_letter_2"
    queries: int = 400
    round: int = 100
    method: str = "pal"
    n_eval: int = 100
    k: int = 4
    seed: int = 0
    epochs: int | None = None
    batch: str = "each"
    """When to measure batch distillation of the same examples: after each round, the final one, or never."""
    replay: str | None = None
    """Overrides ``consolidation.replay`` (``ratio`` or ``all``) for this run."""


def run(settings: LoopSettings, config: AgentConfig, out: Path) -> dict:
    if settings.task not in TASKS:
        raise ValueError(f"unknown task {settings.task!r}; known: {', '.join(TASKS)}")
    if settings.batch not in BATCH_MODES:
        raise ValueError(f"--batch must be one of {', '.join(BATCH_MODES)}, not {settings.batch!r}")
    task = TASKS[settings.task](n_train=settings.queries, n_eval=settings.n_eval, seed=settings.seed)
    if settings.replay is not None:
        config.consolidation = replace(config.consolidation, replay=settings.replay)
    out.mkdir(parents=True, exist_ok=True)
    rounds: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="s2agent-loop-") as tmp:
        config.db = str(Path(tmp) / "loop.db")
        config.system2.method = settings.method
        config.system2.samples = settings.k
        config.max_batch = max(config.max_batch, 32)
        config.batch_wait_ms = max(config.batch_wait_ms, 20.0)
        config.consolidation.min_examples = 1
        config.max_new_tokens = min(config.max_new_tokens, 32)  # the answers are a few tokens long
        tag = task.family
        with Agent(config) as agent:
            def held_out() -> evaluate.Measure:
                version, adapter = agent.adapter_for(tag)
                return evaluate.system1(agent, task.eval, task.kind, adapter=adapter, desc="held-out System 1")

            base = held_out()
            rounds.append({"queries_served": 0, "system1_accuracy": base.accuracy, "system1_accuracy_unseen": None,
                           "system2_share": None, "tokens_per_query": None, "adapter_version": None,
                           "batch_accuracy": None})
            starts = range(0, len(task.train), settings.round)
            for start in starts:
                batch = task.train[start:start + settings.round]
                with ThreadPoolExecutor(evaluate.WORKERS) as pool:
                    answers = list(tqdm(pool.map(lambda item: agent.answer(item.input, tag=tag), batch),
                                        total=len(batch), desc=f"round {len(rounds)}: serving", leave=False))
                report = agent.consolidate(progress=True, epochs=settings.epochs, scope=tag)
                measured = held_out()
                rounds.append({
                    "queries_served": start + len(batch),
                    "system1_accuracy": measured.accuracy,
                    "system2_share": sum(a.method is not None for a in answers) / len(answers),
                    "tokens_per_query": sum(a.tokens for a in answers) / len(answers),
                    "teacher_tokens_per_query": sum(a.teacher_prompt_tokens + a.teacher_completion_tokens
                                                    for a in answers) / len(answers),
                    "accepted": sum(bool(a.accepted) for a in answers),
                    "consolidation": f"{report.status}: {report.reason}",
                    "adapter_version": agent.serving_version(tag),
                    "replay": config.consolidation.replay,
                    "n_replay": report.n_replay,
                })
                if settings.batch == "each" or (settings.batch == "final" and start == starts[-1]):
                    rounds[-1].update(batch_distillation(agent, task, tag, Path(tmp) / f"batch-{len(rounds) - 1}",
                                                         settings.epochs))
                (out / "loop.json").write_text(json.dumps({"rounds": rounds}, indent=2))
    result = {"task": task.name, "settings": settings.__dict__, "model": config.model,
              "threshold": config.routing.threshold, "seconds": round(time.perf_counter() - started, 1),
              "rounds": rounds}
    (out / "loop.json").write_text(json.dumps(result, indent=2))
    plot(rounds, out / "learning_curve.png", task.name)
    return result


def batch_distillation(agent: Agent, task: Task, tag: str, workdir: Path, epochs: int | None) -> dict:
    """Train once, from the base model, on every example ``agent``'s loop accepted so far, with its settings,
    and measure System 1 with that adapter on the task's held-out set: where the loop should end.

    The examples go into a fresh store (pending: the seeded holdout split puts the same ones aside), so the
    run starts from no adapter; retention prompts come from the shipped general set only (the fresh store
    has no history). The adapter is evaluated whatever the gate said (``batch_gate``)."""
    statuses = ["pending", "used", "holdout"]
    examples = agent.store.list_examples(status=statuses, tag=tag)
    workdir.mkdir(parents=True, exist_ok=True)
    config = replace(agent.config, db=str(workdir / "batch.db"), adapters_dir=str(workdir / "adapters"),
                     consolidation=replace(agent.config.consolidation, min_examples=1))
    batch = Agent(config, backend=agent.backend, store=Store(config.db))  # shares the loaded model
    try:
        for e in examples:
            batch.store.add_example(e.input, e.target, e.method, votes=e.votes, agreement=e.agreement, tag=tag)
        report = batch.consolidate(scope=tag, epochs=epochs)
        if report.adapter_version is None:
            return {"batch_accuracy": None, "batch_gate": f"{report.status}: {report.reason}",
                    "batch_examples": len(examples)}
        name = f"batch-{workdir.name}"
        agent.backend.load_adapter(name, batch.store.get_adapter(report.adapter_version).path)
        try:
            measured = evaluate.system1(batch, task.eval, task.kind, adapter=name, desc="batch distillation")
        finally:
            agent.backend.unload_adapter(name)
        return {"batch_accuracy": measured.accuracy, "batch_gate": f"{report.status}: {report.reason}",
                "batch_examples": len(examples), "batch_n_train": report.metrics.get("n_train")}
    finally:
        batch.store.close()


def table(result: dict) -> str:
    teacher = any(r.get("teacher_tokens_per_query") for r in result["rounds"])  # a column only with a teacher
    width = 15 if teacher else 0
    lines = [f"{'served':>7}{'S1 acc':>8}{'batch':>7}{'S2 share':>10}{'tok/query':>11}"
             f"{'teacher tok/q' if teacher else '':>{width}}{'adapter':>9}  consolidation"]
    for r in result["rounds"]:
        share = "" if r["system2_share"] is None else f"{r['system2_share']:.2f}"
        tok = "" if r["tokens_per_query"] is None else f"{r['tokens_per_query']:.1f}"
        paid = r.get("teacher_tokens_per_query")
        spend = "" if not teacher or paid is None else f"{paid:.1f}"
        batch = "" if r.get("batch_accuracy") is None else f"{r['batch_accuracy']:.2f}"
        lines.append(f"{r['queries_served']:>7}{r['system1_accuracy']:>8.2f}{batch:>7}{share:>10}{tok:>11}"
                     f"{spend:>{width}}"
                     f"{'v' + str(r['adapter_version']) if r['adapter_version'] else 'base':>9}  "
                     f"{r.get('consolidation', '')}")
    return "\n".join(lines)


def plot(rounds: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    served = [r["queries_served"] for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(served, [r["system1_accuracy"] for r in rounds], "o-", label="held-out System 1 accuracy")
    batch = [r for r in rounds if r.get("batch_accuracy") is not None]
    if batch:
        ax.plot([r["queries_served"] for r in batch], [r["batch_accuracy"] for r in batch], "*:", color="C3",
                label="batch distillation of the same examples")
    later = [r for r in rounds if r["system2_share"] is not None]
    ax.plot([r["queries_served"] for r in later], [r["system2_share"] for r in later], "s--",
            label="share of queries sent to System 2 (that round)")
    ax.set_xlabel("queries served")
    ax.set_ylim(-0.03, 1.05)
    ax2 = ax.twinx()
    ax2.plot([r["queries_served"] for r in later], [r["tokens_per_query"] for r in later], "^:", color="C2",
             label="generated tokens per query")
    ax2.set_ylabel("tokens per query")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="center right")
    ax.set_title(f"s2agent learning loop: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
