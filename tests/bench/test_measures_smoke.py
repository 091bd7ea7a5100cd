"""``bench paper``, ``bench loop``, ``bench system2`` and ``bench knobs`` end to end on the tiny model.

A random model writes no usable answers, so these check that every row and file is produced and
that the numbers are well formed, not what they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import AgentConfig
from bench import knobs, loop, paper, system2


def tiny(model_dir: Path) -> AgentConfig:
    config = AgentConfig(model=str(model_dir), threads=1, max_new_tokens=8, seed=0)
    config.system2.max_new_tokens = 12
    config.consolidation.retention_prompts = 4
    return config


def test_paper_writes_rows_json_and_plot(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = paper.PaperSettings(tasks=["addition"], methods=["cot"], n_train=4, n_eval=3, n_eval_prompting=2, k=2)
    result = paper.run(settings, tiny(tiny_model_dir), tmp_path)

    systems = [r["system"] for r in result["rows"]]
    assert systems == ["system1", "system2:cot", "distilled"]
    for row in result["rows"][:2]:
        assert {"task", "system", "accuracy", "tokens_per_query", "seconds_per_query", "n"} <= set(row)
        assert 0 <= row["accuracy"] <= 1 and row["tokens_per_query"] > 0 and row["n"] > 0
    assert result["rows"][0]["accuracy_unseen"] is not None
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert "system2:cot" in paper.table(result["rows"])


def test_paper_reads_jsonl_tasks(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text('{"input": "What is 1 + 1?", "answer": "2"}\n')
    (tmp_path / "train.jsonl").write_text('{"input": "What is 2 + 2?"}\n')
    settings = paper.PaperSettings(methods=["cot"], k=2, data=str(tmp_path / "eval.jsonl"),
                                   train_data=str(tmp_path / "train.jsonl"))
    result = paper.run(settings, tiny(tiny_model_dir), tmp_path / "out")
    assert [r["task"] for r in result["rows"]][:2] == ["eval", "eval"]


def test_loop_measures_each_round(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny(tiny_model_dir)
    config.routing.threshold = 1.0  # route everything to System 2
    result = loop.run(loop.LoopSettings(task="addition", queries=4, round=2, method="cot", n_eval=2, k=2), config,
                      tmp_path)
    rounds = result["rounds"]
    assert [r["queries_served"] for r in rounds] == [0, 2, 4]
    assert all(r["system2_share"] == 1.0 for r in rounds[1:])
    assert all(r["tokens_per_query"] > 0 for r in rounds[1:])
    assert (tmp_path / "learning_curve.png").exists() and "served" in loop.table(result)


def test_system2_reports_each_k(tiny_model_dir: Path) -> None:
    result = system2.run(tiny(tiny_model_dir), "addition", "cot", [1, 2], n=2)
    assert [r["k"] for r in result["rows"]] == [1, 2]
    assert all(r["seconds_per_query"] > 0 and 0 <= r["acceptance_rate"] <= 1 for r in result["rows"])
    assert "acc. of accepted" in system2.report(result)


def test_knobs_trains_one_adapter_per_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny(tiny_model_dir)
    config.consolidation.batch_size = 8
    result = knobs.run(config, "addition", n_train=8, n_eval=2, out=tmp_path)
    assert [r["setting"] for r in result["rows"]] == [s[0] for s in knobs.settings(config.consolidation, 8)]
    assert all(r.get("train_seconds", 0) > 0 for r in result["rows"] if "status" not in r)
    assert "rank 4" in knobs.report(result)


def test_knobs_runs_only_the_named_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny(tiny_model_dir)
    config.consolidation.batch_size = 8
    result = knobs.run(config, "addition", n_train=8, n_eval=2, out=tmp_path, only=["rank 4"])
    assert [r["setting"] for r in result["rows"]] == ["rank 4"]
    with pytest.raises(ValueError, match="unknown knob setting"):
        knobs.run(config, "addition", n_train=8, n_eval=2, out=tmp_path, only=["rank 5"])


def test_loop_measures_batch_distillation_of_the_same_examples(tiny_model_dir: Path, tmp_path: Path, arith) -> None:
    """With every query accepted (the scripted ``arith`` System 2), each round also trains one adapter from the
    base on everything accepted so far, and the table shows it beside the loop's own System 1."""
    config = tiny(tiny_model_dir)
    config.routing.threshold = 1.0
    config.consolidation.retention_threshold = 0.0  # a random model has no behaviour worth retaining
    result = loop.run(loop.LoopSettings(task="addition", queries=6, round=3, method="arith", n_eval=2, k=2,
                                        batch="each", replay="all"), config, tmp_path)
    rounds = result["rounds"]
    assert [r.get("batch_examples") for r in rounds] == [None, 3, 6]  # all accepted so far, any status
    assert all(0 <= r["batch_accuracy"] <= 1 for r in rounds[1:]), rounds
    assert rounds[2]["replay"] == "all"
    assert "batch" in loop.table(result)


def test_knobs_general_runs_the_kl_settings_into_the_general_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny(tiny_model_dir)
    config.consolidation.batch_size = 8
    result = knobs.run(config, "addition", n_train=8, n_eval=2, out=tmp_path, only=["KL 3 only"], general=True)
    [row] = result["rows"]
    assert row["setting"] == "KL 3 only" and row["retention_likelihood"] is not None and row["gate"]
    assert "the general adapter" in knobs.report(result)
