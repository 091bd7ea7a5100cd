"""Load and faults across replicas: N ``agent serve --no-train`` on one PostgreSQL database, C clients, D seconds.

    agent bench soak [--replicas 2] [--clients 16] [--seconds 300] [--max-tokens 16] [--postgres URL]

It creates a fresh database on the PostgreSQL server at ``--postgres`` (or ``$S2AGENT_TEST_POSTGRES_URL``),
starts the replicas (each a ``bench.live.ServerProcess``: no configuration, its own data dir and adapters
folder, a free port of 127.0.0.1), and has ``--clients`` threads (the official ``openai`` client) send chat
requests round-robin across the replicas for ``--seconds`` seconds: short System 1 answers
(``s2agent.route = system1``, ``--max-tokens``), so what is measured is the serving and logging path, not
System 2. Then it stops the replicas with SIGTERM (each flushes its write-behind log) and reports: requests
answered, errors, latency p50/p99, requests per second, and whether the interactions in the store equal the
requests answered (nothing lost on the way to the database).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.live import Client, Query, ServerProcess, percentile
from bench.store import postgres_database
from store import Store


@dataclass(frozen=True)
class SoakSettings:
    replicas: int = 2
    clients: int = 16
    seconds: float = 300.0
    max_tokens: int = 16
    threads: int = 1
    """Torch threads per replica (the replicas share this machine's cores)."""


def _client_loop(client: Client, index: int, deadline: float, max_tokens: int, out: list[dict[str, Any]],
                 bar: tqdm, lock: threading.Lock) -> None:
    for i in itertools.count():
        if time.monotonic() >= deadline:
            return
        reply = client.ask(Query(f"Client {index} asks question {i}: what is {i} + {index}?", "soak", None),
                           route="system1", max_tokens=max_tokens)
        with lock:
            out.append({"ok": reply.ok, "seconds": reply.seconds, "error": reply.error})
            bar.update(1)


def run(settings: SoakSettings, model: str, postgres: str, out_dir: Path, cache_dir: str | None = None
        ) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with postgres_database(postgres) as url, contextlib.ExitStack() as stack:
        env = {"S2AGENT_DB": url, "S2AGENT_THREADS": str(settings.threads)}
        servers = [stack.enter_context(ServerProcess(model, ["--no-train"], env=env, cache_dir=cache_dir,
                                                     log_path=out_dir / f"replica-{i}.log"))
                   for i in range(settings.replicas)]
        clients = [Client(server.url, request_timeout_s=120) for server in servers]
        lock = threading.Lock()
        started = time.monotonic()
        deadline = started + settings.seconds
        with tqdm(desc="soak requests", unit="req") as bar:
            threads = [threading.Thread(target=_client_loop, args=(clients[i % len(clients)], i, deadline,
                                                                   settings.max_tokens, results, bar, lock))
                       for i in range(settings.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        elapsed = time.monotonic() - started
        for server in servers:
            server.stop()  # SIGTERM: each replica flushes its write-behind log before it exits
        store = Store(url)
        try:
            logged = store.stats()["interactions"]["total"]
        finally:
            store.close()
    ok = [r["seconds"] for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    return {
        "settings": settings.__dict__, "cpus": os.cpu_count(), "requests": len(results), "answered": len(ok),
        "errors": len(errors), "first_errors": errors[:5], "seconds": round(elapsed, 1),
        "requests_per_s": round(len(ok) / elapsed, 2) if elapsed else None,
        "p50_s": _round(percentile(ok, 0.5)), "p99_s": _round(percentile(ok, 0.99)),
        "interactions_logged": logged, "logged_equals_answered": logged == len(ok),
        "exit_codes": [server.info.get("exit_code") for server in servers],
    }


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    return "\n".join([
        f"{s['replicas']} replicas (--no-train, PostgreSQL), {s['clients']} clients, {result['seconds']} s, "
        f"{s['max_tokens']} new tokens max, {result['cpus']} CPUs",
        f"requests answered {result['answered']} of {result['requests']}, errors {result['errors']}, "
        f"{result['requests_per_s']} req/s, p50 {result['p50_s']} s, p99 {result['p99_s']} s",
        f"interactions in the store {result['interactions_logged']} "
        f"({'=' if result['logged_equals_answered'] else '!='} requests answered); "
        f"replica exit codes {result['exit_codes']}",
        *(f"  error: {e}" for e in result["first_errors"]),
    ])
