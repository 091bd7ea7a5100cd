"""Fixtures shared by the server tests: a real server on 127.0.0.1 around the module's own ``agent`` fixture
(each module builds the agent it needs, module-scoped), and the official ``openai`` client on it."""

from __future__ import annotations

import pytest
from openai import OpenAI

from agent.server import create_app
from tests.agent.test_server import ServerThread


@pytest.fixture(scope="module")
def server(agent):
    with ServerThread(create_app(agent)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
