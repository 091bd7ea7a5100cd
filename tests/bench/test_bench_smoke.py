"""The benchmarks and the embedding example run end to end on the tiny model, with the smallest settings.

They check shapes and that the numbers are positive, never how fast anything is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent import AgentConfig
from agent.backends import serving_dtype
from bench import consolidation, contention, serving

ROOT = Path(__file__).resolve().parents[2]


def tiny(model_dir: Path) -> AgentConfig:
    return AgentConfig(model=str(model_dir), threads=1, max_new_tokens=8, seed=0)


def test_serving_runs_both_modes_over_http(tiny_model_dir: Path) -> None:
    results = serving.run(tiny(tiny_model_dir), clients=[1, 2], requests_per_client=1, max_tokens=4)

    assert [(r["batching"], r["clients"]) for r in results["runs"]] == [("on", 1), ("on", 2), ("off", 1), ("off", 2)]
    for r in results["runs"]:
        assert r["errors"] == 0 and r["requests"] == r["clients"]
        assert r["completion_tokens"] > 0 and r["tokens_per_s"] > 0 and r["requests_per_s"] > 0
        assert 0 < r["latency_p50_s"] <= r["latency_p99_s"]
        assert r["mean_batch_rows"] >= 1
    off = [r for r in results["runs"] if r["batching"] == "off"]
    assert all(r["mean_batch_rows"] == 1 for r in off)  # max_batch 1 really never batches
    assert "tokens/s" in serving.report(results)


def test_serving_engine_measurements_run_over_http(tiny_model_dir: Path) -> None:
    results = serving.run(tiny(tiny_model_dir), clients=[1], requests_per_client=1, max_tokens=4, engine_requests=4)

    engine = results["engine"]
    assert engine["ttft_sentence"]["ttft_p50_s"] > 0 and engine["tokens_8_clients"]["errors"] == 0
    assert [a["prefill_chunk"] for a in engine["abandoned"]] == [256, None]
    assert all(a["one_token_p50_s"] > 0 and a["prompt_tokens"] > 200 for a in engine["abandoned"])
    swap = engine["hot_swap"]
    assert swap["errors"] == 0 and list(swap["after_swap"]) == ["v1", "v2"]
    assert all(a["requests"] > 0 and a["served_by_it"] == a["requests"] for a in swap["after_swap"].values())
    assert "hot-swap during continuous batching" in serving.report(results)


def test_serving_drives_a_server_already_running(tiny_model_dir: Path, tmp_path: Path) -> None:
    from agent import Agent

    config = tiny(tiny_model_dir)
    config.db = str(tmp_path / "agent.db")
    config.routing.router = "never"
    with Agent(config) as agent, serving.ServerThread(agent) as server:
        results = serving.run_external(server.url, "default", clients=[1, 3], requests_per_client=2, max_tokens=4)
    assert [(r["clients"], r["requests"], r["errors"]) for r in results["runs"]] == [(1, 2, 0), (3, 6, 0)]
    assert all(r["completion_tokens"] > 0 for r in results["runs"])
    ttft = results["ttft"]  # streamed: the first text chunk comes no later than the whole answer
    assert ttft["requests"] == 4 and 0 < ttft["ttft_p50_s"] <= ttft["answer_p50_s"]
    assert server.url in serving.report(results) and "time to first token" in serving.report(results)


def test_a_text_chunk_is_recognised_whatever_the_servers_json_spacing() -> None:
    from bench.serving_engine import _has_text

    assert _has_text('data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}')
    assert _has_text('data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}')  # vLLM's compact JSON
    assert not _has_text('data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
    assert not _has_text("data: [DONE]") and not _has_text(": keep-alive") and not _has_text("data: {oops")


def test_general_imports_with_the_cli_and_measures_before_and_after(tiny_model_dir: Path, tmp_path: Path) -> None:
    from bench import general

    result = general.run(tiny(tiny_model_dir), "addition", n=40, n_eval=4, out=tmp_path / "out", fractions=[0.0, 1.0])

    assert result["import"].startswith("imported 40 examples")
    assert result["adapter"] is not None and result["adapter"]["scope"] is None  # the general adapter
    assert result["adapter"]["status"] in ("promoted", "rejected") and result["adapter"]["n_train"] > 0
    assert len(result["before"]["facts_right"]) == len(result["after"]["facts_right"]) > 20
    split = result["facts_in_retention_training"]  # the facts that are also retention training prompts
    assert 0 <= split["kept"] <= split["right_before"] <= result["facts_right_before"]
    # the same base weights in the other dtype answer the same facts
    assert result["numerics"]["dtype"] != serving_dtype(tiny(tiny_model_dir))
    assert len(result["numerics"]["facts_text"]) == len(result["before"]["facts_text"])
    assert result["robust"]["kept"] <= result["robust"]["right_before"] <= result["all_facts"]["right_before"]
    assert result["facts_right_before"] <= result["all_facts"]["right_before"]  # the replay's facts are among all
    none, whole = result["fractions"]
    assert none["facts_text"] == result["before"]["facts_text"]  # no update at all answers as the base model
    assert whole["facts_text"] == result["after"]["facts_text"] or result["adapter"]["status"] != "promoted"
    assert (tmp_path / "out" / "results.json").exists() and "general facts" in general.report(result)
    assert "other rounding" in general.report(result) and "at 0 of its update" in general.report(result)
    machine = result["machine"]  # greedy answers depend on the machine: the results say which one
    assert machine["cpus"] >= 1 and machine["cpu"] and machine["torch"] in general.report(result)


def test_consolidation_trains_gates_and_times_the_swap(tiny_model_dir: Path) -> None:
    results = consolidation.run(tiny(tiny_model_dir), examples=6, epochs=1, swaps=2)

    assert results["status"] in ("promoted", "rejected")
    assert results["n_train"] > 0 and results["train_seconds"] > 0 and results["seconds_per_100_per_epoch"] > 0
    assert results["run_seconds"] >= results["train_seconds"]
    assert results["peak_rss_mb"] >= results["rss_before_mb"] > 0
    assert results["adapter_mb"] > 0
    swap = results["hot_swap"]
    assert swap["swap_from_base_s"] > 0 and swap["swap_median_s"] > 0 and len(swap["swap_s"]) == 2
    assert swap["first_answer_after_swap_median_s"] > 0 and swap["steady_answer_median_s"] > 0
    assert swap["answers_served_by_new_adapter"] == 2  # every timed answer came from the adapter just swapped in
    assert "hot-swap" in consolidation.report(results)


def test_contention_times_system1_beside_each_kind_of_background_work(tiny_model_dir: Path) -> None:
    results = contention.run(tiny(tiny_model_dir), ["none", "child-nolend", "background"], examples=30, requests=3,
                             repeats=1, system2_queries=2, gap=0.05)

    none, child, background = results["rows"]
    assert len(none["latencies"]) == len(child["latencies"]) == 3 and none["overlapped"] == 3
    assert child["seeded"] == 30 and child["run_status"] in ("promoted", "rejected") and child["run_seconds"] > 0
    assert len(background["routed_latencies"]) == 2 and background["last_route_reason"] == "queued"
    assert background["background"]["labelled"] + background["background"]["failed"] == 2
    assert [s["condition"] for s in results["summary"]] == ["none", "child-nolend", "background"]
    assert "S1 p50" in contention.report(results) and "0.05 s apart" in contention.report(results)


def test_embed_example_runs(tiny_model_dir: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "embed_in_app.py"), "--model", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)

    assert done.returncode == 0, done.stderr
    assert done.stdout.count("route ") == 3
    assert "store: interactions" in done.stdout


def test_system1_runs_and_reports_the_facts_and_the_step_table(tiny_model_dir: Path) -> None:
    from bench import system1

    results = system1.run(str(tiny_model_dir), new_tokens=4, repeats=1, threads=1)

    assert results["dtype"] in ("float32", "bfloat16") and 0 <= results["facts_right"] <= results["facts"] == 32
    assert results["batch1"]["tokens_per_s"] > 0 and results["batch8"]["tokens_per_s"] > 0
    steps = results["decode_step_s"]  # measured in a fresh process, keys back to ints
    assert set(steps) == {"float32", "bfloat16"} and all(set(by_rows) == {1, 2, 3, 4, 8} for by_rows in steps.values())
    assert all(s > 0 for by_rows in steps.values() for s in by_rows.values())
    assert "seconds per decode step" in system1.report(results)
    assert set(results["adapter_batch_s"]) == {"no adapter loaded", "base rows, an adapter loaded", "rows of the adapter"}
    assert all(s > 0 for s in results["adapter_batch_s"].values()) and "batches of 16" in system1.report(results)
