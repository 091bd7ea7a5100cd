"""The scope classifier: untagged inputs go to the scoped adapter whose training inputs they resemble."""

from __future__ import annotations

import numpy as np
import pytest

from policies.scoping import ScopeClassifier, featurise

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
