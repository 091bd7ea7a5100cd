"""Variations of solved questions: new questions of the same wording, and the program that solves them.

Why: a scope's first adapter trains on its first few dozen accepted examples, and at this model size that
teaches the form of the answer more than the task (sums: ~0.5 right after 32 examples, 0.8 after ~250;
README). Program-aided System 2 leaves more behind than an answer: a program that computes it from the
numbers in the question. When that program, given the numbers of the scope's *other* questions of the same
wording, reproduces every one of their accepted answers, it is a solver for that wording, and running it on
new numbers labels new questions exactly as System 2 would, for the price of running a program
(milliseconds) instead of sampling ``k`` programs from the model (seconds).

This module is the pure part: a question's **wording** (its text with the numbers taken out), a program's
**template** (the spans of its literals that are the question's numbers), and new values drawn from the
range each number took in the scope. Running programs and checking them belong to
``agent.variations``.
"""

from __future__ import annotations

import io
import random
import re
import tokenize
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

HOLE = "{#}"
"""Where a number stood in a wording (shown in logs and metrics)."""

_NUMBER = re.compile(r"(?<![\w.,])\d{1,6}(?![\w]|[.,]\d)")
"""A whole number in a question: not part of a word, a decimal or a "1,000" (whose parts are not operands)."""


def wording(text: str) -> tuple[str, tuple[int, ...]]:
    """The question with its whole numbers replaced by :data:`HOLE`, and those numbers in order.

    Numbers written with a leading zero ("07") are kept as text: written back from an int they would read
    differently. ``("What is {#} + {#}?", (47, 38))`` for "What is 47 + 38?"."""
    values: list[int] = []
    if HOLE in text:
        return text, ()

    def hole(match: re.Match) -> str:
        if len(match.group()) > 1 and match.group().startswith("0"):
            return match.group()
        values.append(int(match.group()))
        return HOLE

    return _NUMBER.sub(hole, text), tuple(values)


def fill(shape: str, values: Sequence[int]) -> str:
    """The question of wording ``shape`` with ``values`` in its holes, in order."""
    parts = shape.split(HOLE)
    if len(parts) != len(values) + 1:
        raise ValueError(f"{shape!r} has {len(parts) - 1} holes, got {len(values)} values")
    return parts[0] + "".join(str(value) + part for value, part in zip(values, parts[1:]))


@dataclass(frozen=True)
class Template:
    """A program whose number literals at ``spans`` are the question's numbers (slot ``i``: the ``i``-th
    number of the question), so that it can be run on another question of the same wording."""

    shape: str
    program: str
    spans: tuple[tuple[int, int, int], ...]
    """(start, end, slot): character spans of ``program`` and which of the question's numbers each holds."""

    def program_for(self, values: Sequence[int]) -> str:
        out = self.program
        for start, end, slot in sorted(self.spans, reverse=True):
            out = out[:start] + str(values[slot]) + out[end:]
        return out


def template(question: str, program: str) -> Template | None:
    """The program as a template for the question's wording, or None when it cannot be one: the question
    has no number, or the same number twice (which literal is which?), or the program does not use every one
    of them as a literal, or it does not tokenize."""
    shape, values = wording(question)
    if not values or len(set(values)) != len(values):
        return None
    slot_of = {value: slot for slot, value in enumerate(values)}
    starts = _line_starts(program)
    spans = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(program).readline):
            if token.type == tokenize.NUMBER and token.string.isdigit() and int(token.string) in slot_of:
                if len(token.string) > 1 and token.string.startswith("0"):
                    continue
                start = starts[token.start[0] - 1] + token.start[1]
                spans.append((start, start + len(token.string), slot_of[int(token.string)]))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    if {slot for _, _, slot in spans} != set(range(len(values))):
        return None
    return Template(shape, program, tuple(spans))


def _line_starts(text: str) -> list[int]:
    starts, offset = [], 0
    for line in text.splitlines(keepends=True) or [""]:
        starts.append(offset)
        offset += len(line)
    return starts + [offset]


def ranges(values: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Per slot, the smallest and largest value it took in ``values`` (the questions of one wording)."""
    return [(min(column), max(column)) for column in zip(*values)]


def new_questions(shape: str, bounds: Sequence[tuple[int, int]], n: int, rng: random.Random,
                  taken: Collection[str], key=str) -> list[tuple[int, ...]]:
    """Up to ``n`` value tuples, each slot drawn uniformly from its ``bounds``, whose questions
    (``fill(shape, values)``, compared by ``key``) are not in ``taken`` nor drawn twice. Fewer when the
    ranges hold fewer new questions (a slot that never varied keeps its one value)."""
    seen = set(taken)
    drawn: list[tuple[int, ...]] = []
    for _ in range(max(20 * n, 100)):
        if len(drawn) >= n:
            break
        values = tuple(rng.randint(low, high) for low, high in bounds)
        question = key(fill(shape, values))
        if question not in seen:
            seen.add(question)
            drawn.append(values)
    return drawn


def allocate(counts: Mapping[str, int], total: int) -> dict[str, int]:
    """``total`` split across wordings in proportion to ``counts`` (largest remainders get the rest), so a
    wording, and whoever taught it, keeps its share of what trains."""
    whole = sum(counts.values())
    if whole <= 0 or total <= 0:
        return {name: 0 for name in counts}
    exact = {name: total * count / whole for name, count in counts.items()}
    shares = {name: int(value) for name, value in exact.items()}
    rest = sorted(counts, key=lambda name: exact[name] - shares[name], reverse=True)
    for name in rest[: total - sum(shares.values())]:
        shares[name] += 1
    return shares
