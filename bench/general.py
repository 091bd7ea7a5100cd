"""Teach the general adapter a task from imported examples, with the defaults, as a user would.

    agent bench general [--task addition] [--n 300] [--n-eval 50] [--out bench/out/general]

1. A fresh data folder; the base model answers the general facts (``bench.live.FACTS``) and the task's held-out
   items (``eval``: operands seen in training; ``unseen``: operands never seen) with System 1;
2. ``--n`` correct task examples are written as ``{"input", "target"}`` lines and imported *untagged* with the
   real CLI (``agent store import``), then ``agent consolidate`` trains, gates and (if the gate passes)
   promotes the **general** adapter, both in subprocesses with this process's configuration (``--model``,
   ``--db``) and nothing else: the defaults decide;
3. the same questions again, answered by whatever serves now; facts kept = the share of the facts the base
   model answered right that are still right, also split by whether the fact's question is one of the shipped
   retention prompts the run trained on (facts it never trained on show what carries over).

Writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import Agent, AgentConfig
from bench import evaluate
from bench.live import FACTS
from bench.tasks import TASKS


def _answers(agent: Agent, task, n_eval: int) -> dict[str, Any]:
    facts = agent.system1_batch([f.question for f in FACTS], max_new_tokens=48)
    seen = evaluate.system1(agent, task.eval[:n_eval], task.kind, desc="seen operands")
    unseen = evaluate.system1(agent, task.unseen[:n_eval], task.kind, desc="unseen operands")
    return {"facts_right": [f.known_in(c.text) for f, c in zip(FACTS, facts)], "facts_text": [c.text for c in facts],
            "accuracy_seen": seen.accuracy, "accuracy_unseen": unseen.accuracy, "serving": agent.serving_version(None)}


def _cli(config: AgentConfig, *args: str) -> str:
    """``agent --model M --db D ARGS`` in a subprocess; its output, or an error with its stderr."""
    command = [sys.executable, "-m", "agent.cli", "--model", config.model, "--db", str(config.db), *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def run(config: AgentConfig, task_name: str, n: int, n_eval: int, out: Path) -> dict[str, Any]:
    task = TASKS[task_name](n_train=n, n_eval=n_eval)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"task": task.name, "n": n, "n_eval": n_eval, "model": config.model}
    with tempfile.TemporaryDirectory(prefix="s2agent-bench-general-") as home:
        config.db, config.adapters_dir = str(Path(home) / "agent.db"), str(Path(home) / "adapters")
        with Agent(config) as agent:
            before = _answers(agent, task, n_eval)
            data = Path(home) / "examples.jsonl"
            data.write_text("".join(json.dumps({"input": i.input, "target": i.answer}) + "\n" for i in task.train[:n]))
            result["import"] = _cli(config, "store", "import", str(data)).strip()
            started = time.perf_counter()
            result["consolidate"] = _cli(config, "consolidate").strip()
            result["consolidate_seconds"] = round(time.perf_counter() - started, 1)
            agent.refresh_adapters(force=True)
            after = _answers(agent, task, n_eval)
            rows = agent.adapters()
            adapter = max(rows, key=lambda row: row.version) if rows else None  # the one this run trained
            result["adapter"] = None if adapter is None else {
                "version": adapter.version, "status": adapter.status, "scope": adapter.scope,
                "n_train": adapter.n_train, **{k: adapter.metrics.get(k) for k in (
                    "retention", "retention_likelihood", "retention_kl", "holdout_accuracy_candidate",
                    "holdout_accuracy_serving", "status_reason")}}
    right_before = [i for i, ok in enumerate(before["facts_right"]) if ok]
    kept = sum(after["facts_right"][i] for i in right_before)
    result.update(before=before, after=after, facts_right_before=len(right_before), facts_kept=kept,
                  facts_kept_share=kept / len(right_before) if right_before else None)
    # the retention prompts the run trained on, as its adapter's metrics record them
    trained_on = (adapter.metrics.get("retention_trained") or []) if adapter else []
    trained = {p.strip().lower() for p in trained_on}
    was_trained = [i for i in right_before if FACTS[i].question.strip().lower() in trained]
    result["facts_in_retention_training"] = {"right_before": len(was_trained),
                                             "kept": sum(after["facts_right"][i] for i in was_trained)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def report(r: dict[str, Any]) -> str:
    a, b, adapter = r["after"], r["before"], r["adapter"] or {}
    share = r["facts_kept_share"]
    return "\n".join([
        f"{r['task']}: {r['n']} correct examples imported untagged, then `agent consolidate` with the defaults "
        f"({r['consolidate_seconds']:.0f} s)",
        f"  {r['consolidate'].splitlines()[-1] if r['consolidate'] else ''}",
        f"  general adapter: v{adapter.get('version')} {adapter.get('status')}, serving after: "
        f"{'v' + str(a['serving']) if a['serving'] else 'the base model'}; retention likelihood "
        f"{adapter.get('retention_likelihood')}, text {adapter.get('retention')}",
        f"  System 1 on held-out items, seen operands: {b['accuracy_seen']:.2f} -> {a['accuracy_seen']:.2f}; "
        f"unseen operands: {b['accuracy_unseen']:.2f} -> {a['accuracy_unseen']:.2f}",
        f"  general facts: {r['facts_right_before']} of {len(b['facts_right'])} right before, {r['facts_kept']} of them "
        f"still right after = {share:.2f}; of them {r['facts_in_retention_training']['right_before']} are retention "
        f"training prompts, {r['facts_in_retention_training']['kept']} kept" if share is not None
        else "  general facts: none right before",
    ])
