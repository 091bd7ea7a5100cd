"""The scope classifier: untagged inputs go to the scoped adapter whose training inputs they resemble."""

from __future__ import annotations

import numpy as np
import pytest

from policies.scoping import ScopeClassifier, ScopeIndex, featurise, scope_name

ADDITIONS = [f"What is {a} + {b}?" for a, b in zip(range(10, 40), range(40, 70))]
LAST_LETTERS = [f"Take the last letters of the words in '{a} {b}' and concatenate them."
                for a, b in [("apple", "house"), ("river", "stone"), ("green", "table"), ("music", "paper"),
                             ("cloud", "horse"), ("light", "bread")]]
GENERAL = ["What is the capital of France?", "Name a primary colour.", "Who wrote Romeo and Juliet?",
           "Translate 'thank you' into Spanish.", "Give me a synonym for happy."]


@pytest.fixture(scope="module")
def classifier() -> ScopeClassifier:
    return ScopeClassifier({"arithmetic": ADDITIONS, "last_letter": LAST_LETTERS}, GENERAL)


def test_unseen_numbers_and_words_go_to_their_task(classifier):
    assert classifier.classify("What is 81 + 94?").tag == "arithmetic"
    decision = classifier.classify("Take the last letters of the words in 'zebra quilt' and concatenate them.")
    assert decision.tag == "last_letter"
    assert decision.similarity > decision.general_similarity


@pytest.mark.parametrize("text", ["What is the capital of Italy?", "Name a primary colour.",
                                  "Write a haiku about autumn leaves."])
def test_general_and_unrelated_inputs_stay_general(classifier, text):
    decision = classifier.classify(text)
    assert decision.tag is None, decision


def test_a_tie_with_an_untagged_input_goes_to_the_tag():
    """System 1 once answered a sum of this template alone (confident, not taught): the template is still the
    task's, whose tagged inputs System 2 answered; a general question beside it stays general."""
    confident_sums = ["What is 17 plus 50?"]
    classifier = ScopeClassifier({"arithmetic": ["What is 51 plus 29?", *ADDITIONS]}, GENERAL + confident_sums)
    decision = classifier.classify("What is 67 plus 56?")
    assert decision.tag == "arithmetic" and decision.similarity == pytest.approx(decision.general_similarity)
    assert classifier.classify("What is the capital of Italy?").tag is None


def test_the_similarity_threshold_is_respected():
    strict = ScopeClassifier({"arithmetic": ADDITIONS}, GENERAL, min_similarity=1.0)
    assert strict.classify("What is 81 + 94?").tag == "arithmetic"  # digits fold: same template, same vector
    assert strict.classify("What is 81 + 94 ?").tag is None
    with pytest.raises(ValueError, match="min_similarity"):
        ScopeClassifier({"arithmetic": ADDITIONS}, GENERAL, min_similarity=0.0)


def test_no_scoped_inputs_means_no_scope():
    assert ScopeClassifier({"arithmetic": []}, GENERAL).classify("What is 1 + 2?").tag is None


def test_features_are_stable_and_normalised():
    a, b = featurise(["What is 12 + 34?", "what is 98 +   76?"])
    assert np.allclose(a, b)  # case, digits and whitespace fold away
    assert np.isclose(np.linalg.norm(a), 1.0)


# --- automatic scopes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,name", [
    ("What is 47 + 38?", "n-plus-n"),
    ("Add 47 and 38.", "add-n"),
    ("How many letters are in the word 'garden'?", "many-letters-word"),
    ("Sort these numbers: 5, 2, 9, 1.", "sort-these-numbers-n"),
    ("What is the capital of France?", "capital-france"),
    ("???", "scope"),
])
def test_scope_names_are_readable_and_stable(text, name):
    assert scope_name(text) == name


def test_the_index_groups_phrasings_of_one_task_and_keeps_tasks_apart():
    index = ScopeIndex({}, min_similarity=0.5)
    assigned = {q: index.assign(q)[0] for q in [*ADDITIONS[:5], *LAST_LETTERS[:3], "What is the capital of France?"]}
    assert {assigned[q] for q in ADDITIONS[:5]} == {"n-plus-n"}
    assert {assigned[q] for q in LAST_LETTERS[:3]} == {"take-last-letters-words"}
    assert assigned["What is the capital of France?"] == "capital-france"
    assert index.scopes == {"n-plus-n", "take-last-letters-words", "capital-france"}
    tag, similarity = index.assign("What is 81 + 94?")  # unseen numbers join the sums
    assert tag == "n-plus-n" and similarity >= 0.5


def test_phrasings_solved_by_programs_of_one_shape_share_a_scope():
    index = ScopeIndex({}, min_similarity=0.5)
    assert index.assign("What is 47 + 38?", "answer = 47 + 38")[0] == "n-plus-n"
    # unlike in text, alike in solution: another phrasing of a sum joins the sums
    tag, similarity = index.assign("Add 12 and 5.", "answer = 12 + 5  # add them")
    assert tag == "n-plus-n" and similarity >= 0.9
    assert index.assign("Add 3 and 4.")[0] == "n-plus-n"  # and that phrasing is known by its text from now on
    # another program shape is another task, however the question reads
    assert index.assign("Multiply 6 by 7.", "answer = 6 * 7")[0] == "multiply-n-by-n"
    count = 'word = "garden"\nanswer = word.count("e")'
    assert index.assign("How often does e occur in 'garden'?", count)[0] == "often-e-occur"
    assert index.assign("Count the letter r in 'carrot'.", 'word = "carrot"\nanswer = word.count("r")')[0] == "often-e-occur"
    with pytest.raises(ValueError):
        ScopeIndex({}, min_solution_similarity=1.5)


def test_the_index_starts_from_stored_scopes_and_never_reuses_a_name():
    index = ScopeIndex({"n-plus-n": ["Where is the station?"]}, min_similarity=0.9)
    tag, _ = index.assign("What is 1 + 2?")  # named like an existing, unrelated scope: gets a suffix
    assert tag == "n-plus-n-2"
    assert index.assign("What is 3 + 4?")[0] == "n-plus-n-2"
    with pytest.raises(ValueError):
        ScopeIndex({}, min_similarity=0)
