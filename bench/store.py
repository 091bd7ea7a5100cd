"""The store's write path: interaction rows and examples per second, one transaction each vs write-behind.

    agent bench store [--rows 5000] [--threads 8] [--postgres URL]

On a fresh SQLite file (WAL) in a temporary folder, and on a fresh database of the PostgreSQL server at
``--postgres`` (or ``$S2AGENT_TEST_POSTGRES_URL``) when one is given, it times:
- ``interaction, 1 txn each``: ``--rows`` calls of ``Store.log_interaction`` from ``--threads`` threads (what
  every answer cost before the write-behind queue);
- ``interaction, write-behind``: the same rows through :class:`store.writer.InteractionWriter` from the same
  threads, until the last one is committed (what ``agent serve`` does for System 1 answers);
- ``example, 1 txn each``: ``Store.add_example`` (accepted System 2 examples stay synchronous), on distinct
  inputs.
Rows are the size of a real System 1 log (a one-line question, a 40-word answer, route reason and votes).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from store import Store
from store.db import resolve_url
from store.writer import InteractionWriter

ANSWER = " ".join(["word"] * 40)


def interaction(i: int) -> dict[str, Any]:
    return {"input": f"What is {i} + {i + 1}?", "route": "system1", "system1_answer": ANSWER, "confidence": 0.93,
            "final_answer": ANSWER, "tokens_system1": 48, "latency_ms": 812.5,
            "route_reason": {"estimator": "logprob", "score": 0.93, "threshold": 0.5, "requested": "auto"}}


def _threads(n: int, rows: int, work: Callable[[int], None]) -> None:
    def run(t: int) -> None:
        for i in range(t, rows, n):
            work(i)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _rate(store_url: str, rows: int, threads: int) -> list[dict[str, Any]]:
    results = []

    def timed(name: str, work: Callable[[Store], None]) -> None:
        store = Store(store_url)
        try:
            started = time.perf_counter()
            work(store)
            seconds = time.perf_counter() - started
        finally:
            store.close()
        results.append({"what": name, "rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds)})

    timed("interaction, 1 txn each", lambda s: _threads(threads, rows, lambda i: s.log_interaction(**interaction(i))))

    def write_behind(store: Store) -> None:
        writer = InteractionWriter(store)
        _threads(threads, rows, lambda i: writer.submit(interaction(i)))
        writer.close()

    timed("interaction, write-behind", write_behind)
    run = uuid.uuid4().hex[:6]
    timed("example, 1 txn each", lambda s: _threads(
        threads, rows, lambda i: s.add_example(f"{run} What is {i} + {i + 2}?", str(2 * i + 2), method="pal",
                                               votes={str(2 * i + 2): 4}, agreement=1.0)))
    return results


@contextmanager
def postgres_database(server: str, prefix: str = "s2agent_bench") -> Iterator[str]:
    """A new, empty database on the PostgreSQL ``server``, dropped afterwards with whatever is still connected;
    yields its URL in the form the server's was given in."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(resolve_url(server), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
        try:
            yield make_url(server).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def run(rows: int, threads: int, postgres: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows, "threads": threads, "cpus": os.cpu_count(), "databases": {}}
    with tempfile.TemporaryDirectory(prefix="s2agent-bench-store-") as folder:
        out["databases"]["sqlite (WAL)"] = _rate(os.path.join(folder, "agent.db"), rows, threads)
    if postgres:
        with postgres_database(postgres) as url:
            out["databases"]["postgresql"] = _rate(url, rows, threads)
    return out


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['rows']} rows from {result['threads']} threads, {result['cpus']} CPUs",
             f"{'database':<14} {'what':<28} {'seconds':>8} {'rows/s':>8}"]
    for database, rows in result["databases"].items():
        for row in rows:
            lines.append(f"{database:<14} {row['what']:<28} {row['seconds']:>8.2f} {row['rows_per_s']:>8}")
    return "\n".join(lines)
