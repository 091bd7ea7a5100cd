"""The paper's synthetic tasks, generated locally, plus any JSONL file of ``{"input", "answer"}`` items.

Every task has three disjoint splits built from a fixed seed:
- ``train``: unlabeled inputs System 2 labels (their answers are only used to score the labels);
- ``eval``: held-out items made of the same entities (words, names, numbers) as training;
- ``unseen``: held-out items made only of entities never used in training, so that learning a rule
  is not mistaken for memorising entities.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

WORDS = (
    "apple house river stone green paper light music table water dream horse cloud smile plant glass "
    "bread chair night storm tiger ocean field dance train queen money heart sugar pilot lemon "
    "candle garden silver winter summer forest island rocket button carpet dragon engine finger "
    "guitar hammer jacket kitten ladder magnet needle orange pepper rabbit saddle ticket violin wallet "
    "yellow zipper anchor bottle castle desert feather ginger helmet insect jungle kettle lizard marble "
    "noodle oyster parrot quartz ribbon spider tomato turtle velvet walnut basket cherry donkey falcon "
    "goblet harbor igloo jigsaw koala lantern mitten nectar olive pencil puzzle radish salmon tunnel "
    "umpire vendor window yogurt zebra beacon comet dolphin ember fossil glacier hollow ivory jasmine "
    "kayak lotus meadow nugget orchid pebble quiver raven sapphire thunder unicorn valley willow"
).split()
NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Mia Noah Olga Paul Quinn Rosa Sam "
    "Tina Uma Victor Wendy Xavier Yara Zoe Abel Bella Chris Dora Ethan Fiona George Hana Ivan Julia Kevin "
    "Lara Mason Nina Oscar Petra Ralph Sofia Tom Ursula Vera Walter Yusuf Zack"
).split()


@dataclass(frozen=True)
class Item:
    input: str
    answer: str


@dataclass
class Task:
    name: str
    kind: str
    """Answer kind used to compare answers (``text``, ``number``, ``yesno``)."""
    family: str
    """Program-aided template family (``last_letter``, ``arithmetic``, ``coin_flip``, ``generic``)."""
    train: list[Item]
    eval: list[Item]
    unseen: list[Item]


def _split_pool(pool: list[str], seed: int, unseen_share: float = 0.3) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    shuffled = pool[:]
    rng.shuffle(shuffled)
    cut = int(len(shuffled) * (1 - unseen_share))
    return shuffled[:cut], shuffled[cut:]


def _unique(make: Callable[[random.Random], Item], n: int, rng: random.Random, taken: set[str]) -> list[Item]:
    """Up to ``n`` items none of which is in ``taken`` (then added to it). Fewer when the pool runs short;
    none at all is an error, since a split with no items (held-out ones, after training took the pool)
    would print an accuracy of 0.00 over nothing."""
    items: list[Item] = []
    tries = 0
    while len(items) < n and tries < n * 200:
        tries += 1
        item = make(rng)
        if item.input not in taken:
            taken.add(item.input)
            items.append(item)
    if n > 0 and not items:
        raise ValueError(f"no question left to draw after {len(taken)}: the task's pool is too small for the "
                         "items asked for; ask for fewer training items")
    return items


def last_letter(n_words: int = 2, n_train: int = 200, n_eval: int = 100, seed: int = 0) -> Task:
    seen, unseen = _split_pool(WORDS, seed)

    def maker(pool):
        def make(rng: random.Random) -> Item:
            words = rng.sample(pool, n_words)
            question = f"Take the last letters of the words in '{' '.join(words)}' and concatenate them."
            return Item(question, "".join(w[-1] for w in words))
        return make

    rng, taken = random.Random(seed), set()
    train = _unique(maker(seen), n_train, rng, taken)
    return Task(f"last_letter_{n_words}", "text", "last_letter", train,
                _unique(maker(seen), n_eval, rng, taken), _unique(maker(unseen), n_eval, rng, taken))


def coin_flip(n_train: int = 200, n_eval: int = 100, seed: int = 0) -> Task:
    seen, unseen = _split_pool(NAMES, seed)

    def maker(pool):
        def make(rng: random.Random) -> Item:
            people = rng.sample(pool, rng.randint(2, 4))
            heads = True
            parts = ["A coin is heads up."]
            for person in people:
                if rng.random() < 0.5:
                    parts.append(f"{person} flips the coin.")
                    heads = not heads
                else:
                    parts.append(f"{person} does not flip the coin.")
            parts.append("Is the coin still heads up?")
            return Item(" ".join(parts), "yes" if heads else "no")
        return make

    rng, taken = random.Random(seed), set()
    train = _unique(maker(seen), n_train, rng, taken)
    return Task("coin_flip", "yesno", "coin_flip", train,
                _unique(maker(seen), n_eval, rng, taken), _unique(maker(unseen), n_eval, rng, taken))


ADDITION_WORDINGS = ("What is {a} plus {b}?", "Add {a} and {b}.")
"""Sums in words: program-aided System 2 gives them its ``arithmetic_words`` shots, as it does to such a
question that comes untagged."""


def arithmetic(terms: int = 2, n_train: int = 200, n_eval: int = 100, seed: int = 0, words: bool = False) -> Task:
    """``a + b`` (terms=2) or ``a + b - c`` (terms=3); unseen items use operands from a range never trained on.
    ``words``: two-term sums asked in :data:`ADDITION_WORDINGS` instead of ``What is a + b?``."""

    def maker(low: int, high: int):
        def make(rng: random.Random) -> Item:
            a, b = rng.randint(low, high), rng.randint(low, high)
            if words:
                return Item(rng.choice(ADDITION_WORDINGS).format(a=a, b=b), str(a + b))
            if terms == 2:
                return Item(f"What is {a} + {b}?", str(a + b))
            c = rng.randint(low, high)
            return Item(f"What is {a} + {b} - {c}?", str(a + b - c))
        return make

    rng, taken = random.Random(seed), set()
    train = _unique(maker(10, 69), n_train, rng, taken)
    name = "addition_words" if words else "addition" if terms == 2 else "add_sub"
    return Task(name, "number", "arithmetic_words" if words else "arithmetic", train,
                _unique(maker(10, 69), n_eval, rng, taken), _unique(maker(70, 99), n_eval, rng, taken))


COUNTING_PHRASINGS = ("How many letters are in the word '{w}'?", "Count the letters in the word '{w}'.")
SORTING_PHRASINGS = ("Sort these numbers: {xs}", "Sort these numbers from smallest to largest: {xs}")


def counting(n_train: int = 200, n_eval: int = 100, seed: int = 0) -> Task:
    """The length of one word, in two phrasings (a question about text with a number for answer)."""
    seen, unseen = _split_pool(WORDS, seed)

    def maker(pool):
        def make(rng: random.Random) -> Item:
            word = rng.choice(pool)
            return Item(rng.choice(COUNTING_PHRASINGS).format(w=word), str(len(word)))
        return make

    rng, taken = random.Random(seed), set()
    train = _unique(maker(seen), n_train, rng, taken)
    return Task("counting", "number", "generic", train,
                _unique(maker(seen), n_eval, rng, taken), _unique(maker(unseen), n_eval, rng, taken))


def sorting(n_train: int = 200, n_eval: int = 100, seed: int = 0) -> Task:
    """4-6 whole numbers to put in ascending order, in two phrasings; unseen items hold one number of 70-99."""

    def maker(low: int, high: int):
        def make(rng: random.Random) -> Item:
            xs = rng.sample(range(1, 70), rng.randint(3, 5)) + [rng.randint(low, high)]
            rng.shuffle(xs)
            question = rng.choice(SORTING_PHRASINGS).format(xs=", ".join(map(str, xs)))
            return Item(question, ", ".join(map(str, sorted(xs))))
        return make

    rng, taken = random.Random(seed), set()
    train = _unique(maker(1, 69), n_train, rng, taken)
    return Task("sorting", "text", "generic", train,
                _unique(maker(1, 69), n_eval, rng, taken), _unique(maker(70, 99), n_eval, rng, taken))


def from_jsonl(eval_path: str | Path, train_path: str | Path | None = None, name: str | None = None,
               kind: str = "text") -> Task:
    """A task from files: eval items need ``input`` and ``answer``; train items only ``input`` is read
    (labels come from System 2, never from the file)."""

    def read(path, need_answer: bool) -> list[Item]:
        items = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append(Item(str(row["input"]), str(row["answer"]) if need_answer else ""))
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{n}: needs a JSON object with 'input'"
                                 f"{' and answer' if need_answer else ''} ({exc})") from None
        return items

    return Task(name or Path(eval_path).stem, kind, "generic",
                read(train_path, False) if train_path else [], read(eval_path, True), [])


TASKS: dict[str, Callable[..., Task]] = {
    "last_letter_2": lambda **kw: last_letter(2, **kw),
    "last_letter_3": lambda **kw: last_letter(3, **kw),
    "coin_flip": coin_flip,
    "addition": lambda **kw: arithmetic(2, **kw),
    "add_sub": lambda **kw: arithmetic(3, **kw),
    "addition_words": lambda **kw: arithmetic(2, words=True, **kw),
    "counting": counting,
    "sorting": sorting,
}
