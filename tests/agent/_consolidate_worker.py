"""A second process for the consolidation tests: ``python tests/agent/_consolidate_worker.py MODE ARGS...``.

Modes (every line it prints is flushed at once, so a test can kill it right after a line):
  consolidate MODEL DB EPOCHS [PAUSE]  build an Agent on the tiny model (``tests.fakes.make_config``:
                      the scripted Arithmetic System 2 method), print "ready", wait for a line on stdin,
                      consolidate, printing "step I" per training step and "committing" just before the
                      registry transaction (then sleep PAUSE seconds, to give a test a window between the
                      folder's rename and the commit), and finally the report as JSON
  write DB PREFIX     add an example and log an interaction in a loop, printing "example ID" and
                      "interaction ID" as soon as each insert has returned
  hold DB OWNER       take the consolidation lock, print "acquired", release it when a line arrives on stdin
  cli ARGS...         the ``agent`` command (``agent serve``, ``agent worker``...) with the scripted Arithmetic
                      method registered as ``arith``, as an application registers its own method
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def consolidate(model_dir: str, db: str, epochs: str, pause: str = "0") -> None:
    from agent import Agent
    from policies.system2 import METHODS
    from store import Store
    from tests.fakes import Arithmetic, make_config

    METHODS["arith"] = Arithmetic
    commit = Store.commit_adapter

    def announced_commit(self, *args, **kwargs):
        print("committing", flush=True)
        time.sleep(float(pause))
        return commit(self, *args, **kwargs)

    Store.commit_adapter = announced_commit  # this process only: a window for the test, not a production hook
    with Agent(make_config(model_dir, db, int(epochs))) as agent:
        print("ready", flush=True)
        sys.stdin.readline()
        report = agent.consolidate(on_step=lambda i, total, loss: print(f"step {i}", flush=True))
        print(json.dumps({"status": report.status, "reason": report.reason,
                          "adapter_version": report.adapter_version}), flush=True)


def write(db: str, prefix: str) -> None:
    from store import Store

    store = Store(db)
    print("ready", flush=True)
    i = 0
    while True:
        example, _ = store.add_example(f"{prefix} question {i}", f"answer {i}", method="arith", agreement=1.0)
        print(f"example {example.id}", flush=True)
        interaction = store.log_interaction(input=f"{prefix} question {i}", route="system2", final_answer=str(i))
        print(f"interaction {interaction}", flush=True)
        i += 1


def hold(db: str, owner: str) -> None:
    from store import Store

    store = Store(db)
    assert store.acquire_lock("consolidation", owner)
    print("acquired", flush=True)
    sys.stdin.readline()
    store.release_lock("consolidation", owner)
    store.close()


def cli(*argv: str) -> None:
    from agent.cli import main
    from policies.system2 import METHODS
    from tests.fakes import Arithmetic

    METHODS["arith"] = Arithmetic
    sys.exit(main(list(argv)))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"consolidate": consolidate, "write": write, "hold": hold, "cli": cli}[mode](*args)
