"""The agent's System 2 memory: :class:`policies.system2_memory.System2Memory` fed from the store and from
each System 2 run of this process (``routing.memory``; see the policy's docstring for why)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Sequence

from agent.config import RoutingConfig
from policies.system2_memory import MemoryVerdict, System2Memory
from store import Store

logger = logging.getLogger(__name__)


class RoutingMemory:
    """Thread-safe; built from the store's newest System 2 outcomes on first use (so a restarted server, or a
    replica, does not pay again for what the store already knows)."""

    def __init__(self, config: RoutingConfig, store: Store, seed: int = 0) -> None:
        self.config = config
        self.store = store
        self.seed = seed
        self._memory: System2Memory | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def _loaded(self) -> System2Memory:
        if self._memory is None:
            cfg = self.config
            memory = System2Memory(
                neighbours=cfg.memory_neighbours, min_similarity=cfg.memory_min_similarity,
                min_evidence=cfg.memory_min_evidence, min_yield=cfg.memory_min_yield,
                repeat_failures=cfg.memory_repeat_failures, explore=cfg.memory_explore,
                capacity=cfg.memory_size, seed=self.seed,
            )
            outcomes = self.store.system2_outcomes(cfg.memory_size)
            for text, method, accepted in outcomes:
                memory.add(text, method, accepted)
            logger.info("System 2 memory: %d earlier outcomes from the store", len(outcomes))
            self._memory = memory
        return self._memory

    def judge(self, query: str, method: str) -> MemoryVerdict | None:
        """The memory's verdict on running ``method`` for ``query``; None when ``routing.memory`` is off."""
        if not self.config.memory:
            return None
        with self._lock:
            verdict = self._loaded().judge(query, method)
            if verdict.skip or verdict.explored:
                self._counts["skipped" if verdict.skip else "explored"] += 1
        return verdict

    def judge_many(self, queries: Sequence[str], method: str) -> list[MemoryVerdict] | None:
        """The memory's verdicts on many ``queries`` at once, counting nothing and drawing no exploration (see
        :meth:`policies.system2_memory.System2Memory.judge_many`); None when ``routing.memory`` is off."""
        if not self.config.memory:
            return None
        with self._lock:
            return self._loaded().judge_many(queries, method)

    def record(self, query: str, method: str, paid_off: bool) -> None:
        """One System 2 run's outcome (a teaching source's only: see ``routing.memory``)."""
        if not self.config.memory:
            return
        with self._lock:
            self._loaded().add(query, method, paid_off)
            self._counts["recorded"] += 1

    def stats(self) -> dict[str, int]:
        """Since start: System 2 runs ``skipped``, would-be skips ``explored``, outcomes ``recorded``."""
        with self._lock:
            return {key: self._counts.get(key, 0) for key in ("skipped", "explored", "recorded")}
