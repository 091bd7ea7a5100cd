"""System 1 speed on this machine: model load, latency, tokens/s, and the agent loop's overhead.

    agent bench system1 [--model default] [--new-tokens 64] [--repeats 8]

Prints: first load (dequantize the embedded GGUF into a fresh cache) and cached load times; System 1
latency (median, p90) and tokens/s at batch 1 and batch 8; the overhead of ``Agent.answer``
(routing, logging to SQLite) over a raw ``model.generate`` producing the same tokens (both in the dtype the
config serves in; the raw side in a fresh process, :mod:`bench.fresh` says why); how many of the live
replay's 32 general facts System 1 answers right; the seconds of one decode step of the bare engine by
rows decoding together, in float32 and in bfloat16: what a System 1 row pays for the rows beside it; and the
seconds per prompt of short answers in batches of 16 with no adapter, beside one, and with one.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from agent import Agent, AgentConfig
from agent.backends import serving_dtype
from agent.backends.base import GenerationRequest, SamplingParams
from agent.backends.hf import HFBackend, cpu_dtype
from agent.models import DEFAULT_SPEC, resolve_model
from bench import fresh
from bench.live import FACTS
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


def decode_step_seconds(path: str, rows: tuple[int, ...] = (1, 2, 3, 4, 8), new_tokens: int = 48,
                        dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, dict[int, float]]:
    """Seconds per decode step of :class:`HFBackend` with ``rows`` sampled rows (end of sequence biased away, so
    every row decodes ``new_tokens``), per dtype; the one-sentence prompt's prefill is spread over the steps.
    :func:`run` calls it in a fresh process (:mod:`bench.fresh`)."""
    out: dict[str, dict[int, float]] = {}
    for dtype in dtypes:
        engine = HFBackend(path, dtype=cpu_dtype(dtype))
        never = ((engine.tokenizer.eos_token_id, -100.0),)
        ask = [{"role": "user", "content": PROMPTS[5]}]
        engine.generate([GenerationRequest(ask, SamplingParams(max_new_tokens=4))])  # warm up
        out[dtype] = {}
        for n in rows:
            params = SamplingParams(n=n, temperature=0.7, max_new_tokens=new_tokens, logit_bias=never, seed=0)
            t = time.perf_counter()
            engine.generate([GenerationRequest(ask, params)])
            out[dtype][n] = (time.perf_counter() - t) / new_tokens
        del engine
    return out


def blank_adapters(model_path: str, folders: list[str]) -> None:
    """Save a blank LoRA adapter (B = 0) of the model into each folder: what a swap benchmark swaps is measured
    for the swap, not for what it learned. Run in a fresh process (:mod:`bench.fresh`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), LoraConfig(r=8, lora_alpha=16))
    for folder in folders:
        model.save_pretrained(folder)


def adapter_batch_seconds(path: str, dtype: str, folder: str, batch: int = 16, prompts: int = 96,
                          new_tokens: int = 3) -> dict[str, float]:
    """Seconds per prompt of short System 1 answers (sums, ``new_tokens`` each) in batches of ``batch`` on the
    bare engine: with no adapter loaded, for base rows beside a loaded adapter, and for rows of that adapter (a
    blank one, saved into ``folder``: its cost, not what it learned). :func:`run` calls it in a fresh process."""
    blank_adapters(path, [folder])
    engine = HFBackend(path, dtype=cpu_dtype(dtype))
    asks = [[{"role": "user", "content": f"What is {10 + i % 60} + {69 - i % 50}?"}] for i in range(prompts)]
    params = SamplingParams(max_new_tokens=new_tokens)

    def per_prompt(adapter: str | None) -> float:
        engine.generate([GenerationRequest(q, params, adapter) for q in asks[:batch]])  # warm up
        t = time.perf_counter()
        for start in range(0, prompts, batch):
            engine.generate([GenerationRequest(q, params, adapter) for q in asks[start:start + batch]])
        return (time.perf_counter() - t) / prompts

    out = {"no adapter loaded": per_prompt(None)}
    engine.load_adapter("blank", folder)
    out["base rows, an adapter loaded"] = per_prompt(None)
    out["rows of the adapter"] = per_prompt("blank")
    return out


def raw_generate_seconds(path: str, dtype: str, prompts: list[str], tokens: list[int]) -> list[float]:
    """Seconds of a greedy batch-1 ``model.generate`` of ``tokens[i]`` tokens for each of ``prompts``, on a bare
    model loaded here; :func:`run` calls it in a fresh process (:mod:`bench.fresh`)."""
    backend = HFBackend(path, dtype=cpu_dtype(dtype))
    seconds = []
    for prompt, count in zip(prompts, tokens):
        ids = torch.tensor([render_prompt(backend.tokenizer, [{"role": "user", "content": prompt}])])
        t = time.perf_counter()
        with torch.inference_mode():
            backend.base_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=count, min_new_tokens=count)
        seconds.append(time.perf_counter() - t)
    return seconds


def run(model: str = DEFAULT_SPEC, new_tokens: int = 64, repeats: int = 8, threads: int | None = None,
        measure_first_load: bool = True, dtype: str = "auto") -> dict:
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
    HFBackend(path, dtype=cpu_dtype(dtype))
    results["cached_load_s"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as home:
        config = AgentConfig(model=model, db=str(Path(home) / "bench.db"), max_new_tokens=new_tokens, dtype=dtype)
        config.routing.router = "never"
        results["dtype"] = serving_dtype(config)
        agent = Agent(config)
        # warm up both paths once
        agent.answer(PROMPTS[0], route="system1")

        # batch 1: agent.answer vs raw model.generate of exactly the same number of tokens
        agent_lat, tokens = [], []
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(repeats)]
        for prompt in prompts:
            t = time.perf_counter()
            answer = agent.answer(prompt, route="system1")
            agent_lat.append(time.perf_counter() - t)
            tokens.append(answer.tokens_system1)
        raw_lat = fresh.call("bench.system1", "raw_generate_seconds", path, dtype, prompts, tokens)
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
        facts = agent.system1_batch([f.question for f in FACTS], max_new_tokens=48)
        results["facts_right"] = sum(f.known_in(c.text) for f, c in zip(FACTS, facts))
        results["facts"] = len(FACTS)
        agent.close()
    results["decode_step_s"] = {dtype: {int(n): s for n, s in by_rows.items()}  # JSON keys come back as strings
                                for dtype, by_rows in fresh.call("bench.system1", "decode_step_seconds", path).items()}
    with tempfile.TemporaryDirectory() as folder:
        results["adapter_batch_s"] = fresh.call("bench.system1", "adapter_batch_seconds", path, dtype, folder)
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
    lines.append(f"Agent.answer overhead over raw generate: {results['agent_overhead_pct']:+.1f}% "
                 f"(serving in {results['dtype']})")
    lines.append(f"general facts System 1 answers right (greedy, {results['dtype']}): "
                 f"{results['facts_right']} of {results['facts']}")
    steps = results["decode_step_s"]
    counts = list(next(iter(steps.values())))
    lines.append("seconds per decode step, by rows decoding together: " + " ".join(f"{n:>6}" for n in counts))
    for dtype, row in steps.items():
        lines.append(f"  {dtype:<9}" + " ".join(f"{row[n]:6.3f}" for n in counts))
    lines.append("seconds per prompt, System 1 sums in batches of 16, 3 new tokens: " + ", ".join(
        f"{what} {seconds:.4f}" for what, seconds in results["adapter_batch_s"].items()))
    return "\n".join(lines)
