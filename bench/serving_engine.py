"""The engine's side of ``agent bench serving``: what continuous batching and token streaming must deliver.

Measured on one running server (batching on), side by side in one run:

- **time to first token** at 1 client: streamed chat completions (System 1), the time to the first chunk with
  text, p50, and as a fraction of the whole answer's time (a one-sentence chat, and a 64-token answer);
- **tokens/s at 8 clients against a raw batch-8** ``model.generate`` of the same prompts and lengths: the
  clients each send requests whose end-of-sequence token is biased away (``logit_bias``), so every answer is
  ``max_tokens`` long, and ``generate`` runs the same 8 templated prompts with ``min_new_tokens`` equal to it;
- **System 1 p90 with and without 2 concurrent System 2 (PAL) clients**: one client sends System 1 requests
  one after the other, alone, then while two clients loop ``route: system2, method: pal`` requests.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from agent import Agent
from bench.system1 import PROMPTS

PAL_QUESTIONS = ["What is 47 + 38?", "Alice has 3 apples and buys 5 more. How many apples does she have?",
                 "A coin is heads up. Bob flips it. Is it heads up?", "What is 12 * 7?"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _no_eos(agent: Agent) -> dict[str, float]:
    return {str(agent.backend.inner.tokenizer.eos_token_id): -100}


def time_to_first_token(url: str, requests: int, max_tokens: int, bias: dict[str, float] | None) -> dict[str, Any]:
    """``requests`` streamed chats, one at a time: first-text-chunk and whole-answer times."""
    import httpx

    first: list[float] = []
    whole: list[float] = []
    with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
        for i in range(requests):
            body: dict[str, Any] = {"model": "default", "max_tokens": max_tokens, "stream": True,
                                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                    "s2agent": {"route": "system1"}}
            if bias:
                body["logit_bias"] = bias
            t = time.perf_counter()
            seen = None
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if seen is None and '"content": "' in line and '"content": ""' not in line:
                        seen = time.perf_counter() - t
            whole.append(time.perf_counter() - t)
            first.append(seen if seen is not None else whole[-1])
    ratio = [f / w for f, w in zip(first, whole) if w > 0]
    return {"requests": requests, "max_tokens": max_tokens, "ttft_p50_s": statistics.median(first),
            "answer_p50_s": statistics.median(whole), "ttft_over_answer_p50": statistics.median(ratio)}


def raw_generate(agent: Agent, batch: int, max_tokens: int, repeats: int = 2) -> dict[str, Any]:
    """tokens/s of ``model.generate`` on ``batch`` templated System 1 prompts, each ``max_tokens`` long."""
    import torch

    from agent.prompting import render_prompt, system1_messages

    engine = agent.backend.inner
    tok = engine.tokenizer
    prompts = [render_prompt(tok, system1_messages(PROMPTS[i % len(PROMPTS)]), engine.system_prompt)
               for i in range(batch)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    best = float("inf")
    with engine.lock, torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            engine.base_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                       min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            best = min(best, time.perf_counter() - t)
    return {"batch": batch, "max_tokens": max_tokens, "tokens_per_s": batch * max_tokens / best, "seconds": best}


def system1_under_pal(url: str, requests: int, max_tokens: int) -> dict[str, Any]:
    """System 1 latency p90 alone, then with two clients looping PAL (System 2) requests."""
    import httpx

    def system1(http: httpx.Client) -> list[float]:
        out = []
        for i in range(requests):
            t = time.perf_counter()
            http.post("/v1/chat/completions", json={
                "model": "default", "max_tokens": max_tokens, "s2agent": {"route": "system1"},
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}).raise_for_status()
            out.append(time.perf_counter() - t)
        return out

    stop = threading.Event()
    pal_done: list[float] = []

    def pal(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
            i = index
            while not stop.is_set():
                t = time.perf_counter()
                http.post("/v1/chat/completions", json={
                    "model": "default", "s2agent": {"route": "system2", "method": "pal"},
                    "messages": [{"role": "user", "content": PAL_QUESTIONS[i % len(PAL_QUESTIONS)]}]})
                pal_done.append(time.perf_counter() - t)
                i += 2

    with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
        alone = system1(http)
        workers = [threading.Thread(target=pal, args=(i,), daemon=True) for i in range(2)]
        for w in workers:
            w.start()
        time.sleep(1.0)  # both PAL clients are decoding
        try:
            loaded = system1(http)
        finally:
            stop.set()
            for w in workers:
                w.join()
    p90_alone, p90_loaded = _percentile(alone, 0.9), _percentile(loaded, 0.9)
    return {"requests": requests, "max_tokens": max_tokens, "system1_p90_alone_s": p90_alone,
            "system1_p90_with_pal_s": p90_loaded, "ratio": p90_loaded / p90_alone if p90_alone else None,
            "pal_requests": len(pal_done)}


def run(agent: Agent, url: str, drive, requests: int = 8, max_tokens: int = 32) -> dict[str, Any]:
    """All three measurements on the running server ``url`` of ``agent``; ``drive`` is ``bench.serving.drive``."""
    out: dict[str, Any] = {}
    out["ttft_sentence"] = time_to_first_token(url, requests, 24, None)
    out["ttft_64"] = time_to_first_token(url, requests, 64, _no_eos(agent))
    clients = drive(url, 8, max(1, requests // 4), max_tokens, extra={"logit_bias": _no_eos(agent)})
    raw = raw_generate(agent, 8, max_tokens)
    out["tokens_8_clients"] = {"server_tokens_per_s": clients["tokens_per_s"], "raw_tokens_per_s": raw["tokens_per_s"],
                               "ratio": clients["tokens_per_s"] / raw["tokens_per_s"], "errors": clients["errors"]}
    out["system1_under_pal"] = system1_under_pal(url, requests, max_tokens)
    return out


def report(r: dict[str, Any]) -> str:
    s, l64 = r["ttft_sentence"], r["ttft_64"]
    t, p = r["tokens_8_clients"], r["system1_under_pal"]
    return "\n".join([
        "engine (batching on, same run):",
        f"  time to first token, 1 client, one sentence: p50 {s['ttft_p50_s']:.3f} s (answer {s['answer_p50_s']:.3f} s)",
        f"  time to first token, 1 client, 64 tokens: p50 {l64['ttft_p50_s']:.3f} s = "
        f"{l64['ttft_over_answer_p50']:.2f} of the answer's {l64['answer_p50_s']:.3f} s",
        f"  8 clients: {t['server_tokens_per_s']:.1f} tokens/s vs raw batch-8 generate {t['raw_tokens_per_s']:.1f} "
        f"tokens/s = {t['ratio']:.2f}x ({t['errors']} errors)",
        f"  System 1 p90: {p['system1_p90_alone_s']:.3f} s alone, {p['system1_p90_with_pal_s']:.3f} s with 2 PAL "
        f"clients = {p['ratio']:.2f}x ({p['pal_requests']} PAL answers meanwhile)",
    ])
