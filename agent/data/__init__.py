"""Data shipped with the package."""

from __future__ import annotations

import json
from importlib import resources


def general_prompts() -> list[str]:
    """128 everyday prompts: retention data, and the untagged side of the scope classifier, before the
    store has history of its own."""
    text = resources.files(__name__).joinpath("general_prompts.jsonl").read_text()
    return [json.loads(line)["input"] for line in text.splitlines() if line.strip()]
