"""Data shipped with the package."""

from __future__ import annotations

import json
from importlib import resources


def _inputs(name: str) -> list[str]:
    text = resources.files(__name__).joinpath(name).read_text()
    return [json.loads(line)["input"] for line in text.splitlines() if line.strip()]


def general_prompts() -> list[str]:
    """128 everyday prompts: retention data, and the untagged side of the scope classifier, before the
    store has history of its own."""
    return _inputs("general_prompts.jsonl")


def number_prompts() -> list[str]:
    """40 questions that hold numbers but whose answer is not their sum (products, differences, counts,
    comparisons): retention data only. A task of short numeric answers (the sums) otherwise teaches the
    general adapter to answer every question with numbers in it by adding them ("What is 5 times 5?" -> "10")."""
    return _inputs("number_prompts.jsonl")


def retention_prompts() -> list[str]:
    """The shipped retention prompts: the general ones with a number question after every third, so that
    any prefix a run reads (``consolidation.retention_prompts``) holds both kinds in proportion."""
    general, numbers = general_prompts(), number_prompts()
    mixed: list[str] = []
    for i, prompt in enumerate(general):
        mixed.append(prompt)
        if i % 3 == 2 and numbers:
            mixed.append(numbers.pop(0))
    return mixed + numbers
