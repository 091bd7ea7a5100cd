"""The consolidation child process: one run, off the serving process, at a lower CPU priority.

    python -m agent.worker --config CONFIG.json --report REPORT.json [--scope TAG] [--log-level INFO]
                           [--pause-fd FD]

The scheduler (``scheduler.process = "child"``, the default) starts it for each run
(:func:`agent.scheduler.worker_command`), with its CPU priority already lowered by ``scheduler.nice`` and
``OMP_NUM_THREADS`` set, before Python imports torch. ``CONFIG.json`` is the parent's effective
configuration (:meth:`agent.config.AgentConfig.to_dict`: defaults, TOML file, environment and flags
already applied), loaded back exactly with :meth:`AgentConfig.from_dict`; the environment is not read
again. Torch gets ``scheduler.train_threads`` threads. The worker builds an :class:`agent.Agent` on the
same store and model, runs :meth:`agent.Agent.consolidate` for ``--scope``, and writes the
:class:`agent.consolidation.ConsolidationReport` as JSON to ``REPORT.json``. The serving process picks a
promoted adapter up through its store polling; nothing is sent back but the report. With ``--pause-fd``, the
server pauses the run while users are served, through that inherited pipe (:mod:`agent.pausing`).

SIGTERM or SIGINT stops the run at its next training step (recorded as ``failed``, nothing promoted, the
lock released); so does the parent process going away. A run killed outright is crash-safe
(:mod:`agent.consolidation`): the old adapter keeps serving and the next run reaps the leftovers.
Exit status: 0 when a report was written, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Sequence

from agent.config import AgentConfig
from agent.loop import Agent
from agent.pausing import follow_pauses
from agent.scheduler import default_train_threads

logger = logging.getLogger("agent.worker")

PARENT_CHECK_SECONDS = 1.0
"""How often the child checks that the process that started it is still there."""


def child_config(data: dict[str, Any]) -> AgentConfig:
    """The parent's configuration, minus what a consolidation never reads and could not check here.

    The ``system2`` section names methods, and an embedding app may register its own method in its own
    process only; consolidation never runs System 2, so the child keeps the section's defaults."""
    data = {key: value for key, value in data.items() if key != "system2"}
    config = AgentConfig.from_dict(data, source="the parent process's configuration")
    config.threads = config.scheduler.train_threads or default_train_threads()
    return config


def _watch_parent(stop: threading.Event) -> None:
    parent = os.getppid()
    while not stop.wait(PARENT_CHECK_SECONDS):
        if os.getppid() != parent:
            logger.warning("the serving process (pid %s) is gone: stopping the consolidation", parent)
            stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.worker", description="One consolidation run.")
    parser.add_argument("--config", required=True, help="the parent's effective configuration, as JSON")
    parser.add_argument("--report", required=True, help="where to write the run's report, as JSON")
    parser.add_argument("--scope", help="task tag of the scoped adapter to train (default: the general one)")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--pause-fd", type=int, help="a pipe on which the server pauses the run (agent.pausing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[consolidation %(process)d]: %(message)s")

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("signal %s: stopping at the next training step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(args.config) as f:
        config = child_config(json.load(f))
    threading.Thread(target=_watch_parent, args=(stop,), name="watch-parent", daemon=True).start()
    if args.pause_fd is not None:
        follow_pauses(args.pause_fd)

    with Agent(config) as agent:
        if stop.is_set():
            return 1
        report = agent.consolidate(scope=args.scope, stop=stop)
    tmp = f"{args.report}.tmp"
    with open(tmp, "w") as f:
        json.dump(report.to_dict(), f, default=str)
    os.replace(tmp, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
