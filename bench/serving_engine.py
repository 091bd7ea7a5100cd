"""The engine's side of ``agent bench serving``: what continuous batching and token streaming must deliver.

Measured on one running server (batching on), side by side in one run:

- **time to first token** at 1 client: streamed chat completions (System 1), the time to the first chunk with
  text, p50, and as a fraction of the whole answer's time (a one-sentence chat, and a 64-token answer);
- **tokens/s at 8 clients against a raw batch-8** ``model.generate`` of the same prompts and lengths: the
  clients each send requests whose end-of-sequence token is biased away (``logit_bias``), so every answer is
  ``max_tokens`` long, and ``generate`` runs the same 8 templated prompts with ``min_new_tokens`` equal to it,
  in a fresh process with the same dtype (:mod:`bench.fresh` says why);
- **System 1 p90 with and without 2 concurrent System 2 (PAL) clients**: one client sends System 1 requests
  one after the other, alone, then while two clients loop ``route: system2, method: pal`` requests;
- **a 1-token request beside an abandoned long prompt**: a client sends a ~1,500-token prompt (256 tokens asked
  for) and hangs up once it is being prefilled; a 1-token request sent then is timed, and so is how long the
  abandoned one kept the engine; with the configured ``prefill_chunk`` and with each prompt in one pass;
- **hot-swap during continuous batching**: clients loop System 1 requests (half of them streamed) while the
  serving adapter changes twice (base model -> v1 -> v2, :meth:`Agent.promote`); failed requests, and
  whether every request sent after a swap was served by the new adapter.
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent import Agent
from bench import fresh
from bench.system1 import PROMPTS

PAL_QUESTIONS = ["What is 47 + 38?", "Alice has 3 apples and buys 5 more. How many apples does she have?",
                 "A coin is heads up. Bob flips it. Is it heads up?", "What is 12 * 7?"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _no_eos(agent: Agent) -> dict[str, float]:
    return {str(agent.backend.inner.tokenizer.eos_token_id): -100}


def time_to_first_token(url: str, requests: int, max_tokens: int, bias: dict[str, float] | None,
                        model: str = "default", system1: bool = True) -> dict[str, Any]:
    """``requests`` streamed chats, one at a time: first-text-chunk and whole-answer times. ``system1``: force
    System 1 with this runtime's ``s2agent`` field (False: a plain OpenAI request, for any server)."""
    import httpx

    first: list[float] = []
    whole: list[float] = []
    with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
        for i in range(requests):
            body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True,
                                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            if system1:
                body["s2agent"] = {"route": "system1"}
            if bias:
                body["logit_bias"] = bias
            t = time.perf_counter()
            seen = None
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if seen is None and _has_text(line):
                        seen = time.perf_counter() - t
            whole.append(time.perf_counter() - t)
            first.append(seen if seen is not None else whole[-1])
    ratio = [f / w for f, w in zip(first, whole) if w > 0]
    return {"requests": requests, "max_tokens": max_tokens, "ttft_p50_s": statistics.median(first),
            "answer_p50_s": statistics.median(whole), "ttft_over_answer_p50": statistics.median(ratio)}


def _has_text(line: str) -> bool:
    """Whether one server-sent-events line is a chunk carrying answer text (any server's JSON spacing)."""
    if not line.startswith("data:") or line.endswith("[DONE]"):
        return False
    try:
        choices = json.loads(line[len("data:"):]).get("choices") or []
    except ValueError:
        return False
    return any((c.get("delta") or {}).get("content") for c in choices)


def raw_generate(model_path: str, dtype: str, system_prompt: str | None, batch: int, max_tokens: int,
                 repeats: int = 2) -> dict[str, Any]:
    """tokens/s of ``model.generate`` on ``batch`` templated System 1 prompts, each ``max_tokens`` long, on a bare
    engine loaded here; run it in a fresh process (:mod:`bench.fresh`), where it is the only thread running torch."""
    import torch

    from agent.backends.hf import HFBackend, cpu_dtype
    from agent.prompting import render_prompt, system1_messages

    engine = HFBackend(model_path, dtype=cpu_dtype(dtype), system_prompt=system_prompt)
    tok = engine.tokenizer
    prompts = [render_prompt(tok, system1_messages(PROMPTS[i % len(PROMPTS)]), engine.system_prompt)
               for i in range(batch)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    best = float("inf")
    with torch.inference_mode():
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


def abandoned_long_prompt(agent: Agent, url: str, repeats: int, prompt_tokens: int = 1500,
                          answer_tokens: int = 256) -> dict[str, Any]:
    """The 1-token request's latency while an abandoned ``prompt_tokens`` prompt is in flight (p50 and worst over
    ``repeats``), and the seconds from the hang-up until the engine dropped the abandoned rows. A model with a
    shorter context gets the longest prompt it takes."""
    import httpx

    batcher = agent.backend
    tok = batcher.inner.tokenizer
    prompt_tokens = min(prompt_tokens, batcher.context_length - answer_tokens - 16)
    words = " ".join(f"item {i} is {i * 7 % 100}." for i in range(prompt_tokens))
    prompt = tok.decode(tok.encode(words, add_special_tokens=False)[:prompt_tokens])
    body = json.dumps({"model": "default", "prompt": prompt, "max_tokens": answer_tokens,
                       "logit_bias": _no_eos(agent)}).encode()
    host, port = url.removeprefix("http://").split(":")
    latencies, held, dropped_all = [], [], True
    with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
        for _ in range(repeats):
            started, dropped, finished = batcher.prefills_started, batcher.dropped_rows, batcher.finished_rows
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                _until(lambda: batcher.prefills_started > started, 60)  # its prefill has begun (not ended)
            gone = time.perf_counter()
            http.post("/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 1}).raise_for_status()
            latencies.append(time.perf_counter() - gone)
            # dropped, or (a model so fast the hang-up came too late) decoded to its end beside the 1-token row
            _until(lambda: batcher.dropped_rows > dropped or batcher.finished_rows > finished + 1, 600)
            held.append(time.perf_counter() - gone)
            dropped_all &= batcher.dropped_rows > dropped
    return {"prompt_tokens": len(tok.encode(prompt, add_special_tokens=False)), "repeats": repeats,
            "prefill_chunk": batcher.prefill_chunk, "one_token_p50_s": statistics.median(latencies),
            "one_token_max_s": max(latencies), "abandoned_held_p50_s": statistics.median(held),
            "abandoned_dropped": dropped_all}


def _until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not get there in time")
        time.sleep(0.005)


def hot_swap_under_load(agent: Agent, url: str, clients: int = 4, seconds: float = 4.0) -> dict[str, Any]:
    """``clients`` loop System 1 requests while the serving adapter changes base -> v1 -> v2, ``seconds`` apart."""
    import httpx

    outcomes: list[tuple[float, int | None, str | None]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
            i = index
            while not stop.is_set():
                body = {"model": "default", "max_tokens": 16, "stream": i % 2 == 1, "s2agent": {"route": "system1"},
                        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                started, version, error = time.perf_counter(), None, None
                try:
                    if body["stream"]:
                        with http.stream("POST", "/v1/chat/completions", json=body) as response:
                            response.raise_for_status()
                            last = [line for line in response.iter_lines() if line.startswith("data: {")][-1]
                        version = json.loads(last[6:])["s2agent"]["adapter_version"]
                    else:
                        response = http.post("/v1/chat/completions", json=body)
                        response.raise_for_status()
                        version = response.json()["s2agent"]["adapter_version"]
                except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with lock:
                    outcomes.append((started, version, error))
                i += clients

    with tempfile.TemporaryDirectory(prefix="s2agent-bench-swap-") as tmp:
        versions = []
        folders = [str(Path(tmp) / f"swap-{seed}") for seed in (1, 2)]
        fresh.call("bench.system1", "blank_adapters", agent.model_path, folders)
        for folder in folders:
            version = agent.store.next_adapter_version()
            agent.store.register_adapter(version, str(folder), agent.serving_version(None))
            versions.append(version)
        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for w in workers:
            w.start()
        swaps: list[tuple[float, float, int]] = []  # (promote called, promote returned, version)
        try:
            for version in versions:
                time.sleep(seconds)
                called = time.perf_counter()
                agent.promote(version)
                swaps.append((called, time.perf_counter(), version))
            time.sleep(seconds)
        finally:
            stop.set()
            for w in workers:
                w.join()
        agent.rollback(0)
    errors = [e for _, _, e in outcomes if e]
    after = {}
    for k, (_, at, version) in enumerate(swaps):  # sent after this swap ended, before the next one began
        until = swaps[k + 1][0] if k + 1 < len(swaps) else float("inf")
        served = [v for started, v, e in outcomes if at < started < until and not e]
        after[f"v{version}"] = {"requests": len(served), "served_by_it": sum(v == version for v in served)}
    return {"clients": clients, "requests": len(outcomes), "errors": len(errors), "error_examples": errors[:3],
            "after_swap": after}


def run(agent: Agent, url: str, drive, requests: int = 8, max_tokens: int = 32) -> dict[str, Any]:
    """All three measurements on the running server ``url`` of ``agent``; ``drive`` is ``bench.serving.drive``."""
    out: dict[str, Any] = {}
    out["ttft_sentence"] = time_to_first_token(url, requests, 24, None)
    out["ttft_64"] = time_to_first_token(url, requests, 64, _no_eos(agent))
    clients = drive(url, 8, max(1, requests // 4), max_tokens, extra={"logit_bias": _no_eos(agent)})
    raw = fresh.call("bench.serving_engine", "raw_generate", agent.model_path, agent.config.dtype,
                     agent.config.system_prompt, 8, max_tokens)
    out["tokens_8_clients"] = {"server_tokens_per_s": clients["tokens_per_s"], "raw_tokens_per_s": raw["tokens_per_s"],
                               "ratio": clients["tokens_per_s"] / raw["tokens_per_s"], "errors": clients["errors"]}
    out["system1_under_pal"] = system1_under_pal(url, requests, max_tokens)
    chunk = agent.backend.prefill_chunk
    out["abandoned"] = [abandoned_long_prompt(agent, url, max(1, requests // 4))]
    agent.backend.prefill_chunk = None  # the same, each prompt prefilled in one pass
    try:
        out["abandoned"].append(abandoned_long_prompt(agent, url, max(1, requests // 4)))
    finally:
        agent.backend.prefill_chunk = chunk
    out["hot_swap"] = hot_swap_under_load(agent, url)
    return out


def report(r: dict[str, Any]) -> str:
    s, l64 = r["ttft_sentence"], r["ttft_64"]
    t, p, h = r["tokens_8_clients"], r["system1_under_pal"], r["hot_swap"]
    return "\n".join([
        "engine (batching on, same run):",
        f"  time to first token, 1 client, one sentence: p50 {s['ttft_p50_s']:.3f} s (answer {s['answer_p50_s']:.3f} s)",
        f"  time to first token, 1 client, 64 tokens: p50 {l64['ttft_p50_s']:.3f} s = "
        f"{l64['ttft_over_answer_p50']:.2f} of the answer's {l64['answer_p50_s']:.3f} s",
        f"  8 clients: {t['server_tokens_per_s']:.1f} tokens/s vs raw batch-8 generate {t['raw_tokens_per_s']:.1f} "
        f"tokens/s = {t['ratio']:.2f}x ({t['errors']} errors)",
        f"  System 1 p90: {p['system1_p90_alone_s']:.3f} s alone, {p['system1_p90_with_pal_s']:.3f} s with 2 PAL "
        f"clients = {p['ratio']:.2f}x ({p['pal_requests']} PAL answers meanwhile)",
        *[f"  1-token request beside an abandoned {a['prompt_tokens']}-token prompt (prefill_chunk "
          f"{a['prefill_chunk'] or 'off'}): p50 {a['one_token_p50_s']:.3f} s, worst {a['one_token_max_s']:.3f} s; "
          f"the abandoned one {'dropped' if a['abandoned_dropped'] else 'ended'} {a['abandoned_held_p50_s']:.2f} s "
          f"after the hang-up" for a in r["abandoned"]],
        f"  hot-swap during continuous batching ({h['clients']} clients, base -> " + " -> ".join(h["after_swap"]) +
        f"): {h['requests']} requests, {h['errors']} failed; after each swap served by the new adapter: " +
        ", ".join(f"{v} {a['served_by_it']}/{a['requests']}" for v, a in h["after_swap"].items()),
    ])
