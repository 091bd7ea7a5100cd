"""What one consolidation costs on this machine, and how fast a new adapter starts serving.

    agent bench consolidation [--model default] [--examples 100] [--epochs 1] [--swaps 4]

Seeds a fresh temporary store with ``--examples`` correct two-digit additions (as if System 2 had
labelled them with PAL at full agreement), runs ``Agent.consolidate`` once with the configured
consolidation settings (LoRA rank, batch size, retention set, gate), and reports:
- training time per 100 training sequences per epoch (``train_seconds`` from the run's metrics,
  divided by the sequences actually trained on: task examples minus the holdout, plus retention);
- the whole run's seconds (retention answers, training, gate), and the gate's verdict;
- peak resident memory of this process during the run (psutil, sampled every 50 ms) and before it;
- the adapter's size on disk;
- hot-swap latency: ``Agent.refresh_adapters(force=True)`` loading an adapter that is not in memory
  and switching to it, median over ``--swaps`` switches between the adapter and a copy of it
  registered as a second version (adapter to adapter, as when a new version is promoted), plus one
  switch from the base model; and the latency of the first System 1 answer right after each switch.
When the gate rejects the candidate, it is promoted anyway for the swap measurement (said in the output).
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from agent import Agent, AgentConfig
from bench import tasks

QUESTION = "What is 81 + 94?"
"""Asked right after each swap; its operands lie outside the training range (10-69)."""
ANSWER_TOKENS = 16
"""Length limit of the System 1 answer timed after each swap."""


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the largest value seen (bytes)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.process = psutil.Process()
        self.interval = interval_s
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def folder_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def _timed_answer(agent: Agent) -> tuple[float, int, int | None]:
    t = time.perf_counter()
    answer = agent.answer(QUESTION, route="system1", max_new_tokens=ANSWER_TOKENS)
    return time.perf_counter() - t, answer.tokens_system1, answer.adapter_version


def _swap_to(agent: Agent, version: int) -> float:
    """Point the store at ``version`` (0: base model), then time the agent picking it up."""
    agent.backend.unload_adapter(f"v{version}")  # force a real load (a no-op when it is not loaded)
    agent.store.rollback(version=version)
    t = time.perf_counter()
    agent.refresh_adapters(force=True)
    return time.perf_counter() - t


def measure_swaps(agent: Agent, version: int, swaps: int) -> dict:
    """Hot-swap latency between ``version`` and a copy of it registered as the next version."""
    row = agent.store.get_adapter(version)
    twin_path = Path(row.path).with_name(f"v{version}-bench-copy")
    shutil.copytree(row.path, twin_path)
    twin = agent.store.next_adapter_version()
    agent.store.register_adapter(version=twin, path=str(twin_path), parent=version, status="candidate",
                                 metrics={}, n_train=row.n_train)
    agent.store.promote_adapter(twin)

    # from the base model: no LoRA layers in the model yet
    _swap_to(agent, 0)
    for name in (f"v{version}", f"v{twin}"):
        agent.backend.unload_adapter(name)
    from_base = _swap_to(agent, version)
    first_from_base = _timed_answer(agent)[0]

    swap_s, first_s, first_tokens, served = [], [], [], []
    for i in range(swaps):
        target = twin if i % 2 == 0 else version
        swap_s.append(_swap_to(agent, target))
        latency, tokens, adapter = _timed_answer(agent)
        first_s.append(latency)
        first_tokens.append(tokens)
        served.append(adapter == target)
    steady = [_timed_answer(agent)[0] for _ in range(3)]
    return {
        "swap_from_base_s": from_base, "first_answer_after_swap_from_base_s": first_from_base,
        "swaps": swaps, "swap_s": swap_s, "swap_median_s": statistics.median(swap_s) if swap_s else None,
        "first_answer_after_swap_median_s": statistics.median(first_s) if first_s else None,
        "first_answer_tokens": statistics.mean(first_tokens) if first_tokens else None,
        "steady_answer_median_s": statistics.median(steady),
        "answers_served_by_new_adapter": sum(served),
    }


def run(config: AgentConfig | None = None, examples: int = 100, epochs: int = 1, swaps: int = 4) -> dict:
    """One consolidation of ``examples`` synthetic additions on ``config.model``; see the module docstring."""
    base = copy.deepcopy(config or AgentConfig())
    results: dict = {"model": base.model, "examples": examples, "epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="s2agent-bench-consolidation-") as home:
        cfg = copy.deepcopy(base)
        cfg.db, cfg.adapters_dir = str(Path(home) / "bench.db"), str(Path(home) / "adapters")
        cfg.answer_kind = "number"
        cfg.scheduler.interval_minutes = cfg.scheduler.min_pending = None
        with Agent(cfg) as agent:
            items = tasks.arithmetic(2, n_train=examples, n_eval=0).train
            for item in items:
                agent.store.add_example(item.input, item.answer, method="pal", agreement=1.0,
                                        votes={item.answer: 1})
            results["examples"] = len(items)
            rss_before = psutil.Process().memory_info().rss
            t = time.perf_counter()
            with PeakRSS() as rss:
                outcome = agent.consolidate(epochs=epochs, min_examples=1)
            wall = time.perf_counter() - t
            m = outcome.metrics
            n_train = m.get("n_train") or 0
            train_s = m.get("train_seconds")
            results.update(
                status=outcome.status, reason=outcome.reason, n_new=outcome.n_new, n_holdout=outcome.n_holdout,
                n_retention=outcome.n_retention, n_retention_holdout=outcome.n_retention_holdout, n_train=n_train,
                train_steps=m.get("train_steps"), bf16=m.get("bf16"), train_seconds=train_s,
                seconds_per_100_per_epoch=(train_s / n_train * 100 / epochs) if train_s and n_train else None,
                run_seconds=outcome.seconds, wall_seconds=wall,
                other_seconds=(outcome.seconds - train_s) if train_s is not None else None,
                rss_before_mb=rss_before / 1e6, peak_rss_mb=rss.peak / 1e6,
                rank=cfg.consolidation.rank, batch_size=cfg.consolidation.batch_size,
            )
            version = outcome.adapter_version
            if version is None:
                results["adapter_mb"] = None
                results["hot_swap"] = None
                return results
            results["adapter_version"] = version
            results["adapter_mb"] = folder_mb(agent.store.get_adapter(version).path)
            results["promoted_for_bench"] = outcome.status != "promoted"
            if outcome.status != "promoted":
                agent.store.promote_adapter(version)
            results["hot_swap"] = measure_swaps(agent, version, swaps)
    return results


def report(r: dict) -> str:
    def s(value, fmt=".2f", unit=" s") -> str:
        return "-" if value is None else f"{value:{fmt}}{unit}"

    lines = [
        f"model {r['model']}: {r['examples']} synthetic additions, {r['epochs']} epoch(s)",
        f"run: {r['status']} ({r['reason']})",
        f"trained on {r.get('n_train', 0)} sequences ({r.get('n_new', 0)} task + {r.get('n_retention', 0)} "
        f"retention; {r.get('n_holdout', 0)} task and {r.get('n_retention_holdout', 0)} retention held out), "
        f"{r.get('train_steps') or 0} steps, LoRA r={r.get('rank')}, batch {r.get('batch_size')}, bf16 {r.get('bf16')}",
        f"training: {s(r.get('train_seconds'))}, {s(r.get('seconds_per_100_per_epoch'))} per 100 sequences per epoch",
        f"whole run (retention answers, training, gate): {s(r.get('run_seconds'))} "
        f"({s(r.get('other_seconds'))} outside training); Agent.consolidate() call: {s(r.get('wall_seconds'))}",
        f"memory: {r['rss_before_mb']:.0f} MB before, peak {r['peak_rss_mb']:.0f} MB during the run"
        if "peak_rss_mb" in r else "memory: -",
        f"adapter on disk: {s(r.get('adapter_mb'), '.1f', ' MB')}",
    ]
    swap = r.get("hot_swap")
    if swap:
        note = " (the gate rejected it; promoted anyway to time the swap)" if r.get("promoted_for_bench") else ""
        lines += [
            f"hot-swap{note}: base -> adapter {s(swap['swap_from_base_s'], '.3f')}, adapter -> adapter median "
            f"{s(swap['swap_median_s'], '.3f')} over {swap['swaps']}",
            f"first System 1 answer after a swap: median {s(swap['first_answer_after_swap_median_s'], '.3f')} "
            f"(~{swap['first_answer_tokens'] or 0:.0f} tokens; after base -> adapter "
            f"{s(swap['first_answer_after_swap_from_base_s'], '.3f')}); steady state "
            f"{s(swap['steady_answer_median_s'], '.3f')}; served by the new adapter "
            f"{swap['answers_served_by_new_adapter']}/{swap['swaps']}",
        ]
    else:
        lines.append("hot-swap: - (no adapter was trained)")
    return "\n".join(lines)
