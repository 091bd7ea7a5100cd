"""Teach the general adapter a task from imported examples, with the defaults, as a user would.

    agent bench general [--task addition] [--n 300] [--n-eval 50] [--fractions 0.1] [--out bench/out/general]

1. A fresh data folder; the base model answers the general facts (the live replay's 32, ``bench.live.FACTS``, and
   96 more, ``bench.facts.MORE_FACTS``) and the task's held-out
   items (``eval``: operands seen in training; ``unseen``: operands never seen) with System 1;
2. ``--n`` correct task examples are written as ``{"input", "target"}`` lines and imported *untagged* with the
   real CLI (``agent store import``), then ``agent consolidate`` trains, gates and (if the gate passes)
   promotes the **general** adapter, both in subprocesses with this process's configuration (``--model``,
   ``--db``) and nothing else: the defaults decide;
3. the same questions again, answered by whatever serves now; facts kept = the share of the facts the base
   model answered right that are still right, also split by whether the fact's question is one of the shipped
   retention prompts the run trained on (facts it never trained on show what carries over).

The bar (facts kept >= 0.9) counts each fact the base model's greedy answer gets right, some of them by a coin
flip: a 135M model's rambling answer can reach the word through a token its two likeliest candidates nearly
tie on. Two measures say how much of the bar that is, with no adapter involved or almost none: the same base
weights computed in the other dtype (``numerics``: float32 against bfloat16, other rounding only), and the
trained adapter with its update scaled down (``--fractions``: 0.1 keeps a tenth of every LoRA update, which
learns almost nothing of the task). ``robust`` counts the facts kept among those both dtypes get right.

Writes ``results.json`` into ``--out``, with the machine it ran on (:mod:`bench.machine`): greedy answers, and so
the facts a base model gets right, differ between machines.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import Agent, AgentConfig
from agent.backends import serving_dtype
from agent.training import scale_update
from bench import evaluate, machine
from bench.facts import MORE_FACTS
from bench.live import FACTS
from bench.tasks import TASKS


ALL_FACTS = (*FACTS, *MORE_FACTS)
IN_REPLAY = [i < len(FACTS) for i in range(len(ALL_FACTS))]
"""Which of ``ALL_FACTS`` are the live replay's: the set the facts bar was first measured on."""


def _facts_right(agent: Agent, adapter: str | None = None) -> tuple[list[bool], list[str]]:
    facts = agent.system1_batch([f.question for f in ALL_FACTS], adapter=adapter, max_new_tokens=48)
    return [f.known_in(c.text) for f, c in zip(ALL_FACTS, facts)], [c.text for c in facts]


def _answers(agent: Agent, task, n_eval: int) -> dict[str, Any]:
    right, texts = _facts_right(agent)
    seen = evaluate.system1(agent, task.eval[:n_eval], task.kind, desc="seen operands")
    unseen = evaluate.system1(agent, task.unseen[:n_eval], task.kind, desc="unseen operands")
    return {"facts_right": right, "facts_text": texts,
            "accuracy_seen": seen.accuracy, "accuracy_unseen": unseen.accuracy, "serving": agent.serving_version(None)}


def _kept(before: list[bool], after: list[bool], among: list[bool] | None = None) -> dict[str, int]:
    """How many facts right in ``before`` (and in ``among``) are still right in ``after``."""
    right = [i for i, ok in enumerate(before) if ok and (among is None or among[i])]
    return {"right_before": len(right), "kept": sum(after[i] for i in right)}


def _kept_both(before: list[bool], after: list[bool]) -> dict[str, dict[str, int]]:
    """:func:`_kept` on the live replay's facts and on all of them."""
    return {"replay": _kept(before, after, among=IN_REPLAY), "all": _kept(before, after)}


def _other_numerics(config: AgentConfig, home: Path) -> dict[str, Any] | None:
    """The base model's facts computed in the other CPU dtype (float32 against bfloat16): same weights, other
    rounding. None on a backend whose dtype this bench does not switch (vLLM)."""
    if config.backend != "hf":
        return None
    twin = copy.deepcopy(config)
    twin.dtype = "float32" if serving_dtype(config) == "bfloat16" else "bfloat16"
    twin.db, twin.adapters_dir = str(home / "numerics.db"), str(home / "numerics-adapters")
    with Agent(twin) as agent:
        right, texts = _facts_right(agent)
    return {"dtype": twin.dtype, "facts_right": right, "facts_text": texts}


def _fractions(agent: Agent, task, n_eval: int, folder: Path, fractions: list[float], before: list[bool],
               home: Path) -> list[dict[str, Any]]:
    rows = []
    for i, fraction in enumerate(fractions):
        name = f"fraction-{i}"
        agent.backend.load_adapter(name, str(scale_update(folder, fraction, home / name)))
        try:
            right, texts = _facts_right(agent, adapter=name)
            unseen = evaluate.system1(agent, task.unseen[:n_eval], task.kind, adapter=name, desc=f"x{fraction:g}")
        finally:
            agent.backend.unload_adapter(name)
        rows.append({"fraction": fraction, **_kept_both(before, right), "accuracy_unseen": unseen.accuracy,
                     "facts_text": texts})
    return rows


def _cli(config: AgentConfig, *args: str) -> str:
    """``agent --model M --db D ARGS`` in a subprocess; its output, or an error with its stderr."""
    command = [sys.executable, "-m", "agent.cli", "--model", config.model, "--db", str(config.db), *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def run(config: AgentConfig, task_name: str, n: int, n_eval: int, out: Path,
        fractions: list[float] | None = None) -> dict[str, Any]:
    task = TASKS[task_name](n_train=n, n_eval=n_eval)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"task": task.name, "n": n, "n_eval": n_eval, "model": config.model,
                              "machine": machine.describe()}
    with tempfile.TemporaryDirectory(prefix="s2agent-bench-general-") as home:
        config.db, config.adapters_dir = str(Path(home) / "agent.db"), str(Path(home) / "adapters")
        numerics = _other_numerics(config, Path(home))
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
            result["fractions"] = _fractions(agent, task, n_eval, Path(adapter.path), fractions, before["facts_right"],
                                             Path(home)) if adapter and fractions and Path(adapter.path).is_dir() else []
    kept = _kept(before["facts_right"], after["facts_right"], among=IN_REPLAY)  # the bar's set, as first measured
    result.update(before=before, after=after, facts_right_before=kept["right_before"], facts_kept=kept["kept"],
                  facts_kept_share=kept["kept"] / kept["right_before"] if kept["right_before"] else None,
                  all_facts=_kept(before["facts_right"], after["facts_right"]))
    # the retention prompts the run trained on, as its adapter's metrics record them
    trained = {p.strip().lower() for p in ((adapter.metrics.get("retention_trained") or []) if adapter else [])}
    result["facts_in_retention_training"] = _kept(before["facts_right"], after["facts_right"],
                                                  among=[f.question.strip().lower() in trained for f in ALL_FACTS])
    if numerics is not None:
        result["numerics"] = {**numerics, **_kept_both(before["facts_right"], numerics["facts_right"])}
        result["robust"] = _kept(before["facts_right"], after["facts_right"], among=numerics["facts_right"])
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _share(kept: dict[str, int]) -> str:
    return f"{kept['kept']} of {kept['right_before']}" + (
        f" = {kept['kept'] / kept['right_before']:.2f}" if kept["right_before"] else "")


def report(r: dict[str, Any]) -> str:
    a, b, adapter = r["after"], r["before"], r["adapter"] or {}
    lines = [
        f"{r['task']}: {r['n']} correct examples imported untagged, then `agent consolidate` with the defaults "
        f"({r['consolidate_seconds']:.0f} s) on {r['machine']['cpu']}, torch {r['machine']['torch']} "
        f"({r['machine']['torch_cpu_capability']})",
        f"  {r['consolidate'].splitlines()[-1] if r['consolidate'] else ''}",
        f"  general adapter: v{adapter.get('version')} {adapter.get('status')}, serving after: "
        f"{'v' + str(a['serving']) if a['serving'] else 'the base model'}; retention likelihood "
        f"{adapter.get('retention_likelihood')}, text {adapter.get('retention')}",
        f"  System 1 on held-out items, seen operands: {b['accuracy_seen']:.2f} -> {a['accuracy_seen']:.2f}; "
        f"unseen operands: {b['accuracy_unseen']:.2f} -> {a['accuracy_unseen']:.2f}",
        f"  general facts: the live replay's {len(FACTS)}: {r['facts_right_before']} right before, still right after: "
        f"{_share({'right_before': r['facts_right_before'], 'kept': r['facts_kept']})}; all {len(ALL_FACTS)}: "
        f"{_share(r['all_facts'])}; {r['facts_in_retention_training']['right_before']} of them are retention training "
        f"prompts, {r['facts_in_retention_training']['kept']} kept",
    ]
    if "numerics" in r:
        n = r["numerics"]
        lines += [f"  the base model in {n['dtype']} (same weights, other rounding) gets {_share(n['replay'])} of the "
                  f"replay's right, {_share(n['all'])} of all",
                  f"  facts the base model gets right in both dtypes, still right after: {_share(r['robust'])}"]
    lines += [f"  the adapter at {f['fraction']:g} of its update: facts still right {_share(f['replay'])} of the "
              f"replay's, {_share(f['all'])} of all; unseen operands {f['accuracy_unseen']:.2f}"
              for f in r.get("fractions", [])]
    return "\n".join(lines)
