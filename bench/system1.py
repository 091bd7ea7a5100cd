"""System 1 speed on this machine: model load, latency, tokens/s, and the agent loop's overhead.

    agent bench system1 [--model default] [--new-tokens 64] [--repeats 8]

Prints: first load (dequantize the embedded GGUF into a fresh cache) and cached load times; System 1
latency (median, p90) and tokens/s at batch 1 and batch 8; and the overhead of ``Agent.answer``
(routing, logging to SQLite) over a raw ``model.generate`` producing the same tokens.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from agent import Agent, AgentConfig
from agent.backends.hf import HFBackend
from agent.models import DEFAULT_SPEC, resolve_model
from agent.prompting import render_prompt

PROMPTS = [
    "Write a short paragraph about the sea.",
    "Explain what a computer does, in a few sentences.",
    "Describe a walk in the forest.",
    "Tell me about the history of bread.",
    "What makes a good friend? Answer in a paragraph.",
    "Describe the city of Paris.",
    "Explain how plants grow.",
    "Write a short story about a cat.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(model: str = DEFAULT_SPEC, new_tokens: int = 64, repeats: int = 8, threads: int | None = None,
        measure_first_load: bool = True) -> dict:
    results: dict = {}
    if threads:
        torch.set_num_threads(threads)
    if measure_first_load and model == DEFAULT_SPEC:
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            path = resolve_model(model, cache)
            HFBackend(path)
            results["first_load_s"] = time.perf_counter() - t
    path = resolve_model(model)
    t = time.perf_counter()
    backend = HFBackend(path)
    results["cached_load_s"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as home:
        config = AgentConfig(model=model, db=str(Path(home) / "bench.db"), max_new_tokens=new_tokens)
        config.routing.router = "never"
        agent = Agent(config)
        # warm up both paths once
        agent.answer(PROMPTS[0], route="system1")

        # batch 1: agent.answer vs raw model.generate of exactly the same number of tokens
        agent_lat, raw_lat, tokens = [], [], []
        model_ = backend.base_model
        for i in range(repeats):
            prompt = PROMPTS[i % len(PROMPTS)]
            t = time.perf_counter()
            answer = agent.answer(prompt, route="system1")
            agent_lat.append(time.perf_counter() - t)
            tokens.append(answer.tokens_system1)
            ids = torch.tensor([render_prompt(backend.tokenizer, [{"role": "user", "content": prompt}])])
            t = time.perf_counter()
            with torch.inference_mode():
                model_.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=answer.tokens_system1, min_new_tokens=answer.tokens_system1)
            raw_lat.append(time.perf_counter() - t)
        results["batch1"] = {
            "latency_p50_s": statistics.median(agent_lat), "latency_p90_s": percentile(agent_lat, 0.9),
            "tokens_per_s": sum(tokens) / sum(agent_lat), "mean_tokens": statistics.mean(tokens),
        }
        results["raw_generate_tokens_per_s"] = sum(tokens) / sum(raw_lat)
        results["agent_overhead_pct"] = 100 * (sum(agent_lat) / sum(raw_lat) - 1)

        # batch 8: 8 concurrent callers share forward passes through the micro-batcher
        lat8: list[float] = []
        tok8: list[int] = []
        lock = threading.Lock()

        def call(prompt: str) -> None:
            t0 = time.perf_counter()
            a = agent.answer(prompt, route="system1")
            with lock:
                lat8.append(time.perf_counter() - t0)
                tok8.append(a.tokens_system1)

        t = time.perf_counter()
        for _ in range(max(1, repeats // 8)):
            workers = [threading.Thread(target=call, args=(p,)) for p in PROMPTS]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        wall = time.perf_counter() - t
        results["batch8"] = {
            "latency_p50_s": statistics.median(lat8), "latency_p90_s": percentile(lat8, 0.9),
            "tokens_per_s": sum(tok8) / wall,
        }
        agent.close()
    return results


def report(results: dict) -> str:
    lines = []
    if "first_load_s" in results:
        lines.append(f"first load (dequantize GGUF + load): {results['first_load_s']:.1f} s")
    lines.append(f"cached load: {results['cached_load_s']:.1f} s")
    for name in ("batch1", "batch8"):
        r = results[name]
        lines.append(f"{name}: p50 {r['latency_p50_s']:.2f} s, p90 {r['latency_p90_s']:.2f} s, "
                     f"{r['tokens_per_s']:.1f} tokens/s")
    lines.append(f"raw model.generate at batch 1: {results['raw_generate_tokens_per_s']:.1f} tokens/s")
    lines.append(f"Agent.answer overhead over raw generate: {results['agent_overhead_pct']:+.1f}%")
    return "\n".join(lines)
