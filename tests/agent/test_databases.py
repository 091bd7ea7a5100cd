"""What the agent logs is the same on SQLite and on PostgreSQL, where the two databases would disagree.

PostgreSQL refuses text with NUL characters and strings longer than their column; SQLite keeps both. A query
(or a model's output) with a NUL is answered and logged on both; a tag too long to store is refused up front,
before any generation, as a client error.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from agent.loop import InvalidQueryError
from agent.server import create_app
from store.schema import MAX_TAG_LENGTH


def test_a_query_with_a_nul_character_is_answered_and_logged(tiny_agent):
    answer = tiny_agent.answer("What is 2 + 2?\x00", route="system1")
    [logged] = tiny_agent.store.list_interactions()
    assert logged.id == answer.interaction_id
    assert logged.input == "What is 2 + 2?\ufffd"  # PostgreSQL text cannot hold NUL: no backend keeps it
    assert logged.final_answer == answer.text.replace("\x00", "\ufffd")


def test_a_tag_too_long_to_store_is_refused_before_any_generation(tiny_agent):
    batches = tiny_agent.backend.prefills
    with pytest.raises(InvalidQueryError, match=f"the most is {MAX_TAG_LENGTH}"):
        tiny_agent.answer("What is 2 + 2?", tag="t" * (MAX_TAG_LENGTH + 1))
    assert tiny_agent.backend.prefills == batches and tiny_agent.store.list_interactions() == []
    assert tiny_agent.answer("What is 2 + 2?", tag="t" * MAX_TAG_LENGTH, route="system1").interaction_id


def test_the_server_answers_a_too_long_tag_with_a_400(tiny_agent):
    client = TestClient(create_app(tiny_agent))
    response = client.post("/v1/chat/completions", json={
        "model": "default", "messages": [{"role": "user", "content": "hi"}],
        "s2agent": {"tag": "t" * (MAX_TAG_LENGTH + 1)}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "s2agent.tag"
    assert tiny_agent.store.list_interactions() == []
