"""The paper's table, measured here: System 1, System 2, and distilled System 1, per task.

    agent bench paper [--task last_letter_2,addition] [--method pal,cot] [--n-train 300]
                      [--n-eval 100] [--k 4] [--out bench/out/paper]
    agent bench paper --data eval.jsonl --train-data train.jsonl --method cot

Per task: System 1 accuracy; each applicable System 2 method's accuracy (majority of k samples);
the consistency filter's acceptance rate on unlabeled training inputs and the accuracy of what it
accepted; then distillation through the runtime's own consolidation (System 2 labels -> filter ->
LoRA, gated) and the distilled System 1's accuracy on held-out items of the training entities and on
items of entities never seen in training, with its retention scores (regenerated text and likelihood). Writes ``results.json`` and
``accuracy_vs_tokens.png`` to ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from agent import Agent, AgentConfig
from agent.loop import sample_audit
from bench import evaluate
from bench.tasks import TASKS, Task, from_jsonl
from policies.system2.prompts import PAL_FAMILIES
from store import Store

logger = logging.getLogger(__name__)



@dataclass
class PaperSettings:
    tasks: Sequence[str] = ("last_letter_2", "addition")
    methods: Sequence[str] = ("pal", "cot")
    label_method: str | None = None
    """Method whose filtered answers are distilled; default: pal for its task families, else the first method."""
    n_train: int = 300
    n_eval: int = 100
    n_eval_prompting: int = 20
    """Items for prompting-only methods (CoT, RaR): ~1,000 generated tokens per item makes them the slowest rows."""
    k: int = 4
    threshold: float = 0.75
    epochs: int | None = None
    seed: int = 0
    data: str | None = None
    train_data: str | None = None


def load_tasks(settings: PaperSettings) -> list[Task]:
    if settings.data:
        return [from_jsonl(settings.data, settings.train_data)]
    unknown = [t for t in settings.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    return [TASKS[t](n_train=settings.n_train, n_eval=settings.n_eval, seed=settings.seed) for t in settings.tasks]


def _row(task: Task, system: str, m: evaluate.Measure, **extra: Any) -> dict[str, Any]:
    return {"task": task.name, "system": system, "accuracy": round(m.accuracy, 4),
            "tokens_per_query": round(m.tokens_per_query, 2), "seconds_per_query": round(m.seconds_per_query, 4),
            "n": m.n, **extra}


def run_task(task: Task, settings: PaperSettings, config: AgentConfig, backend, workdir: Path) -> list[dict]:
    """All rows of one task, with a fresh store and adapter folder so tasks never mix."""
    config.db = str(workdir / f"{task.name}.db")
    config.adapters_dir = str(workdir / f"{task.name}-adapters")
    agent = Agent(config, backend=backend, store=Store(config.db))
    # Examples carry the task's tag and distil into an adapter scoped to it, as a deployment would.
    tag = task.family if task.family in PAL_FAMILIES else task.name
    rows: list[dict] = []
    s1 = evaluate.system1(agent, task.eval, task.kind, desc=f"{task.name}: System 1")
    s1_unseen = (evaluate.system1(agent, task.unseen, task.kind, desc=f"{task.name}: System 1, unseen")
                 if task.unseen else None)
    rows.append(_row(task, "system1", s1, accuracy_unseen=s1_unseen and round(s1_unseen.accuracy, 4)))
    for method in settings.methods:
        if method in ("bsm",) or (method == "s2a" and task.kind != "text"):
            continue  # judging and de-biasing methods do not apply to these tasks
        items = task.eval if method == "pal" else task.eval[: settings.n_eval_prompting]
        m, _ = evaluate.system2(agent, method, items, settings.k, settings.threshold, task.kind, tag=tag,
                                desc=f"{task.name}: System 2 {method}")
        teacher = {"teacher_tokens_per_query": round(m.teacher_tokens / m.n, 1)} if m.teacher_tokens else {}
        rows.append(_row(task, f"system2:{method}", m, k=settings.k, **teacher))
    label = settings.label_method or ("pal" if "pal" in settings.methods else settings.methods[0])
    if not task.train:
        return rows
    labels, results = evaluate.system2(agent, label, task.train, settings.k, settings.threshold, task.kind, tag=tag,
                                       desc=f"{task.name}: labelling {len(task.train)} inputs with {label}")
    accepted = [(item, r) for item, r in zip(task.train, results) if r.decision.accepted and r.decision.answer]
    accepted_correct = sum(evaluate.correct(r.decision.answer, item.answer, task.kind) for item, r in accepted)
    for item, r in accepted:  # logged as the runtime logs System 2: its programs can make variations
        interaction = agent.store.log_interaction(
            input=item.input, tag=tag, route="system2", final_answer=r.decision.answer, method=label,
            votes=r.decision.votes, accepted=True, route_reason={"samples": sample_audit(r.samples)})
        agent.store.add_example(item.input, r.decision.answer, label, votes=r.decision.votes,
                                agreement=r.decision.agreement, tag=tag, interaction_id=interaction)
    filter_stats = {
        "label_method": label, "acceptance_rate": round(len(accepted) / len(task.train), 4),
        "accepted_accuracy": round(accepted_correct / len(accepted), 4) if accepted else None,
        "label_seconds_per_query": round(labels.seconds_per_query, 4), "n_train_inputs": len(task.train),
    }
    if labels.teacher_tokens:  # what one accepted example cost on the teacher
        filter_stats["teacher_tokens_per_accepted"] = round(labels.teacher_tokens / max(1, len(accepted)), 1)
    if not accepted:
        rows.append({"task": task.name, "system": "distilled", "accuracy": None, "tokens_per_query": None,
                     "seconds_per_query": None, "n": 0, "gate": "no accepted examples", **filter_stats})
        return rows
    report = agent.consolidate(progress=True, min_examples=1, epochs=settings.epochs, scope=tag)
    if report.adapter_version is None:
        rows.append({"task": task.name, "system": "distilled", "accuracy": None, "tokens_per_query": None,
                     "seconds_per_query": None, "n": 0, "gate": f"{report.status}: {report.reason}", **filter_stats})
        return rows
    name = f"bench-{task.name}"
    backend.load_adapter(name, agent.store.get_adapter(report.adapter_version).path)
    try:
        d = evaluate.system1(agent, task.eval, task.kind, adapter=name, desc=f"{task.name}: distilled")
        d_unseen = (evaluate.system1(agent, task.unseen, task.kind, adapter=name,
                                     desc=f"{task.name}: distilled, unseen") if task.unseen else None)
    finally:
        backend.unload_adapter(name)
    rows.append(_row(
        task, "distilled", d, accuracy_unseen=d_unseen and round(d_unseen.accuracy, 4),
        retention=report.metrics.get("retention"), retention_likelihood=report.metrics.get("retention_likelihood"),
        gate=report.status, gate_reason=report.reason,
        n_trained=report.metrics.get("n_train"), train_seconds=report.metrics.get("train_seconds"),
        **filter_stats,
    ))
    return rows


def run(settings: PaperSettings, config: AgentConfig, out: Path) -> dict:
    from agent.backends import backend_for
    from agent.models import display_name, resolve_model

    out.mkdir(parents=True, exist_ok=True)
    config.max_batch = max(config.max_batch, 32)
    config.batch_wait_ms = max(config.batch_wait_ms, 20.0)
    config.seed = settings.seed if config.seed is None else config.seed
    backend = backend_for(config, resolve_model(config.model, config.cache_dir))
    started = time.perf_counter()
    rows: list[dict] = []
    # closed here, not at exit: vLLM's engine process, left running, keeps the interpreter from exiting
    with tempfile.TemporaryDirectory(prefix="s2agent-paper-") as tmp, contextlib.closing(backend):
        for task in load_tasks(settings):
            rows += run_task(task, settings, config, backend, Path(tmp))
            (out / "results.json").write_text(json.dumps({"rows": rows}, indent=2))
    result = {"model": display_name(config.model), "settings": settings.__dict__ | {"tasks": list(settings.tasks),
              "methods": list(settings.methods)}, "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    plot(rows, out / "accuracy_vs_tokens.png")
    return result


def table(rows: Sequence[dict]) -> str:
    head = f"{'task':<15}{'system':<18}{'acc':>6}{'unseen':>8}{'tok/q':>8}{'s/q':>8}{'n':>5}  notes"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        unseen = "" if r.get("accuracy_unseen") is None else f"{r['accuracy_unseen']:.2f}"
        tok = "-" if r["tokens_per_query"] is None else f"{r['tokens_per_query']:.1f}"
        sec = "-" if r["seconds_per_query"] is None else f"{r['seconds_per_query']:.2f}"
        notes = []
        if "acceptance_rate" in r:
            notes.append(f"filter kept {r['acceptance_rate']:.0%} of {r['n_train_inputs']} ({r['label_method']}), "
                         f"{(r['accepted_accuracy'] or 0):.0%} correct")
        if r.get("teacher_tokens_per_query"):
            notes.append(f"teacher {r['teacher_tokens_per_query']:.0f} tok/q")
        if r.get("teacher_tokens_per_accepted"):
            notes.append(f"teacher {r['teacher_tokens_per_accepted']:.0f} tok per accepted example")
        if r.get("retention") is not None:
            notes.append(f"retention {r['retention']:.2f} text, {(r.get('retention_likelihood') or 0):.2f} likelihood")
        if r.get("gate"):
            notes.append(f"gate: {r['gate']}")
        lines.append(f"{r['task']:<15}{r['system']:<18}{acc:>6}{unseen:>8}{tok:>8}{sec:>8}{r['n']:>5}  {'; '.join(notes)}")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install s2agent[bench])")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"system1": "o", "distilled": "*"}
    tasks = sorted({r["task"] for r in rows})
    colours = {t: f"C{i}" for i, t in enumerate(tasks)}
    for r in rows:
        if r["accuracy"] is None or not r["tokens_per_query"]:
            continue
        ax.scatter(r["tokens_per_query"], r["accuracy"], color=colours[r["task"]],
                   marker=markers.get(r["system"], "s"), s=120 if r["system"] == "distilled" else 60)
        ax.annotate(r["system"].replace("system2:", "S2 "), (r["tokens_per_query"], r["accuracy"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    for t in tasks:
        ax.scatter([], [], color=colours[t], label=t)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per query (log)")
    ax.set_ylabel("accuracy (held-out)")
    ax.set_ylim(-0.03, 1.05)
    ax.set_title("System 1 (o), System 2 (squares), distilled System 1 (*)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
