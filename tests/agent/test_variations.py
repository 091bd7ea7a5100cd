"""Variations of solved questions, with the real sandbox and a real store: which programs are trusted to
label new questions, what they label, and a consolidation run that trains on them."""

from __future__ import annotations

import random

import pytest

from agent import Agent
from agent.variations import MIN_SOLVED, Solved, make_variations, solved, vocabulary
from policies.variations import wording
from store import Store

SUMS = [(12, 30), (45, 11), (23, 67), (50, 41), (33, 21), (18, 64), (29, 38), (61, 15)]


def sums(program: str = "a = {a}\nb = {b}\nanswer = a + b", phrasing: str = "What is {a} + {b}?",
         pairs=SUMS) -> list[Solved]:
    return [Solved(phrasing.format(a=a, b=b), str(a + b), program.format(a=a, b=b)) for a, b in pairs]


def test_a_verified_program_labels_new_questions_of_its_wording_with_the_right_answers():
    held_out = "What is 20 + 40?"
    made = make_variations(sums(), 40, 10, "number", seed=3, taken=[held_out])
    assert len(made.train) == 40 and len(made.holdout) == 10 and made.unverified == []
    known = {e.input for e in sums()} | {held_out}
    lows, highs = [min(c) for c in zip(*SUMS)], [max(c) for c in zip(*SUMS)]
    for example in made.train + made.holdout:
        shape, (a, b) = wording(example.input)
        assert shape == "What is {#} + {#}?" and example.target == str(a + b)  # Python's sum, run in the sandbox
        assert lows[0] <= a <= highs[0] and lows[1] <= b <= highs[1]
        assert example.input not in known
    assert len({e.input for e in made.train + made.holdout}) == 50
    # seeded: the same examples give the same variations
    assert make_variations(sums(), 40, 10, "number", seed=3, taken=[held_out]) == made


def test_wordings_share_the_variations_by_how_often_they_were_solved():
    plus = sums(phrasing="What is {a} plus {b}?", pairs=SUMS[:4])
    made = make_variations(sums() + plus, 30, 0, "number")
    assert made.made == {"What is {#} + {#}?": 20, "What is {#} plus {#}?": 10}


def test_a_wrong_program_is_not_trusted_but_a_right_one_of_the_same_wording_is():
    # the first program tried computes its own question's answer by a detour that is no sum: it gives no other
    # question's answer, so the next program of the wording is tried
    wrong = Solved("What is 12 + 30?", "42", "answer = 12 * 30 // 360 * 42")
    made = make_variations([wrong, *sums(pairs=SUMS[1:])], 10, 0, "number")
    assert made.unverified == [] and len(made.train) == 10
    assert all(e.target == str(sum(wording(e.input)[1])) for e in made.train)


def test_a_wording_whose_programs_disagree_with_its_answers_makes_nothing():
    # programs that ignore the question's meaning (a constant offset) reproduce no other answer
    off = [Solved(f"What is {a} + {b}?", str(a + b), f"answer = {a} + {b} + {a % 3 + 1}") for a, b in SUMS]
    made = make_variations(off, 20, 5, "number")
    assert (made.train, made.holdout, made.unverified) == ([], [], ["What is {#} + {#}?"])


def test_too_few_solved_questions_or_no_values_make_nothing():
    assert make_variations(sums(pairs=SUMS[:MIN_SOLVED - 1]), 20, 0, "number").train == []
    unquoted = [Solved(f"Last letter of {w}?", w[-1], f"answer = '{w}'[-1]") for w in ("abc", "dog", "cat", "owl")]
    assert make_variations(unquoted, 20, 0, "text").train == []


COUNTING = ["pepper", "zipper", "stone", "dream", "night"]
FRUIT = ["apple", "banana", "cherry", "melon", "grape", "lemons", "peach", "mango"]


def test_quoted_words_vary_too_labelled_by_the_program_that_counted_them():
    counted = [Solved(f"Count the letters in the word '{w}'.", str(len(w)), f'answer = len("{w}")') for w in COUNTING]
    asked = []

    def words():
        asked.append(1)
        return ["ox", "kiwi", "strawberries", *FRUIT]

    made = make_variations(counted, 6, 2, "number", words=words)
    assert len(asked) == 1 and made.made == {"Count the letters in the word '{#}'.": 8}
    for example in made.train + made.holdout:
        (word,) = wording(example.input)[1]
        assert word in FRUIT  # as long as the scope's words, 5-6 letters
        assert example.target == str(len(word))  # the program's answer, run in the sandbox
    # a wording of numbers only never asks for the vocabulary
    make_variations(sums(), 5, 0, "number", words=words)
    assert len(asked) == 1


def test_the_vocabulary_is_the_tokenizers_lowercase_whole_words(tiny_model_dir):
    from transformers import AutoTokenizer

    words = vocabulary(str(tiny_model_dir))
    tokens = AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    assert words == tuple(sorted(words))
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 12 and "Ġ" + w in tokens for w in words)


def test_a_program_that_fails_on_new_numbers_labels_nothing_there():
    # verified on the answered questions, but raises for a new b in range: those questions are dropped
    program = "a = {a}\nb = {b}\nassert b != 20\nanswer = a + b"
    made = make_variations(sums(program, pairs=[(a, b) for a, b in SUMS if b != 20] + [(10, 19), (11, 21)]),
                           60, 0, "number", seed=1)
    assert made.train and all(wording(e.input)[1][1] != 20 for e in made.train)


def test_solved_reads_the_program_that_gave_the_accepted_answer(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'agent.db'}")
    try:
        samples = [{"answer": "41", "trace": "answer = 40 + 1"}, {"answer": "42", "trace": "answer = 12 + 30"}]
        iid = store.log_interaction(input="What is 12 + 30?", route="system2", final_answer="42", method="pal",
                                    route_reason={"samples": samples})
        pal, _ = store.add_example("What is 12 + 30?", "42", "pal", interaction_id=iid)
        cot, _ = store.add_example("What is 1 + 2?", "3", "cot", interaction_id=iid)
        unlinked, _ = store.add_example("What is 2 + 2?", "4", "pal")
        assert solved(store, [pal, cot, unlinked]) == [Solved("What is 12 + 30?", "42", "answer = 12 + 30")]
    finally:
        store.close()


@pytest.fixture
def sums_config(tiny_config):
    c = tiny_config.consolidation
    c.min_examples, c.epochs, c.min_steps, c.learning_rate, c.batch_size, c.rank = 4, 1, 0, 1e-2, 8, 4
    c.retention_threshold, c.retention_prompts, c.variations = 0.0, 8, 40
    return tiny_config


def teach_sums(agent: Agent, pairs) -> None:
    for a, b in pairs:
        question, program = f"What is {a} + {b}?", f"answer = {a} + {b}"
        iid = agent.store.log_interaction(input=question, route="system2", final_answer=str(a + b), method="pal",
                                          route_reason={"samples": [{"answer": str(a + b), "trace": program}]})
        agent.store.add_example(question, str(a + b), "pal", interaction_id=iid, tag="sums")


def test_a_consolidation_run_trains_and_gates_on_variations_of_its_solved_questions(sums_config):
    rng = random.Random(0)
    pairs = list({(rng.randint(10, 60), rng.randint(10, 60)) for _ in range(12)})
    with Agent(sums_config) as agent:
        teach_sums(agent, pairs)
        sums_config.consolidation.variations = 0
        off = agent.consolidate(scope="sums", dry_run=True)
        assert off.n_variations == 0 and "variations" not in off.metrics and off.n_new > 4

        sums_config.consolidation.variations = 40
        preview = agent.consolidate(scope="sums", dry_run=True)
        assert preview.n_variations == 40 - preview.n_new
        made = [row for row in preview.train_preview if row["source"] == "variation"]
        assert len(made) == preview.n_variations
        assert all(row["target"] == str(sum(wording(row["input"])[1])) for row in made)

        report = agent.consolidate(scope="sums")
        assert report.status in ("promoted", "rejected"), report.reason
        assert report.n_variations == preview.n_variations
        variations = report.metrics["variations"]
        assert variations["train"] == report.n_variations
        assert variations["holdout"] == round(report.n_variations * 0.2 / 0.8)  # holdout_fraction 0.2 of them all
        assert report.metrics["n_train"] == report.n_new + report.n_variations + report.n_retention
        # nothing made up is stored: the buffer holds what System 2 answered, and no more
        assert agent.store.count_examples() == len(pairs)
