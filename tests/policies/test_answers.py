"""Answer extraction and normalisation, on hand-written cases and on real SmolLM2-135M outputs.

The real outputs live in ``fixtures/smollm2_outputs.json``; ``fixtures/README.md`` has the script
that regenerates them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.answers import answers_match, extract_final, normalise, similarity

FIXTURES = Path(__file__).parent / "fixtures" / "smollm2_outputs.json"
KIND = {"last_letter": "text", "addition": "number", "coin_flip": "yesno"}

# (extract_final(output, kind), normalise(output, kind)) for each saved output, in file order.
EXPECTED = [
    # CoT outputs: the final-answer line decides, whatever the reasoning says.
    ("apple", None),  # truncated mid-answer ("The answer is 'apple"): extraction cannot know
    ("river stone cloud", "the answer is: river stone cloud"),  # "The answer is: river stone cloud"
    ("172", None),  # "So, the answer is 172." (wrong, but clearly stated)
    ("112", None),  # "23 + 59 = 112\n\nThe answer is: 112"
    ("yes", "yes"),  # "4. The answer is yes.\n\nThe answer is yes."
    (None, None),  # rambles about possible outcomes and never answers: not a vote
    # Direct outputs: no marker, so extract_final gives None; normalise reads them.
    (None, "apple_house"),
    (None, "river stone cloud"),
    (None, None),  # several numbers in a paragraph: no single answer
    (None, "126"),  # "23 + 59 = 126.": a worked equation states its result
    (None, "no"),  # "No, the coin is not still heads up. ..."
    (None, "no"),
]


def _records() -> list[dict]:
    return json.loads(FIXTURES.read_text())


def test_fixture_file_matches_expectations() -> None:
    records = _records()
    assert len(records) == len(EXPECTED)
    assert {r["style"] for r in records} == {"cot", "direct"}


@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_real_model_outputs(index: int) -> None:
    record = _records()[index]
    kind = KIND[record["task"]]
    expected_final, expected_direct = EXPECTED[index]
    assert extract_final(record["output"], kind) == expected_final, record["output"]
    assert normalise(record["output"], kind) == expected_direct, record["output"]


@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("Let me think.\nAnswer: 85", "number", "85"),
        ("reasoning...\nFinal answer: **85**.", "number", "85"),
        ("**Answer:** 1,000", "number", "1000"),
        ("#### 72", "number", "72"),
        ("so the result is \\boxed{12}", "number", "12"),
        ("Answer: 47 + 38 = 85", "number", "85"),
        ("The answer is 5. Let me check. Final answer: 6", "number", "6"),  # the last marker wins
        ("So the answer is 172. Let me check again.", "number", "172"),
        ("The answer is \"Ee\".", "text", "ee"),
        ("answer: `nd`", "text", "nd"),
        ("The answer is yes, since it was flipped twice.", "yesno", "yes"),
        ("Answer: No.", "yesno", "no"),
        ("The answer is (C).", "choice", "C"),
        ("Comparing both...\nFinal verdict: [[B]]", "verdict", "B"),
        ("Assistant A is more accurate. [[A]]", "verdict", "A"),
        ("Both are equally good. [[C]]", "verdict", "tie"),
        # No explicit marker: a rambling is not a vote, even when it contains a plausible answer.
        ("47 plus 38 makes 85, I think.", "number", None),
        ("The coin is probably heads up.", "yesno", None),
        ("", "text", None),
        ("Answer: <answer>", "text", None),  # echoed template
        ("Answer: " + "word " * 60, "text", None),  # implausibly long
        ("I need an answer: maybe 4 or 5", "number", None),
    ],
)
def test_extract_final(text: str, kind: str, expected: str | None) -> None:
    assert extract_final(text, kind) == expected


@pytest.mark.parametrize(
    "answer, kind, expected",
    [
        ('  "Hello   World." ', "text", "hello world"),
        ("`ee`", "text", "ee"),
        ("...", "text", None),
        ("x" * 201, "text", None),
        ("Yes", "yesno", "yes"),
        ("true", "yesno", "yes"),
        ("False.", "yesno", "no"),
        ("I would say no.", "yesno", "no"),
        ("Not sure, yes or no", "yesno", None),
        ("heads up", "yesno", None),
        ("85", "number", "85"),
        ("-3", "number", "-3"),
        ("3.50", "number", "3.5"),
        ("85.0", "number", "85"),
        ("1,000", "number", "1000"),
        ("$1,234.5!", "number", "1234.5"),
        ("The total is 64 apples.", "number", "64"),
        ("x = -3.", "number", "-3"),
        ("47 - 38", "number", None),  # two numbers and no result
        ("47 + 38 = 85 and 85 - 21 = 64", "number", None),
        ("v1.2.3", "number", None),
        ("none", "number", None),
        ("(B)", "choice", "B"),
        ("B.", "choice", "B"),
        ("Option b", "choice", "B"),
        ("C) Paris", "choice", "C"),
        ("a dog", "choice", None),
        ("F", "choice", None),
        ("A", "verdict", "A"),
        ("Response A", "verdict", "A"),
        ("[[A]]", "verdict", "A"),
        ("Assistant B is better", "verdict", "B"),
        ("Response A is better than Response B", "verdict", "A"),
        ("tie", "verdict", "tie"),
        ("They are equal.", "verdict", "tie"),
        ("[[C]]", "verdict", "tie"),
        ("I cannot decide", "verdict", None),
    ],
)
def test_normalise(answer: str, kind: str, expected: str | None) -> None:
    assert normalise(answer, kind) == expected


def test_normalise_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="known: text, yesno, number, choice, verdict"):
        normalise("85", "integer")  # type: ignore[arg-type]


def test_answers_match() -> None:
    assert answers_match("85", "85.0", "number")
    assert answers_match("1,000", "1000", "number")
    assert answers_match("Yes.", "yes", "yesno")
    assert answers_match("'EE'", "ee")
    assert not answers_match("85", "86", "number")
    assert not answers_match(None, None)
    assert not answers_match("maybe", "perhaps so", "yesno")  # both unparsable is no match


def test_similarity() -> None:
    assert similarity("The cat sat.", "the cat sat") == 1.0
    assert similarity("the cat sat", "a dog ran") == 0.0
    assert similarity("", "") == 1.0
    assert similarity("", "cat") == 0.0
    assert similarity("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
