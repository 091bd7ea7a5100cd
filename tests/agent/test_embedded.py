"""The real embedded SmolLM2-135M-Instruct through the whole agent: System 1 and program-aided System 2."""

from __future__ import annotations

import pytest

from agent import Agent, AgentConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def agent(embedded_model_dir, tmp_path_factory):
    config = AgentConfig(model="default", db=str(tmp_path_factory.mktemp("embedded") / "agent.db"),
                         max_new_tokens=32, seed=0)
    config.system2.samples = 4
    with Agent(config) as agent:
        yield agent


def test_system1_answers_a_simple_question_sensibly(agent):
    answer = agent.answer("What is the capital of France?", route="system1")
    assert "paris" in answer.text.lower()
    assert answer.route == "system1" and 0 < answer.confidence <= 1
    assert agent.model_name == "SmolLM2-135M-Instruct"


def test_program_aided_system2_labels_a_last_letter_question(agent):
    query = "Take the last letters of the words in 'apple house' and concatenate them."
    answer = agent.answer(query, route="system2", method="pal", tag="last_letter")
    assert answer.route == "system2" and answer.text == "ee"
    assert answer.accepted and answer.votes["ee"] >= 3
    [example] = agent.store.list_examples(status="pending")
    assert (example.input, example.target, example.tag) == (query, "ee", "last_letter")


def test_program_aided_arithmetic(agent):
    answer = agent.answer("What is 47 + 38?", route="system2", method="pal", tag="arithmetic")
    assert answer.text == "85" and answer.accepted
