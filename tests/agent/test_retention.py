"""The likelihood retention measure, calibrated on three cases whose outcome is known.

The serving model is the tiny model taught to answer every shipped retention prompt "Sure." (``polite_model_dir``):
a firm habit that forgetting can destroy. Against the default ``retention_threshold``:
- the serving model against itself must pass (1.0, KL 0);
- an adapter that answers everything with digits must fail;
- an adapter trained on the retention data alone must pass, on held-out retention prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConsolidationConfig
from agent.consolidation import split_retention
from agent.data import retention_prompts
from agent.prompting import TrainingExample, system1_messages
from agent.retention import likelihood_retention
from agent.training import train_lora
from tests.conftest import make_random_adapter

THRESHOLD = ConsolidationConfig().retention_threshold


@pytest.fixture(scope="module")
def retention_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, holdout) retention pairs as consolidation makes them: each prompt with the serving model's
    greedy answer, which ``teach_reply`` made "Sure." for every shipped retention prompt."""
    prompts = retention_prompts()
    return split_retention(prompts, ["Sure."] * len(prompts), seed=0)


def _train(model_dir: Path, pairs: list[tuple[str, str]], folder: Path) -> str:
    config = ConsolidationConfig(epochs=2, learning_rate=1e-2, batch_size=8, rank=4, alpha=8, bf16="off")
    train_lora(str(model_dir), [TrainingExample(system1_messages(p), a) for p, a in pairs], config, folder)
    return str(folder)


def test_the_serving_model_against_itself_keeps_everything(polite_model_dir, retention_split, tmp_path):
    _, holdout = retention_split
    serving = str(make_random_adapter(polite_model_dir, tmp_path / "serving"))
    same = likelihood_retention(str(polite_model_dir), holdout, serving, serving)
    assert same.n == len(holdout) and same.score == pytest.approx(1.0)
    assert same.logprob_delta == pytest.approx(0.0, abs=1e-5) and same.kl == pytest.approx(0.0, abs=1e-5)


def test_an_adapter_answering_digits_fails(polite_model_dir, retention_split, tmp_path):
    train, holdout = retention_split
    digits = _train(polite_model_dir, [(p, "0123456789") for p, _ in train], tmp_path / "digits")
    result = likelihood_retention(str(polite_model_dir), holdout, digits, None)  # serving: the bare model
    assert result.score < THRESHOLD and result.score < 0.2, result
    assert result.logprob_delta < -1.0 and result.kl > 0.5


def test_an_adapter_trained_on_the_retention_data_alone_passes(polite_model_dir, retention_split, tmp_path):
    train, holdout = retention_split
    kept = _train(polite_model_dir, train, tmp_path / "kept")
    result = likelihood_retention(str(polite_model_dir), holdout, kept, None)
    assert result.score >= THRESHOLD, result
