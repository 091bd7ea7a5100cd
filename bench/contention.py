"""What background work costs the requests being served: System 1 latency with a consolidation running
in a thread or in a niced child process, and with System 2 labelling in the background.

    agent bench contention [--model default] [--examples 100] [--epochs 1] [--requests 30] [--repeats 2]
                           [--conditions none,thread,child,child-2t,child-nolend,child-nopause,inline,background]
                           [--system2-queries 10] [--gap 0]

Each condition starts from a fresh temporary store; conditions run one after the other and the whole set is
repeated ``--repeats`` times (interleaved, so that a change in the machine's load hits every condition):
- ``none``: ``--requests`` System 1 answers (``route="system1"``, at most 16 new tokens), one at a time,
  ``--gap`` seconds apart (0: back to back);
- ``thread`` / ``child`` / ``child-2t`` / ``child-nolend`` / ``child-nopause``: ``--examples`` two-digit
  additions are imported into the store (the ``{"input", "target"}`` lines ``agent store import`` takes), a
  consolidation is started by the scheduler (``scheduler.process`` thread, or child with 1 or 2 torch
  threads, niced by ``scheduler.nice``; ``child-nolend``: the default child, but serving keeps all its
  threads, ``scheduler.lend_cores = false``; ``child-nopause``: it computes beside the timed requests,
  ``scheduler.pause_for_users = 0``), and the same requests are timed once it holds the store's lock (that
  is, from its retention answers on); the run is then left to finish, and its duration reported;
- ``inline`` / ``background``: ``--system2-queries`` additions sent to System 2 (PAL, k=4) by the router, one
  after another, inline (the user waits) or in background mode (each System 1 pass at most 16 new tokens, as in
  ``none``: in background mode the routed p50 is System 1's latency while the labels of the queries before it
  run); then, in background mode, ``--system2-queries`` System 1 requests timed while the queue is still being
  labelled, and the time until every label is stored.
The load average is read before and after each condition: on a shared machine it says how much to trust a row.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from agent import Agent, AgentConfig
from bench import tasks

CONDITIONS = ("none", "thread", "child", "child-2t", "child-nolend", "child-nopause", "inline", "background")
CHILDREN = ("thread", "child", "child-2t", "child-nolend", "child-nopause")
MAX_TOKENS = 16
"""Length limit of each timed System 1 answer (a short answer, as a sum's)."""
QUESTIONS = [f"What is {a} + {b}?" for a, b in zip(range(71, 99), range(98, 70, -1))]
"""Timed System 1 questions; their operands lie outside the seeded training sums (10-69)."""


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _time_system1(agent: Agent, n: int, busy=lambda: True, gap: float = 0.0) -> tuple[list[float], int]:
    """Latencies of ``n`` System 1 answers, ``gap`` seconds apart, and how many of them started while ``busy()``
    was true."""
    latencies, overlapped = [], 0
    for i in range(n):
        if i and gap:
            time.sleep(gap)
        overlapped += bool(busy())
        t = time.perf_counter()
        agent.answer(QUESTIONS[i % len(QUESTIONS)], route="system1", max_new_tokens=MAX_TOKENS)
        latencies.append(time.perf_counter() - t)
    return latencies, overlapped


def _seed(agent: Agent, examples: int, folder: Path) -> int:
    lines = [json.dumps({"input": item.input, "target": item.answer})
             for item in tasks.arithmetic(2, n_train=examples, n_eval=0).train]
    path = folder / "seed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return agent.store.import_examples(path)


def _consolidation(agent: Agent, requests: int, finish: bool, gap: float) -> dict:
    scheduler = agent.start_scheduler()  # no trigger is configured: the run is started by hand below
    runner = threading.Thread(target=scheduler.run_now, kwargs={"trigger": "bench"}, daemon=True)
    started = time.perf_counter()
    runner.start()
    while agent.running_consolidation() is None and runner.is_alive():
        time.sleep(0.05)
    lock_after = time.perf_counter() - started
    latencies, overlapped = _time_system1(agent, requests, busy=runner.is_alive, gap=gap)
    if not finish:
        scheduler.shutdown()
    runner.join()
    report = scheduler.last_report
    return {"latencies": latencies, "overlapped": overlapped, "lock_after_s": round(lock_after, 1),
            "run_status": report.status if report else None, "run_seconds": round(time.perf_counter() - started, 1),
            "train_seconds": report.metrics.get("train_seconds") if report else None}


def _system2(agent: Agent, n: int, background: bool) -> dict:
    items = tasks.arithmetic(2, n_train=0, n_eval=n, seed=1).eval
    answered = []
    for item in items:
        t = time.perf_counter()
        answer = agent.answer(item.input, tag="addition", max_new_tokens=MAX_TOKENS)
        answered.append(time.perf_counter() - t)
    out: dict = {"routed_latencies": answered}
    if background:
        started = time.perf_counter()
        stats = agent.background_stats
        latencies, overlapped = _time_system1(agent, n, busy=lambda: stats()["labelled"] + stats()["failed"] < n)
        while stats()["labelled"] + stats()["failed"] < n:
            time.sleep(0.1)
        out.update(latencies=latencies, overlapped=overlapped, labelled_after_s=round(time.perf_counter() - started, 1),
                   background=stats())
    out["last_route_reason"] = answer.route_reason.get("system2")
    return out


def run_condition(base: AgentConfig, condition: str, examples: int, epochs: int, requests: int,
                  system2_queries: int, finish: bool, gap: float = 0.0) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="s2agent-bench-contention-") as home:
        cfg = copy.deepcopy(base)
        cfg.db, cfg.adapters_dir = str(Path(home) / "bench.db"), str(Path(home) / "adapters")
        cfg.answer_kind = "number"
        cfg.consolidation.epochs = epochs
        cfg.scheduler.interval_minutes = cfg.scheduler.min_pending = None
        cfg.scheduler.process = "thread" if condition == "thread" else "child"
        cfg.scheduler.train_threads = 2 if condition == "child-2t" else 1
        cfg.scheduler.lend_cores = condition != "child-nolend"
        if condition == "child-nopause":
            cfg.scheduler.pause_for_users = 0.0
        cfg.system2.methods_by_tag = {"addition": "pal"}
        cfg.system2.samples = 4
        cfg.system2.mode = "background" if condition == "background" else "inline"
        if condition in ("inline", "background"):
            cfg.routing.router = "always"
        with Agent(cfg) as agent:
            _time_system1(agent, 3)  # warm-up
            row: dict = {"condition": condition}
            if condition == "none":
                row["latencies"], row["overlapped"] = _time_system1(agent, requests, gap=gap)
            elif condition in CHILDREN:
                row["seeded"] = _seed(agent, examples, Path(home))
                row.update(_consolidation(agent, requests, finish, gap))
            else:
                row.update(_system2(agent, system2_queries, background=condition == "background"))
    for key in ("latencies", "routed_latencies"):
        if row.get(key):
            row[f"{key}_p50"] = round(statistics.median(row[key]), 3)
            row[f"{key}_p90"] = round(_quantile(row[key], 0.9), 3)
            row[key] = [round(v, 3) for v in row[key]]
    row["load_before"], row["load_after"] = [round(v, 2) for v in load_before], [round(v, 2) for v in os.getloadavg()]
    return row


def run(config: AgentConfig, conditions: list[str], examples: int = 100, epochs: int = 1, requests: int = 30,
        repeats: int = 2, system2_queries: int = 10, finish: bool = True, progress=None, gap: float = 0.0) -> dict:
    rows = []
    for repeat in range(repeats):
        for condition in conditions:
            row = run_condition(config, condition, examples, epochs, requests, system2_queries, finish, gap)
            row["repeat"] = repeat + 1
            rows.append(row)
            if progress:
                progress(row)
    return {"model": config.model, "cpus": os.cpu_count(), "examples": examples, "epochs": epochs, "requests": requests,
            "gap": gap, "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per condition: the median over repeats of each repeat's p50 (and p90), and the load seen."""
    out = []
    for condition in dict.fromkeys(r["condition"] for r in rows):
        mine = [r for r in rows if r["condition"] == condition]

        def med(key: str) -> float | None:
            values = [r[key] for r in mine if r.get(key) is not None]
            return round(statistics.median(values), 3) if values else None

        out.append({"condition": condition, "repeats": len(mine), "system1_p50": med("latencies_p50"),
                    "system1_p90": med("latencies_p90"), "routed_p50": med("routed_latencies_p50"),
                    "run_seconds": med("run_seconds"), "labelled_after_s": med("labelled_after_s"),
                    "overlapped": [r.get("overlapped") for r in mine],
                    "load1": [r["load_before"][0] for r in mine] + [r["load_after"][0] for r in mine]})
    return out


def report(result: dict) -> str:
    apart = f", {result['gap']:g} s apart" if result.get("gap") else ", back to back"
    lines = [f"model {result['model']}, {result['cpus']} CPUs; System 1 answers of at most {MAX_TOKENS} tokens{apart}",
             f"{'condition':<11} {'S1 p50':>7} {'S1 p90':>7} {'routed p50':>10} {'run s':>6} {'labelled s':>10}"
             f"  overlapped  load (1 min, before/after)"]

    def f(value, width):
        return f"{value:>{width}.2f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

    for s in result["summary"]:
        lines.append(f"{s['condition']:<11} {f(s['system1_p50'], 7)} {f(s['system1_p90'], 7)} "
                     f"{f(s['routed_p50'], 10)} {f(s['run_seconds'], 6)} {f(s['labelled_after_s'], 10)}  "
                     f"{str(s['overlapped']):<10}  {', '.join(f'{v:.1f}' for v in s['load1'])}")
    return "\n".join(lines)
