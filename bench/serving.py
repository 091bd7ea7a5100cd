"""Serving throughput and latency of the real HTTP server, with and without micro-batching.

    agent bench serving [--model default] [--clients 1,4,8,16] [--requests-per-client 4] [--max-tokens 32]
    agent bench serving --url http://host:port [--served-model NAME] [--clients 1,8,64]    # any running server

Starts the OpenAI-compatible server (``create_app`` under uvicorn, in a thread, on a free port of
127.0.0.1) twice on the configured model: batching on (``max_batch`` 16, ``batch_wait_ms`` 5) and off
(``max_batch`` 1). For each number of concurrent clients, each client (a thread with its own httpx
client) sends its requests one after the other to ``POST /v1/chat/completions``. Every request is
forced to System 1 (``"s2agent": {"route": "system1"}``), so the numbers measure serving, not System 2.
Prints, per (batching, clients): completion tokens/s over the whole run, requests/s, p50 and p99
latency, and the mean rows per decode step the server actually ran. With ``--engine-requests N`` it also
measures, with batching on, time to first token, 8 clients against a raw batch-8 ``generate`` and System 1
under System 2 load (:mod:`bench.serving_engine`).

With ``--url`` it starts nothing and drives a server already running there, any OpenAI-compatible one (this
runtime's, vLLM's own ``vllm serve``), with plain chat requests for ``--served-model`` and no ``s2agent``
field, then streams ``max(4, --requests-per-client)`` chats one at a time for the time to first token:
``bench/gpu_check.sh`` compares ``agent serve`` on the vLLM backend with ``vllm serve`` this way.
"""

from __future__ import annotations

import copy
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import uvicorn

from agent import Agent, AgentConfig
from agent.server import create_app
from bench.system1 import PROMPTS

MODES = {"on": {"max_batch": 16, "batch_wait_ms": 5.0}, "off": {"max_batch": 1, "batch_wait_ms": 0.0}}
REQUEST_TIMEOUT_S = 600.0
"""One request taking longer than this counts as an error (and the run still ends)."""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]); with few values p99 is the slowest one."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class ServerThread:
    """The real server: uvicorn in a background thread, bound to a free port of 127.0.0.1 only."""

    def __init__(self, agent: Agent) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(agent), log_level="warning", access_log=False,
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="bench-server", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def drive(url: str, clients: int, requests_per_client: int, max_tokens: int, extra: dict | None = None,
          model: str = "default", system1: bool = True) -> dict:
    """``clients`` threads, each sending ``requests_per_client`` requests in turn; returns the numbers.
    ``extra``: more fields for every request body (a ``logit_bias``); ``system1``: force System 1 with this
    runtime's ``s2agent`` field (False: a plain OpenAI request, for any server)."""
    import httpx  # the load generator's client; not needed by the runtime itself

    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1, timeout=120)

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as http:
            start.wait()
            for i in range(requests_per_client):
                body = {
                    "model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPTS[(index + i) % len(PROMPTS)]}],
                    **({"s2agent": {"route": "system1"}} if system1 else {}), **(extra or {}),
                }
                t = time.perf_counter()
                try:
                    response = http.post("/v1/chat/completions", json=body)
                    elapsed = time.perf_counter() - t
                    response.raise_for_status()
                    used = response.json()["usage"]["completion_tokens"]
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(elapsed)
                    tokens.append(used)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for w in workers:
        w.start()
    start.wait()
    t = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t
    done = len(latencies)
    return {
        "clients": clients, "requests": done, "errors": len(errors), "error_examples": errors[:3],
        "wall_s": wall, "completion_tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / wall if wall > 0 else 0.0,
        "requests_per_s": done / wall if wall > 0 else 0.0,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": percentile(latencies, 0.99) if latencies else None,
        "mean_tokens": statistics.mean(tokens) if tokens else 0.0,
    }


def run(config: AgentConfig | None = None, clients: Sequence[int] = (1, 4, 8, 16), requests_per_client: int = 4,
        max_tokens: int = 32, engine_requests: int = 0) -> dict:
    """Serve ``config.model`` with batching on and off and measure each client count; see the module docstring.
    ``engine_requests`` > 0: with batching on, also :mod:`bench.serving_engine`'s measurements."""
    base = copy.deepcopy(config or AgentConfig())
    results: dict = {"model": base.model, "max_tokens": max_tokens, "requests_per_client": requests_per_client,
                     "modes": {name: dict(mode) for name, mode in MODES.items()}, "runs": []}
    for name, mode in MODES.items():
        with tempfile.TemporaryDirectory(prefix="s2agent-bench-serving-") as home:
            cfg = copy.deepcopy(base)
            cfg.db, cfg.adapters_dir = str(Path(home) / "bench.db"), str(Path(home) / "adapters")
            cfg.max_batch, cfg.batch_wait_ms = mode["max_batch"], mode["batch_wait_ms"]
            cfg.routing.router = "never"
            cfg.scheduler.interval_minutes = cfg.scheduler.min_pending = None
            cfg.server.max_tokens_limit = max(cfg.server.max_tokens_limit, max_tokens)
            t = time.perf_counter()
            with Agent(cfg) as agent, ServerThread(agent) as server:
                load_s = time.perf_counter() - t
                drive(server.url, 1, 1, max_tokens)  # warm up: first forward pass, first SQLite write
                for n in clients:
                    batcher = agent.backend
                    before = (getattr(batcher, "steps", 0), getattr(batcher, "step_rows", 0))
                    row = drive(server.url, n, requests_per_client, max_tokens)
                    batches = getattr(batcher, "steps", 0) - before[0]
                    rows = getattr(batcher, "step_rows", 0) - before[1]
                    row["mean_batch_rows"] = rows / batches if batches else None
                    row["batching"] = name
                    row["load_s"] = load_s
                    results["runs"].append(row)
                if name == "on" and engine_requests:
                    from bench import serving_engine

                    results["engine"] = serving_engine.run(agent, server.url, drive, engine_requests, max_tokens)
    return results


def run_external(url: str, model: str, clients: Sequence[int] = (1, 8, 64), requests_per_client: int = 4,
                 max_tokens: int = 32) -> dict:
    """Drive the server already running at ``url`` (see the module docstring); one row per client count."""
    results: dict = {"model": model, "url": url, "max_tokens": max_tokens, "requests_per_client": requests_per_client,
                     "runs": []}
    from bench.serving_engine import time_to_first_token

    drive(url, 1, 1, max_tokens, model=model, system1=False)  # warm up
    for n in clients:
        row = drive(url, n, requests_per_client, max_tokens, model=model, system1=False)
        row["batching"], row["mean_batch_rows"] = "external", None
        results["runs"].append(row)
    results["ttft"] = time_to_first_token(url, max(4, requests_per_client), max_tokens, None, model=model,
                                          system1=False)
    return results


def report(results: dict) -> str:
    if "url" in results:
        lines = [f"{results['url']}, model {results['model']}: {results['requests_per_client']} requests per client, "
                 f"max_tokens {results['max_tokens']}",
                 f"{'clients':>8}{'tokens/s':>10}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}{'errors':>8}"]
        for r in results["runs"]:
            p50, p99 = (f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("latency_p50_s", "latency_p99_s"))
            lines.append(f"{r['clients']:>8}{r['tokens_per_s']:>10.1f}{r['requests_per_s']:>8.2f}{p50:>8}{p99:>8}"
                         f"{r['errors']:>8}")
        if "ttft" in results:
            t = results["ttft"]
            lines.append(f"streamed, 1 client, {t['requests']} requests: time to first token p50 {t['ttft_p50_s']:.3f} s"
                         f" = {t['ttft_over_answer_p50']:.2f} of the answer's {t['answer_p50_s']:.3f} s")
        lines += [f"error ({r['clients']} clients): {e}" for r in results["runs"] for e in r["error_examples"]]
        return "\n".join(lines)
    lines = [f"model {results['model']}: {results['requests_per_client']} requests per client, "
             f"max_tokens {results['max_tokens']}, all System 1; batching on = max_batch "
             f"{results['modes']['on']['max_batch']}, wait {results['modes']['on']['batch_wait_ms']:g} ms; "
             f"off = max_batch 1",
             f"{'batching':<9}{'clients':>8}{'tokens/s':>10}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}"
             f"{'rows/batch':>11}{'errors':>8}"]
    for r in results["runs"]:
        p50 = f"{r['latency_p50_s']:.2f}" if r["latency_p50_s"] is not None else "-"
        p99 = f"{r['latency_p99_s']:.2f}" if r["latency_p99_s"] is not None else "-"
        rows = f"{r['mean_batch_rows']:.1f}" if r["mean_batch_rows"] is not None else "-"
        lines.append(f"{r['batching']:<9}{r['clients']:>8}{r['tokens_per_s']:>10.1f}{r['requests_per_s']:>8.2f}"
                     f"{p50:>8}{p99:>8}{rows:>11}{r['errors']:>8}")
    if "engine" in results:
        from bench import serving_engine

        lines.append(serving_engine.report(results["engine"]))
    for r in results["runs"]:
        for example in r["error_examples"]:
            lines.append(f"error (batching {r['batching']}, {r['clients']} clients): {example}")
    return "\n".join(lines)
