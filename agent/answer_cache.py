"""The serving model's greedy System 1 answers, kept on disk from one consolidation run to the next.

Every run asks the serving model for its own answers: to the retention prompts (the behaviour a candidate
must keep) and to the task holdout (what a candidate must beat). Decoding them is minutes of CPU beside a
busy server (4.5 of a 17.9-minute run in the live replay), and most of it repeats: the serving model
changes only when something is promoted (the base model serves the first run of every scope), and the
shipped general prompts come back in every run. So answers are kept under a key of everything a greedy
answer depends on: the base model, the serving adapter's file contents (not its version number, which a
new database could give to other weights), the System 1 messages as the model sees them, and the token
budget. A wrong hit needs a sha256 collision; a miss costs what the run cost before.

One JSON file, written whole through a rename (a reader never sees half of one), bounded to ``capacity``
answers (the oldest go first). Only consolidation writes it, under its lock, so writers never race.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Callable, Sequence

from agent.adapter_cache import folder_files
from agent.prompting import system1_messages

logger = logging.getLogger(__name__)

CAPACITY = 4096
"""Answers kept: enough for the retention and holdout prompts of a few dozen serving models."""


def model_identity(model_path: str, adapter_folder: str | Path | None, system_prompt: str | None,
                   max_new_tokens: int, dtype: str) -> str:
    """A digest of what decides System 1's greedy answers besides the prompt (``dtype``: the serving model's)."""
    digest = hashlib.sha256(json.dumps([model_path, system_prompt, max_new_tokens, dtype]).encode())
    if adapter_folder is not None:
        for name, data in folder_files(Path(adapter_folder)).items():
            digest.update(name.encode())
            digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


class AnswerCache:
    """Greedy answers by (model identity, prompt); see the module docstring."""

    def __init__(self, path: Path, capacity: int = CAPACITY) -> None:
        self.path = path
        self.capacity = capacity

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # a damaged cache costs only the time to answer again
            logger.warning("answer cache %s unreadable (%s): answering again", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, str)}

    def _save(self, entries: dict[str, str]) -> None:
        keep = dict(list(entries.items())[-self.capacity:])
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(keep))
            os.replace(tmp, self.path)
        except OSError as exc:  # read-only or full disk: the run goes on, the next one answers again
            logger.warning("answer cache %s not written: %s", self.path, exc)
            tmp.unlink(missing_ok=True)

    def answers(self, identity: str, prompts: Sequence[str], answer: Callable[[list[str]], list[str]]) -> list[str]:
        """The answers to ``prompts`` of the model ``identity``: from the cache, and from ``answer`` (called
        once, with the prompts not cached, in order) for the rest, which are then kept."""
        entries = self._load()
        keys = [_key(identity, p) for p in prompts]
        missing = [p for p, k in zip(prompts, keys) if k not in entries]
        if missing:
            fresh = dict(zip((_key(identity, p) for p in missing), answer(missing)))
            entries.update(fresh)
            self._save(entries)
        logger.info("serving answers: %d of %d from the cache", len(prompts) - len(missing), len(prompts))
        return [entries[k] for k in keys]


def _key(identity: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([identity, system1_messages(prompt)]).encode()).hexdigest()
