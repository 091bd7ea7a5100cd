"""A second process for the store tests: ``python _worker.py URL MODE [ARGS...]``.

Modes:
  write GO N PREFIX   print "ready", wait for the file GO, then add N examples and N interactions (and N/4
                      questions every writer shares)
  hold NAME OWNER     take lock NAME, print "acquired", release it when a line arrives on stdin
  grab NAME OWNER     take lock NAME, print "acquired", exit without releasing (a crashed holder)
  race GO NAME OWNER  print "ready", wait for GO, try lock NAME once, print True/False, exit on a stdin line
  start_run           record a running consolidation run, print its id, exit without finishing it
"""

from __future__ import annotations

import os
import sys
import time

from store import Store


def wait_for(path: str) -> None:
    print("ready", flush=True)
    while not os.path.exists(path):
        time.sleep(0.005)


def main() -> None:
    url, mode, *args = sys.argv[1:]
    store = Store(url)
    if mode == "write":
        go, n, prefix = args[0], int(args[1]), args[2]
        wait_for(go)
        for i in range(int(n)):
            store.add_example(f"{prefix} question {i}", f"answer {i}", method="cot", agreement=1.0)
            store.log_interaction(input=f"{prefix} question {i}", route="system2", final_answer=str(i), tokens_system2=3)
            if i % 4 == 0:
                store.add_example(f"shared question {i // 4}", "shared", method="cot")
            time.sleep(0.002)  # real writers think between writes; without pauses SQLite's busy handler can
            # let one writer finish before the other gets a turn, and the test would not be concurrent
    elif mode == "hold":
        assert store.acquire_lock(args[0], args[1])
        print("acquired", flush=True)
        sys.stdin.readline()
        store.release_lock(args[0], args[1])
    elif mode == "grab":
        assert store.acquire_lock(args[0], args[1])
        print("acquired", flush=True)
        os._exit(0)
    elif mode == "race":
        wait_for(args[0])
        print(store.acquire_lock(args[1], args[2]), flush=True)
        sys.stdin.readline()  # stay alive, so the loser cannot take the lock over from a dead winner
    elif mode == "start_run":
        print(store.start_run(scope="crashy"), flush=True)
        os._exit(0)
    else:
        raise SystemExit(f"unknown mode {mode}")
    store.close()


if __name__ == "__main__":
    main()
