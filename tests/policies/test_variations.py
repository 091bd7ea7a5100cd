"""Wordings, program templates and new values: the pure half of making variations of solved questions."""

from __future__ import annotations

import random

import pytest

from policies.variations import HOLE, Words, allocate, fill, new_questions, ranges, template, wording


def test_a_wording_takes_out_whole_numbers_only():
    assert wording("What is 47 + 38?") == (f"What is {HOLE} + {HOLE}?", (47, 38))
    assert wording("Add 47 and 38.") == (f"Add {HOLE} and {HOLE}.", (47, 38))
    # decimals, thousands, leading zeros and digits inside words would not read the same written back
    assert wording("Is 3.5 more than 1,000 or 07 in x2?") == ("Is 3.5 more than 1,000 or 07 in x2?", ())
    assert wording(f"Is {HOLE} 4?") == (f"Is {HOLE} 4?", ())


def test_a_wording_takes_out_quoted_words_with_their_quotes_kept():
    assert wording("Count the letters in the word 'pepper'.") == (f"Count the letters in the word '{HOLE}'.", ("pepper",))
    assert wording('Take the last letters of "plant glass" and 12.') == (f'Take the last letters of "{HOLE}" and {HOLE}.',
                                                                        ("plant glass", 12))
    # an apostrophe is no quote; a quote around anything but words (digits, a trailing space) is not varied
    assert wording("It's John's 'dog'") == (f"It's John's '{HOLE}'", ("dog",))
    assert wording("Is 'x2' or 'a b ' it?") == ("Is 'x2' or 'a b ' it?", ())


def test_fill_puts_values_back_in_order():
    shape, values = wording("Compute 12 - 7 * 3.")
    assert fill(shape, values) == "Compute 12 - 7 * 3."
    assert fill(shape, (1, 2, 3)) == "Compute 1 - 2 * 3."
    with pytest.raises(ValueError, match="3 holes, got 2"):
        fill(shape, (1, 2))


def test_a_template_marks_the_literals_that_are_the_questions_numbers():
    t = template("What is 47 + 38?", "a = 47\nb = 38\nanswer = a + b + 1")
    assert t is not None and t.shape == f"What is {HOLE} + {HOLE}?"
    assert t.program_for((5, 6)) == "a = 5\nb = 6\nanswer = a + b + 1"
    # the same number used twice in the program is one slot, both places
    assert template("Double 21.", "answer = 21 + 21").program_for((4,)) == "answer = 4 + 4"


def test_a_template_marks_the_string_literals_that_are_the_questions_quoted_words():
    t = template("Take the last letters of the words in 'plant glass'.",
                 "words = 'plant glass'.split()\nanswer = ''.join(w[-1] for w in words)")
    assert t is not None and t.program_for(("new words here",)) == (
        "words = \"new words here\".split()\nanswer = ''.join(w[-1] for w in words)")
    assert template("How many letters in 'pepper' times 3?", 'answer = len("pepper") * 3').program_for(("ab", 5)) == (
        'answer = len("ab") * 5')


@pytest.mark.parametrize("question, program", [
    ("What is 4 + 4?", "answer = 4 + 4"),              # which literal is which number?
    ("What is the capital of France?", "answer = 1"),  # no number to vary
    ("What is 47 + 38?", "answer = 47 + 40 - 2"),      # 38 is not in the program
    ("What is 47 + 38?", "answer = int('47') + 38"),   # 47 only inside a string
    ("What is 47 + 38?", "answer = (47 + 38"),         # does not tokenize
    ("Count the letters in 'pepper'.", "answer = len('pep' + 'per')"),  # the word is not one literal
    ("Count the letters in 'pepper'.", "answer = len(f'pepper')"),      # an f-string is more than its text
    ("Count 'ab' and 'ab'.", "answer = len('ab')"),                     # which literal is which word?
])
def test_no_template_where_a_program_cannot_be_rerun_on_other_numbers(question, program):
    assert template(question, program) is None


def test_new_questions_stay_in_the_range_and_never_repeat_a_known_one():
    shape, _ = wording("What is 10 + 20?")
    bounds = ranges([(10, 20), (15, 29), (12, 25)])
    assert bounds == [(10, 15), (20, 29)]
    taken = {fill(shape, (10, 20)), fill(shape, (11, 21))}
    drawn = new_questions(shape, bounds, 30, random.Random(0), taken)
    assert len(drawn) == 30 and len(set(drawn)) == 30
    assert all(10 <= a <= 15 and 20 <= b <= 29 for a, b in drawn)
    assert not {fill(shape, v) for v in drawn} & taken
    # a slot that never varied keeps its value; a range with few questions gives fewer
    few = new_questions(shape, [(3, 3), (1, 4)], 10, random.Random(0), {fill(shape, (3, 1))})
    assert sorted(few) == [(3, 2), (3, 3), (3, 4)]


def test_quoted_words_are_drawn_as_many_and_as_long_as_the_scopes_were():
    shape, _ = wording("Take the last letters of the words in 'plant glass'.")
    bounds = ranges([("plant glass",), ("sea otter",), ("a big dog",)])
    assert bounds == [Words(count=(2, 3), length=(1, 5), seen=("a", "big", "dog", "glass", "otter", "plant", "sea"))]
    vocabulary = ["ox", "toolong", "cat", "pear", "x1y", "mouse", "sheep"]
    drawn = new_questions(shape, bounds, 40, random.Random(0), set(), vocabulary=vocabulary)
    assert len(drawn) == 40 and len(set(drawn)) == 40
    for (words,) in drawn:
        assert 2 <= len(words.split()) <= 3 and set(words.split()) <= {"ox", "cat", "pear", "mouse", "sheep"}
    # without a vocabulary the words the scope quoted are recombined
    alone = new_questions(shape, bounds[:1], 10, random.Random(0), set())
    assert alone and all(set(words.split()) <= set(bounds[0].seen) for (words,) in alone)


def test_allocate_keeps_each_wordings_share():
    assert allocate({"a": 30, "b": 10}, 8) == {"a": 6, "b": 2}
    shares = allocate({"a": 1, "b": 1, "c": 1}, 10)
    assert sum(shares.values()) == 10 and max(shares.values()) - min(shares.values()) == 1
    assert allocate({"a": 3}, 0) == {"a": 0}
