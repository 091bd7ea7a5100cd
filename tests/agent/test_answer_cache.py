"""The serving model's answers kept between consolidation runs (agent/answer_cache.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from agent import Agent
from agent.answer_cache import AnswerCache, model_identity
from agent.backends import serving_dtype
from tests.fakes import QUESTIONS


class Answerer:
    """Answers each prompt with its upper-cased text, and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def __call__(self, prompts: list[str]) -> list[str]:
        self.asked.append(list(prompts))
        return [p.upper() for p in prompts]


def test_answers_are_computed_once_per_model(tmp_path: Path) -> None:
    cache, answer = AnswerCache(tmp_path / "answers.json"), Answerer()
    assert cache.answers("model-a", ["one", "two"], answer) == ["ONE", "TWO"]
    assert cache.answers("model-a", ["two", "three", "one"], answer) == ["TWO", "THREE", "ONE"]
    assert answer.asked == [["one", "two"], ["three"]]
    # another process reading the same file; another model answers for itself
    assert AnswerCache(tmp_path / "answers.json").answers("model-a", ["three"], answer) == ["THREE"]
    assert cache.answers("model-b", ["one"], answer) == ["ONE"]
    assert answer.asked[2:] == [["one"]]


def test_the_oldest_answers_go_past_capacity(tmp_path: Path) -> None:
    cache, answer = AnswerCache(tmp_path / "answers.json", capacity=2), Answerer()
    cache.answers("m", ["a", "b", "c"], answer)
    cache.answers("m", ["b", "c"], answer)
    cache.answers("m", ["a"], answer)
    assert answer.asked == [["a", "b", "c"], ["a"]]


def test_a_damaged_cache_is_answered_again_and_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    path.write_text('{"half a file')
    cache, answer = AnswerCache(path), Answerer()
    assert cache.answers("m", ["a"], answer) == ["A"]
    assert cache.answers("m", ["a"], answer) == ["A"]
    assert answer.asked == [["a"]]


def test_the_identity_follows_the_adapter_files_not_their_folder(tmp_path: Path) -> None:
    one, two, three = (tmp_path / name for name in ("v1", "v2", "v3"))
    for folder, weights in ((one, b"\x01"), (two, b"\x01"), (three, b"\x02")):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(weights)
    ids = [model_identity("base", folder, None, 128, "float32") for folder in (one, two, three)]
    assert ids[0] == ids[1] != ids[2]
    plain = model_identity("base", None, None, 128, "float32")
    assert plain not in ids
    assert model_identity("base", None, None, 64, "float32") != plain
    assert model_identity("base", None, "Be brief.", 128, "float32") != plain
    assert model_identity("base", None, None, 128, "bfloat16") != plain


def test_a_second_run_with_the_same_serving_model_decodes_no_serving_answer(tiny_config, arith, caplog) -> None:
    """Two runs in a row, both gated against the base model (the first is rejected at a retention threshold
    of 1.0): the second takes from the cache every serving answer the first decoded, retention and holdout,
    and the cached answers are the ones the base model gives now."""
    tiny_config.system2.method = "arith"
    tiny_config.routing.threshold = 1.0  # a random model is never this sure: every query goes to System 2
    tiny_config.consolidation.min_examples = 1
    tiny_config.consolidation.epochs = 1
    tiny_config.consolidation.min_steps = 1
    tiny_config.consolidation.retention_threshold = 1.0
    with Agent(tiny_config) as agent:
        for q in QUESTIONS[:12]:
            agent.answer(q)
        with caplog.at_level(logging.INFO, logger="agent.answer_cache"):
            first = agent.consolidate()
            assert first.status == "rejected" and agent.serving_version() is None
            asked = [r.getMessage() for r in caplog.records]
            caplog.clear()
            for q in QUESTIONS[12:]:  # new examples for a second run
                agent.answer(q)
            second = agent.consolidate()
            again = [r.getMessage() for r in caplog.records]
        assert first.n_retention_holdout > 0 and first.n_holdout > 0
        counts = [[(int(m.split()[2]), int(m.split()[4])) for m in messages] for messages in (asked, again)]
        assert len(counts[0]) == len(counts[1]) == 2  # retention answers, then the holdout's serving answers
        assert all(hits == 0 for hits, _ in counts[0])  # the first run decoded every serving answer
        # the second decoded none of those again: only the retention prompts its larger training set added
        assert all(hits_again >= total for (_, total), (hits_again, _) in zip(*counts))
        assert second.metrics["holdout_accuracy_serving"] == first.metrics["holdout_accuracy_serving"]
        path = agent.config.adapters_path() / "serving-answers.json"
        assert path.is_file()
        cache = AnswerCache(path)
        identity = model_identity(agent.model_path, None, agent.config.system_prompt, agent.config.max_new_tokens,
                                  serving_dtype(agent.config))
        prompt = "What is the capital of France?"
        now = agent.system1_batch([prompt])[0].text
        assert cache.answers(identity, [prompt], lambda missing: [now] * len(missing)) == [now]
