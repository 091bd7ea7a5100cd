"""BatchingBackend over the tiny HFBackend: concurrent callers share batches and keep their own results."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.backends import (
    Backend,
    GenerationRequest,
    PromptTooLongError,
    SamplingParams,
)
from agent.backends.batching import BatchingBackend
from agent.backends.hf import HFBackend

PROMPTS = [
    "The capital of France is", "What is 47 + 38?", "apple house", "Alice flips the coin.",
    "Name a primary colour.", "Take the last letters", "A coin is heads up.", "Red, blue, yellow",
]
PARAMS = SamplingParams(max_new_tokens=12)
TOO_LONG = "apple house " * 400


@pytest.fixture
def engine(tiny_model_dir: Path) -> HFBackend:
    return HFBackend(str(tiny_model_dir), model_name="tiny-llama", threads=1)


@pytest.fixture
def batcher(engine: HFBackend):
    wrapper = BatchingBackend(engine, max_batch=16, max_wait_ms=200)
    yield wrapper
    wrapper.close()


def run_concurrently(backend: BatchingBackend, prompts: list[str]) -> list[object]:
    """Each prompt from its own thread, all released at once; returns a result or an exception each."""
    results: list[object] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = backend.generate([GenerationRequest(prompts[i], PARAMS)])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller never got its answer"
    return results


def sequential(engine: HFBackend, prompts: list[str]) -> list[list[int]]:
    return [engine.generate([GenerationRequest(p, PARAMS)])[0][0].token_ids for p in prompts]


def test_same_protocol_as_the_engine(batcher: BatchingBackend, engine: HFBackend) -> None:
    assert isinstance(batcher, Backend)
    assert batcher.model_name == "tiny-llama"
    assert batcher.context_length == engine.context_length == 512
    assert batcher.count_tokens("apple house") == engine.count_tokens("apple house")
    assert batcher.generate([]) == []


def test_concurrent_callers_share_batches(batcher: BatchingBackend, engine: HFBackend) -> None:
    expected = sequential(engine, PROMPTS)
    assert len({tuple(t) for t in expected}) > 1

    results = run_concurrently(batcher, PROMPTS)

    for result, tokens in zip(results, expected):
        assert not isinstance(result, Exception), result
        [[completion]] = result
        assert completion.token_ids == tokens
    assert 1 <= batcher.batches < len(PROMPTS)
    assert batcher.batched_rows == len(PROMPTS)


def test_batches_never_exceed_max_batch(engine: HFBackend) -> None:
    batcher = BatchingBackend(engine, max_batch=3, max_wait_ms=200)
    try:
        expected = sequential(engine, PROMPTS)
        results = run_concurrently(batcher, PROMPTS)
        assert [r[0][0].token_ids for r in results] == expected
        assert batcher.batches >= 3  # 8 rows, at most 3 per batch
        assert batcher.batched_rows == len(PROMPTS)
        # A single request larger than max_batch still runs (alone).
        [completions] = batcher.generate([GenerationRequest(PROMPTS[0], SamplingParams(n=5, temperature=1.0,
                                                                                       max_new_tokens=4, seed=0))])
        assert len(completions) == 5
    finally:
        batcher.close()


def test_multi_request_calls_keep_their_order(batcher: BatchingBackend, engine: HFBackend) -> None:
    expected = sequential(engine, PROMPTS[:3])
    out = batcher.generate([GenerationRequest(p, PARAMS) for p in PROMPTS[:3]])
    assert [r[0].token_ids for r in out] == expected


def test_a_bad_request_fails_only_its_caller(batcher: BatchingBackend, engine: HFBackend) -> None:
    prompts = [*PROMPTS[:5], TOO_LONG, *PROMPTS[5:7]]
    expected = sequential(engine, PROMPTS[:7])

    results = run_concurrently(batcher, prompts)

    assert isinstance(results[5], PromptTooLongError)
    good = [r for i, r in enumerate(results) if i != 5]
    for result, tokens in zip(good, expected):
        assert not isinstance(result, Exception), result
        assert result[0][0].token_ids == tokens
    assert batcher.batched_rows == 7
    # The worker survived: later calls still work.
    assert batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])[0][0].token_ids == expected[0]


def test_close_stops_the_worker(engine: HFBackend) -> None:
    batcher = BatchingBackend(engine, max_wait_ms=1)
    assert batcher._worker.is_alive()
    assert batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)])[0][0].num_tokens > 0
    batcher.close()
    assert not batcher._worker.is_alive()


def test_generate_after_close_fails_fast(engine: HFBackend) -> None:
    batcher = BatchingBackend(engine, max_wait_ms=1)
    batcher.close()
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(batcher.generate([GenerationRequest(PROMPTS[0], PARAMS)]))
        except Exception as exc:  # noqa: BLE001
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)  # daemon: a regression would leave it blocked
    caller.start()
    caller.join(timeout=5)
    assert outcome, "generate() after close() blocked instead of failing"
    assert isinstance(outcome[0], RuntimeError)
    assert "closed" in str(outcome[0])
