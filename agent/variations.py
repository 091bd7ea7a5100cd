"""More examples for a consolidation run, from the programs System 2 solved its questions with.

A wording (a question with its numbers and quoted words taken out, :mod:`policies.variations`) that
program-aided System 2 solved at least ``MIN_SOLVED`` times gets a **verified** program: one of its solving
programs that, given the values of up to ``MAX_CHECKS`` of the wording's other accepted questions,
reproduces every one of their accepted answers in the sandbox. New questions of that wording, with numbers
drawn from the range each one took and quoted words from the model's own vocabulary (:func:`vocabulary`),
are then labelled by running that program. Nothing is stored: a run makes its variations afresh from the
examples it trains on (seeded, so the same examples give the same variations), and reports how many.

What this cannot do: vary questions whose values are neither whole numbers nor quoted words (unquoted
words, a list whose length changes the wording), or learn a wording System 2 solved fewer than
``MIN_SOLVED`` times, or one whose programs disagree with its answers. Those train on their real examples
only.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from agent.sandbox import run_programs
from policies.answers import answers_match
from policies.system2.pal import ExecResult, program_answer
from policies.variations import Template, Value, allocate, fill, new_questions, ranges, template, wording
from store import Example, Store
from store.buffer import normalise_input

logger = logging.getLogger(__name__)

MIN_SOLVED = 3
"""Accepted questions a wording needs: the program of one, checked against the answers of the others."""
MAX_CHECKS = 8
"""Other questions a candidate program must reproduce (all of them when fewer)."""
MAX_TRIES = 3
"""Programs of a wording tried before it is left unverified."""

Run = Callable[[Sequence[str]], Sequence[ExecResult]]


@dataclass(frozen=True)
class Labelled:
    """A question and its answer (what training and the gate read from an example)."""

    input: str
    target: str


@dataclass(frozen=True)
class Solved(Labelled):
    """An accepted example and the program that gave its answer."""

    program: str


@dataclass
class Variations:
    """What one run made: examples to train on and to hold out, and how each wording fared."""

    train: list[Labelled] = field(default_factory=list)
    holdout: list[Labelled] = field(default_factory=list)
    made: dict[str, int] = field(default_factory=dict)
    """Per verified wording, how many examples it gave."""
    unverified: list[str] = field(default_factory=list)
    """Wordings with enough solved questions whose programs did not reproduce the others' answers."""

    def metrics(self) -> dict:
        return {"train": len(self.train), "holdout": len(self.holdout), "made": self.made,
                "unverified": self.unverified}


def solved(store: Store, examples: Sequence[Example]) -> list[Solved]:
    """The examples that program-aided System 2 answered, with the program of a sample that gave their answer
    (read from the interaction each example points to)."""
    pal = [e for e in examples if e.method == "pal" and e.interaction_id is not None]
    traces = store.sample_traces([e.interaction_id for e in pal])
    out = []
    for e in pal:
        program = solving_trace(traces.get(e.interaction_id, ()), e.target)
        if program:
            out.append(Solved(e.input, e.target, program))
    return out


def solving_trace(samples: Sequence[dict], answer: str) -> str | None:
    """The trace (a PAL program, a chain of thought) of the first audited sample (``route_reason["samples"]``,
    ``agent.loop.sample_audit``) that gave ``answer``, or None."""
    return next((s["trace"] for s in samples if s.get("trace") and s.get("answer") == answer), None)


def make_variations(examples: Sequence[Solved], n_train: int, n_holdout: int, kind: str, *, seed: int = 0,
                    taken: Sequence[str] = (), run: Run = run_programs,
                    words: Callable[[], Sequence[str]] = tuple) -> Variations:
    """Up to ``n_train`` + ``n_holdout`` new examples for the wordings of ``examples`` that a program of theirs
    solves, split across wordings by how many questions of each were solved, none of whose questions is in
    ``taken`` (the real questions: a variation never repeats a held-out or trained one). ``words`` gives
    the vocabulary quoted words are drawn from, asked for only when a verified wording quotes words (the
    words the questions quoted when it gives none)."""
    out = Variations()
    if n_train + n_holdout <= 0:
        return out
    # a wording's slots hold the same kind of value in every question of its group ("'{#}'" quotes a
    # number in one question and words in another: two groups)
    by_shape: dict[tuple[str, tuple[type, ...]], list[tuple[Solved, tuple[Value, ...]]]] = {}
    for e in examples:
        shape, values = wording(e.input)
        if values:
            by_shape.setdefault((shape, tuple(map(type, values))), []).append((e, values))
    verified: dict[tuple[str, tuple[type, ...]], Template] = {}
    for group_key, group in by_shape.items():
        if len({values for _, values in group}) < MIN_SOLVED:
            continue
        found = _verified(group, kind, run)
        if found is None:
            out.unverified.append(group_key[0])
        else:
            verified[group_key] = found
    if not verified:
        return out
    rng = random.Random(seed)
    vocabulary = words() if any(str in kinds for _, kinds in verified) else ()
    taken_keys = {normalise_input(q) for q in taken} | {normalise_input(e.input) for e in examples}
    shares = allocate({group_key: len(by_shape[group_key]) for group_key in verified}, n_train + n_holdout)
    questions, programs, shapes = [], [], []
    for group_key, program in verified.items():
        shape = group_key[0]
        bounds = ranges([values for _, values in by_shape[group_key]])
        for values in new_questions(shape, bounds, shares[group_key], rng, taken_keys, key=normalise_input,
                                    vocabulary=vocabulary):
            questions.append(fill(shape, values))
            programs.append(program.program_for(values))
            shapes.append(shape)
    made = []
    for question, shape, result in zip(questions, shapes, run(programs) if programs else ()):
        target = program_answer(result, kind)
        if target is not None:
            made.append(Labelled(question, target))
            out.made[shape] = out.made.get(shape, 0) + 1
    rng.shuffle(made)
    held = round(len(made) * n_holdout / (n_train + n_holdout))
    out.holdout, out.train = made[:held], made[held:]
    logger.info("variations: %d to train on, %d held out, from %d verified wording(s)%s", len(out.train),
                len(out.holdout), len(verified), f"; {len(out.unverified)} unverified" if out.unverified else "")
    return out


def _verified(group: list[tuple[Solved, tuple[Value, ...]]], kind: str, run: Run) -> Template | None:
    """The first program of the group (at most ``MAX_TRIES`` tried) that reproduces the accepted answers of the
    group's other questions (at most ``MAX_CHECKS``), or None."""
    tries = 0
    for i, (example, _) in enumerate(group):
        candidate = template(example.input, example.program)
        if candidate is None:
            continue
        tries += 1
        others = [(e, values) for j, (e, values) in enumerate(group) if j != i and e.input != example.input]
        others = others[:MAX_CHECKS]
        results = run([candidate.program_for(values) for _, values in others])
        if others and all(answers_match(program_answer(r, kind), e.target, kind)
                          for (e, _), r in zip(others, results)):
            return candidate
        if tries >= MAX_TRIES:
            break
    return None


_WORD = re.compile(r"[a-z]{3,12}")


@functools.lru_cache(maxsize=4)
def vocabulary(model_path: str) -> tuple[str, ...]:
    """The lowercase whole words (3-12 letters) of the model's own tokenizer: what a quoted-words variation
    draws its words from. Why the tokenizer's: it is there for every model, offline, and holds tens of
    thousands of words (20,537 for the embedded model), so variations are new words, not the few dozen a
    scope's questions quoted, and no word list has to ship (or be chosen to suit a test). A token that
    starts a word carries the tokenizer's word-start marker (``Ġ`` byte-level BPE, ``▁`` SentencePiece)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    words = set()
    for token in tokenizer.get_vocab():
        if token[:1] in ("Ġ", "▁") and _WORD.fullmatch(token[1:]):
            words.add(token[1:])
    logger.info("variations: %d words in the vocabulary of %s", len(words), model_path)
    return tuple(sorted(words))
