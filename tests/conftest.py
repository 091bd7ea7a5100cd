"""Shared fixtures: a tiny random llama model with a tokenizer made in code, agents built on it, and the
databases they keep their data in.

The tiny model makes real forward passes, real LoRA training and real adapter swaps run in
milliseconds; tests that need the real embedded model are marked ``slow``.

A test that takes ``db_url`` (``tiny_config`` does) runs twice: on a SQLite file and on a fresh database of
the PostgreSQL server named by ``S2AGENT_TEST_POSTGRES_URL`` (``bash .ci/postgres.sh run ...`` starts a
throwaway one). Without that variable the PostgreSQL variants skip, except on CI (``CI`` set), where they
fail: CI must run them.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

DATABASES = ["sqlite", "postgresql"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Take the last letters of the words in 'apple house' and concatenate them.",
    "What is 47 + 38? The answer is 85. A coin is heads up. Alice flips the coin.",
    "The capital of France is Paris. Name a primary colour. Red, blue, yellow.",
    "answer = ''.join(w[-1] for w in words) Answer: yes no tie A B 0123456789",
]


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a 2-layer random llama and a byte-level BPE tokenizer with a ChatML template to ``folder``."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_random_adapter(model_dir: str | Path, folder: Path, seed: int = 1, rank: int = 4) -> Path:
    """A LoRA adapter (q, v) whose matrices are random, so that it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir: Path):
    from agent.backends.hf import HFBackend

    return HFBackend(str(tiny_model_dir), model_name="tiny-llama", threads=1)


def postgres_server_url() -> str:
    """``S2AGENT_TEST_POSTGRES_URL``; without it the calling test skips, or fails when ``CI`` is set."""
    url = os.environ.get("S2AGENT_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail("CI is set but S2AGENT_TEST_POSTGRES_URL is not: on CI the PostgreSQL tests must run "
                    "(.ci/run starts a server with .ci/postgres.sh)", pytrace=False)
    pytest.skip("set S2AGENT_TEST_POSTGRES_URL to run the PostgreSQL variants "
                "(bash .ci/postgres.sh run .venv/bin/python -m pytest ...)")


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "the condition",
             poll: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; fail naming ``what`` after
    ``timeout`` seconds. Tests wait on states, not on fixed sleeps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database on the test server, dropped afterwards (with whatever is still connected to it).

    Yields its URL in the form the server's was given in (a plain ``postgresql://`` URL stays plain, so the
    store's choice of driver is what the tests exercise).
    """
    from bench.store import postgres_database

    with postgres_database(postgres_server_url(), prefix="s2agent_test") as url:
        yield url


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Where a test's agent keeps its data: ``tmp_path/agent.db``, or the URL of a fresh PostgreSQL database.

    With a server URL the adapters go to ``$S2AGENT_HOME/adapters``; ``S2AGENT_HOME`` is set to ``tmp_path``
    (for worker processes too), so they land in ``tmp_path/adapters`` on both backends.
    """
    if request.param == "sqlite":
        yield str(tmp_path / "agent.db")
        return
    monkeypatch.setenv("S2AGENT_HOME", str(tmp_path))
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module", params=DATABASES)
def module_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``db_url`` for module-scoped agents: one database per module and backend."""
    home = tmp_path_factory.mktemp("s2agent-home")
    if request.param == "sqlite":
        yield str(home / "agent.db")
        return
    with pytest.MonkeyPatch.context() as patch, fresh_postgres_database() as url:
        patch.setenv("S2AGENT_HOME", str(home))
        yield url


@pytest.fixture
def tiny_config(tiny_model_dir: Path, db_url: str):
    from agent.config import AgentConfig

    config = AgentConfig(model=str(tiny_model_dir), db=db_url, threads=1, max_new_tokens=8, seed=0)
    config.system2.samples = 4
    config.system2.max_new_tokens = 16
    config.scoping.auto = False  # tests of the general adapter keep untagged examples untagged; test_scoped turns it on
    return config


@pytest.fixture
def tiny_agent(tiny_config):
    from agent import Agent

    agent = Agent(tiny_config)
    yield agent
    agent.close()


@pytest.fixture
def arith(monkeypatch):
    """Registers the scripted :class:`tests.fakes.Arithmetic` System 2 method as ``METHODS["arith"]``."""
    from policies.system2 import METHODS
    from tests.fakes import Arithmetic

    monkeypatch.setitem(METHODS, "arith", Arithmetic)


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """The real embedded SmolLM2-135M-Instruct (dequantized once into the user cache)."""
    from agent.models import resolve_model

    return resolve_model("default")


def teach_pairs(model_dir: Path, folder: Path, pairs: list[tuple[list, str]], steps: int = 80,
                max_length: int = 128) -> Path:
    """A copy of the tiny model fully fine-tuned to answer each chat of ``pairs`` with its reply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent.prompting import TrainingExample, encode_example
    from agent.training import answer_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [encode_example(tokenizer, TrainingExample(messages, reply), max_length) for messages, reply in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        answer_loss(model, rows, tokenizer.pad_token_id).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def teach_reply(model_dir: Path, folder: Path, prompts: list[str], reply: str, steps: int = 80) -> Path:
    """A copy of the tiny model fully fine-tuned to answer each of ``prompts`` with ``reply``.

    A random model's greedy answers flip at the slightest weight change, so it has no behaviour worth
    retaining; this one has a firm habit that forgetting can destroy and retention data can keep.
    """
    from agent.prompting import system1_messages

    return teach_pairs(model_dir, folder, [(system1_messages(p), reply) for p in prompts], steps)


@pytest.fixture(scope="session")
def polite_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, taught to answer every shipped retention prompt with "Sure." (see ``teach_reply``)."""
    from agent.data import retention_prompts

    return teach_reply(tiny_model_dir, tmp_path_factory.mktemp("polite-llama"), retention_prompts(), "Sure.")
