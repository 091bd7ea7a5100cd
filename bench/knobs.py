"""Which LoRA settings matter at this model size: accuracy (seen and unseen entities), retention, time.

    agent bench knobs [--task addition] [--n-train 200] [--n-eval 50] [--only "defaults,rank 4"] [--general]
                      [--out ...]

Trains one adapter per setting through the runtime's own consolidation, on perfect labels (the task's
gold answers, so the knobs are measured apart from System 2's label noise), and evaluates each on
held-out items of the training entities, on items of unseen entities, and on retention of the base
model's general answers. The settings vary one knob at a time from the defaults: rank, target
modules, learning rate, epochs, data volume, and how much retention data is mixed in (none; the
default 1 retention example per 4 task examples; 1:1 with all 128 shipped general prompts, which also
doubles the retention holdout), and retention by distribution (a KL term against the base model on the
retention prompts, ``consolidation.retention_kl_weight``, beside or instead of the sampled answers).
Retention is reported both ways: ``retention`` (regenerated text, exact or token F1) and
``retention_likelihood`` (the gate's default measure, ``agent/retention.py``). ``--general`` trains the
general (unscoped) adapter instead of one scoped to the task: the forgetting study, where the gate
applies retention (the adapter is evaluated whatever the gate says; ``gate`` column).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from agent import Agent, AgentConfig
from agent.config import ConsolidationConfig
from bench import evaluate
from bench.tasks import TASKS
from store import Store

ATTENTION = ["q_proj", "v_proj"]


def settings(base: ConsolidationConfig, n_train: int) -> list[tuple[str, ConsolidationConfig, int]]:
    """(label, consolidation config, number of training items), one knob changed at a time."""
    return [
        ("defaults", base, n_train),
        ("rank 4", replace(base, rank=4, alpha=8), n_train),
        ("rank 64", replace(base, rank=64, alpha=128), n_train),
        ("q,v only", replace(base, target_modules=ATTENTION), n_train),
        ("lr 3e-4", replace(base, learning_rate=3e-4), n_train),
        ("lr 3e-3", replace(base, learning_rate=3e-3), n_train),
        ("1 epoch", replace(base, epochs=1), n_train),
        ("at least 24 steps", replace(base, min_steps=24), n_train),
        ("at least 48 steps", replace(base, min_steps=48), n_train),
        ("half the data", base, n_train // 2),
        ("no retention", _retention(base, 0.0), n_train),
        ("retention 1:4", _retention(base, 0.25), n_train),
        ("retention 1:1", _retention(base, 1.0, retention_prompts=128), n_train),
        ("KL 1", replace(base, retention_kl_weight=1.0), n_train),
        ("KL 3", replace(base, retention_kl_weight=3.0), n_train),
        ("KL 3 only", _retention(base, 0.0, retention_kl_weight=3.0), n_train),
        ("KL 3 + lr 3e-4", replace(base, retention_kl_weight=3.0, learning_rate=3e-4), n_train),
    ]


def _retention(base: ConsolidationConfig, ratio: float, **changes) -> ConsolidationConfig:
    """``base`` with ``ratio`` retention examples per task example, for the scoped and the general adapter alike."""
    return replace(base, retention_ratio=ratio, scoped_retention_ratio=ratio, **changes)


def run(config: AgentConfig, task_name: str, n_train: int, n_eval: int, out: Path,
        only: list[str] | None = None, general: bool = False) -> dict:
    """Every setting, or the ``only`` ones (by label); ``general``: into the general adapter, untagged."""
    chosen = settings(config.consolidation, n_train)
    if only:
        unknown = sorted(set(only) - {label for label, _, _ in chosen})
        if unknown:
            raise ValueError(f"unknown knob setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(label for label, _, _ in chosen)}")
        chosen = [s for s in chosen if s[0] in only]
    task = TASKS[task_name](n_train=n_train, n_eval=n_eval)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="s2agent-knobs-") as tmp:
        config.db = str(Path(tmp) / "base.db")
        config.max_batch = max(config.max_batch, 32)
        base_agent = Agent(config)
        backend = base_agent.backend
        for i, (label, cc, n) in enumerate(chosen):
            run_config = replace(config, consolidation=replace(cc, min_examples=1, holdout_fraction=0.1),
                                 db=str(Path(tmp) / f"{i}.db"), adapters_dir=str(Path(tmp) / f"adapters-{i}"))
            agent = Agent(run_config, backend=backend, store=Store(run_config.db))
            for item in task.train[:n]:
                agent.store.add_example(item.input, item.answer, "gold", agreement=1.0,
                                        tag=None if general else task.family)
            started = time.perf_counter()
            report = agent.consolidate(scope=None if general else task.family)
            if report.adapter_version is None:
                rows.append({"setting": label, "status": f"{report.status}: {report.reason}"})
                continue
            name = f"knob-{i}"
            backend.load_adapter(name, agent.store.get_adapter(report.adapter_version).path)
            seen = evaluate.system1(agent, task.eval, task.kind, adapter=name, desc=label)
            unseen = evaluate.system1(agent, task.unseen, task.kind, adapter=name, desc=label)
            backend.unload_adapter(name)
            rows.append({"setting": label, "n_train": report.metrics.get("n_train"), "accuracy_seen": seen.accuracy,
                         "accuracy_unseen": unseen.accuracy, "retention": report.metrics.get("retention"),
                         "retention_likelihood": report.metrics.get("retention_likelihood"),
                         "retention_kl": report.metrics.get("retention_kl"), "gate": report.status,
                         "train_seconds": report.metrics.get("train_seconds"),
                         "run_seconds": round(time.perf_counter() - started, 1), "tokens_per_query": seen.tokens_per_query})
            (out / "knobs.json").write_text(json.dumps({"task": task.name, "rows": rows}, indent=2))
        base_agent.close()
    return {"task": task.name, "n_eval": n_eval, "general": general, "rows": rows}


def report(result: dict) -> str:
    adapter = "the general adapter" if result.get("general") else "a scoped adapter"
    lines = [f"{result['task']}: perfect labels into {adapter}, {result['n_eval']} held-out items per column",
             f"{'setting':<15}{'trained':>8}{'seen':>7}{'unseen':>8}{'ret.text':>10}{'ret.lik':>9}{'train s':>9}"
             "  gate"]
    for r in result["rows"]:
        if "status" in r:
            lines.append(f"{r['setting']:<15}  {r['status']}")
            continue
        lines.append(f"{r['setting']:<15}{r['n_train']:>8}{r['accuracy_seen']:>7.2f}{r['accuracy_unseen']:>8.2f}"
                     f"{(r['retention'] or 0):>10.2f}{(r.get('retention_likelihood') or 0):>9.2f}"
                     f"{r['train_seconds']:>9.0f}  {r.get('gate', '')}")
    return "\n".join(lines)
