"""Variations of solved questions: new questions of the same wording, and the program that solves them.

Why: a scope's first adapter trains on its first few dozen accepted examples, and at this model size that
teaches the form of the answer more than the task (sums: ~0.5 right after 32 examples, 0.8 after ~250;
README). Program-aided System 2 leaves more behind than an answer: a program that computes it from the
values in the question. When that program, given the values of the scope's *other* questions of the same
wording, reproduces every one of their accepted answers, it is a solver for that wording, and running it on
new values labels new questions exactly as System 2 would, for the price of running a program
(milliseconds) instead of sampling ``k`` programs from the model (seconds).

A question's values are its whole numbers and its quoted words ("Count the letters in the word 'pepper'.",
"Take the last letters of the words in 'plant glass'"): the two things a program copies from the question
into literals. This module is the pure part: a question's **wording** (its text with those values taken
out), a program's **template** (the spans of its literals that are the question's values), and new values:
numbers drawn from the range each one took in the scope, words drawn from a vocabulary the caller gives, as
many and as long as the scope's questions had. Running programs and checking them belong to
``agent.variations``.
"""

from __future__ import annotations

import ast
import io
import random
import re
import tokenize
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

HOLE = "{#}"
"""Where a value stood in a wording (shown in logs and metrics); a quoted word keeps its quotes around it."""

Value = int | str
"""A question's value: a whole number, or the words between a pair of quotes."""

_VALUE = re.compile(r"(?<![\w.,])(?P<number>\d{1,6})(?![\w]|[.,]\d)"
                    r"|(?<![A-Za-z])(?P<quote>['\"])(?P<words>[A-Za-z]+(?: [A-Za-z]+)*)(?P=quote)(?![A-Za-z])")
"""A whole number (not part of a word, a decimal or a "1,000", whose parts are not operands), or one or more
words of letters between a pair of quotes that are not apostrophes ("John's 'dog'" quotes "dog")."""


def wording(text: str) -> tuple[str, tuple[Value, ...]]:
    """The question with its whole numbers and quoted words replaced by :data:`HOLE`, and those values in
    order (ints and strs).

    Numbers written with a leading zero ("07") are kept as text: written back from an int they would read
    differently. ``("What is {#} + {#}?", (47, 38))`` for "What is 47 + 38?"; ``("Count the letters in
    '{#}'.", ("pepper",))`` for "Count the letters in 'pepper'."."""
    values: list[Value] = []
    if HOLE in text:
        return text, ()

    def hole(match: re.Match) -> str:
        if match.group("words"):
            values.append(match.group("words"))
            return match.group("quote") + HOLE + match.group("quote")
        if len(match.group()) > 1 and match.group().startswith("0"):
            return match.group()
        values.append(int(match.group()))
        return HOLE

    return _VALUE.sub(hole, text), tuple(values)


def fill(shape: str, values: Sequence[Value]) -> str:
    """The question of wording ``shape`` with ``values`` in its holes, in order."""
    parts = shape.split(HOLE)
    if len(parts) != len(values) + 1:
        raise ValueError(f"{shape!r} has {len(parts) - 1} holes, got {len(values)} values")
    return parts[0] + "".join(str(value) + part for value, part in zip(values, parts[1:]))


@dataclass(frozen=True)
class Template:
    """A program whose literals at ``spans`` are the question's values (slot ``i``: the ``i``-th value of the
    question; a number literal, or a string literal of the quoted words), so that it can be run on another
    question of the same wording."""

    shape: str
    program: str
    spans: tuple[tuple[int, int, int], ...]
    """(start, end, slot): character spans of ``program`` and which of the question's values each holds."""

    def program_for(self, values: Sequence[Value]) -> str:
        out = self.program
        for start, end, slot in sorted(self.spans, reverse=True):
            out = out[:start] + _literal(values[slot]) + out[end:]
        return out


def _literal(value: Value) -> str:
    # words are letters and spaces (``_VALUE``), so double quotes always make a valid string literal
    return f'"{value}"' if isinstance(value, str) else str(value)


def template(question: str, program: str) -> Template | None:
    """The program as a template for the question's wording, or None when it cannot be one: the question
    has no value, or the same value twice (which literal is which?), or the program does not use every one
    of them as a literal (a number, or a plain string literal holding exactly the quoted words), or it
    does not tokenize."""
    shape, values = wording(question)
    if not values or len(set(values)) != len(values):
        return None
    slot_of = {value: slot for slot, value in enumerate(values)}
    starts = _line_starts(program)
    spans = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(program).readline):
            value = _token_value(token)
            if value is not None and value in slot_of:
                start = starts[token.start[0] - 1] + token.start[1]
                spans.append((start, start + len(token.string), slot_of[value]))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    if {slot for _, _, slot in spans} != set(range(len(values))):
        return None
    return Template(shape, program, tuple(spans))


def _token_value(token: tokenize.TokenInfo) -> Value | None:
    """The value a number or plain string literal token stands for; None for any other token (a number with
    a leading zero, an f-string, bytes, a raw or prefixed string: rewriting those would change more than
    the value)."""
    if token.type == tokenize.NUMBER and token.string.isdigit():
        return None if len(token.string) > 1 and token.string.startswith("0") else int(token.string)
    if token.type == tokenize.STRING and token.string[0] in "'\"":
        value = ast.literal_eval(token.string)
        return value if isinstance(value, str) else None
    return None


def _line_starts(text: str) -> list[int]:
    starts, offset = [], 0
    for line in text.splitlines(keepends=True) or [""]:
        starts.append(offset)
        offset += len(line)
    return starts + [offset]


@dataclass(frozen=True)
class Words:
    """The bounds of a quoted-words slot: how many words its questions quoted, how long those words were, and
    the words themselves (what new values are drawn from when the caller gives no vocabulary)."""

    count: tuple[int, int]
    length: tuple[int, int]
    seen: tuple[str, ...]


Bounds = tuple[int, int] | Words
"""A number slot's smallest and largest value, or a quoted-words slot's :class:`Words`."""


def ranges(values: Sequence[Sequence[Value]]) -> list[Bounds]:
    """Per slot, the bounds of the values it took in ``values`` (the questions of one wording, whose slots
    hold the same kind of value in every question): a number's smallest and largest, the quoted words'
    counts and lengths."""
    out: list[Bounds] = []
    for column in zip(*values):
        if all(isinstance(value, int) for value in column):
            out.append((min(column), max(column)))
            continue
        words = [value.split() for value in column]
        lengths = [len(word) for group in words for word in group]
        seen = tuple(sorted({word for group in words for word in group}))
        out.append(Words((min(map(len, words)), max(map(len, words))), (min(lengths), max(lengths)), seen))
    return out


def new_questions(shape: str, bounds: Sequence[Bounds], n: int, rng: random.Random,
                  taken: Collection[str], key=str, vocabulary: Sequence[str] = ()) -> list[tuple[Value, ...]]:
    """Up to ``n`` value tuples, whose questions (``fill(shape, values)``, compared by ``key``) are not in
    ``taken`` nor drawn twice: each number drawn uniformly from its bounds, each quoted slot as many words as
    its questions quoted, each drawn from the words of ``vocabulary`` as long as theirs (from the words they
    quoted when it has none). Fewer when the bounds hold fewer new questions (a slot that never varied keeps
    its one value)."""
    pools = {slot: _pool(b, vocabulary) for slot, b in enumerate(bounds) if isinstance(b, Words)}

    def draw(slot: int, b: Bounds) -> Value:
        if isinstance(b, Words):
            return " ".join(rng.choice(pools[slot]) for _ in range(rng.randint(*b.count)))
        return rng.randint(*b)

    seen = set(taken)
    drawn: list[tuple[Value, ...]] = []
    for _ in range(max(20 * n, 100)):
        if len(drawn) >= n:
            break
        values = tuple(draw(slot, b) for slot, b in enumerate(bounds))
        question = key(fill(shape, values))
        if question not in seen:
            seen.add(question)
            drawn.append(values)
    return drawn


def _pool(bounds: Words, vocabulary: Sequence[str]) -> list[str]:
    low, high = bounds.length
    return sorted({w for w in vocabulary if low <= len(w) <= high and w.isalpha()}) or list(bounds.seen)


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
