"""``agent bench live`` on the tiny model: a real ``agent serve`` subprocess, the official client, the smallest run.

It checks what the benchmark promises (the server started and stopped, every request answered, the
windows and the checks written, the plot drawn, shares in [0, 1]), never how much the tiny model learns.
"""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest

from bench import cli, live

# Small server settings through the pass-through environment, so the run takes seconds on two cores.
TINY_SERVER = ["S2AGENT_MAX_NEW_TOKENS=8", "S2AGENT_SYSTEM2__SAMPLES=2", "S2AGENT_SYSTEM2__MAX_NEW_TOKENS=16",
               "S2AGENT_THREADS=1"]


def test_traffic_is_seeded_mixed_and_keeps_the_probes_out_of_the_replay() -> None:
    stream, probes = live.traffic(400, live.DEFAULT_MIX, 5, seed=0)

    assert (stream, probes) == live.traffic(400, live.DEFAULT_MIX, 5, seed=0)
    counts = Counter(q.family for q in stream)
    assert len(stream) == 400 and set(counts) == set(live.FAMILIES)
    assert all(abs(counts[f] / 400 - share) < 0.06 for f, share in live.DEFAULT_MIX.items())
    assert Counter(q.family for q in probes) == dict.fromkeys(live.KINDS, 5)
    assert not {q.input for q in probes} & {q.input for q in stream}
    phrasings = {q.input.split()[0] for q in stream if q.family == "arithmetic"}
    assert phrasings == {"What", "Add", "Compute"}
    for q in stream + probes:  # each expected answer is right by the benchmark's own scoring
        assert live.correct(q, q.answer or "") is (None if q.family == "unanswerable" else True), q
    assert live.correct(live.Query("Sort these numbers: 9, 2, 5", "sorting", "2, 5, 9"), "[2, 5, 9]")
    assert live.correct(live.Query("What is the capital of France?", "general", "Paris"), "It is Paris.")
    assert not live.correct(live.Query("How many legs does a spider have?", "general", "8"), "It has 18 legs.")
    assert len(set(live.pick_facts(8))) == 8 and live.pick_facts(None) == live.FACTS
    assert live.parse_mix("arithmetic=3,general=1") == {**dict.fromkeys(live.FAMILIES, 0.0), "arithmetic": 0.75,
                                                        "general": 0.25}


def test_live_replay_runs_a_real_server_and_writes_its_measures(tiny_model_dir: Path, tmp_path: Path,
                                                                capsys) -> None:
    out = tmp_path / "live"
    argv = ["live", "--model", str(tiny_model_dir), "--queries", "12", "--window", "6", "--clients", "2",
            "--probes", "1", "--facts", "4", "--out", str(out), *(f"--server-env={e}" for e in TINY_SERVER)]

    assert cli.main(argv) == 0

    result = json.loads((out / "results.json").read_text())
    server = result["server"]
    assert server["ready_s"] > 0 and server["stopped_by"] == "SIGTERM" and server["exit_code"] == 0
    assert not psutil.pid_exists(server["pid"]) and not Path(server["home"]).exists()
    assert "serve" in server["command"] and str(tiny_model_dir) in server["command"]
    assert server["url"].removeprefix("http://") in (out / "server.log").read_text()  # its log was kept

    windows = result["windows"]
    assert [(w["window"], w["queries_served"], w["n"]) for w in windows] == [(1, 6, 6), (2, 12, 12 - 6)]
    assert all(w["errors"] == 0 for w in windows) and result["errors_outside_windows"] == 0  # every request 2xx
    assert result["requests"] == 2 * 4 + 4 * 3 + 12 + 6  # the last window's 6 again, on System 1 alone
    alone = result["system1_alone"]
    assert alone["n"] == 6 and alone["errors"] == [] and 0 < alone["latency_p50_s"] <= alone["latency_p95_s"]
    for w in windows:
        assert sum(w["families"].values()) == w["n"]
        for key in ("system2_share", "system2_answered_share", "served_accuracy"):
            assert w[key] is None or 0.0 <= w[key] <= 1.0, key
        assert w["system2_tokens_per_query_metrics"] is not None  # the server's counter was read
        assert w["system2_tokens_per_query_metrics"] >= 0 and w["system2_tokens_per_query_responses"] >= 0
        assert 0 < w["latency_p50_s"] <= w["latency_p95_s"]
        assert w["probe"]["n"] == 4 and 0.0 <= w["probe"]["accuracy"] <= 1.0 and w["probe"]["latency_p50_s"] > 0
        assert sum(w["probe"]["served_by"].values()) == 4  # which scope and adapter answered each probe
        assert all(k.split(": ")[0] in live.KINDS for k in w["probe"]["served_by"])
        assert isinstance(w["adapters"], dict) and isinstance(w["consolidation_runs"], dict)
        assert w["examples_learned"] >= 0 and w["examples_per_hour"] >= 0  # the buffer's counts were read
    assert result["examples_learned"] == sum(w["examples_learned"] for w in windows)
    assert result["examples_per_hour"] >= 0
    assert 0.0 <= result["probe_start"]["accuracy"] <= 1.0

    kept = result["retention"]
    assert kept["facts"] == 4 and len(result["retention_start"]) == len(result["retention_end"]) == 4
    assert 0.0 <= kept["share_right_start"] <= 1.0 and 0.0 <= kept["share_right_end"] <= 1.0
    assert kept["kept_share"] is None if kept["right_start"] == 0 else 0.0 <= kept["kept_share"] <= 1.0

    assert [c["result"] for c in result["checks"]][-1] == "pass"  # no request failed
    assert all(c["result"] in ("pass", "fail", "n/a") for c in result["checks"]) and len(result["checks"]) == 6
    assert (out / "live.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "no request failed" in printed and printed.count("\n") > len(windows) + 6
    assert "System 1 alone on the last window's queries again" in printed
    assert "System 1 alone on the same queries p50" in result["checks"][3]["measured"]


def _stand_in(tmp_path: Path) -> live.ServerProcess:
    """A ServerProcess whose command is a plain static file server answering ``/readyz``: the lifecycle
    (start, wait for ready, stop or kill, clean up) on a real process, without loading a model."""
    site = tmp_path / "site"
    site.mkdir(parents=True)
    (site / "readyz").write_text("ok")
    server = live.ServerProcess("unused", log_path=tmp_path / "server.log")
    server.command = [sys.executable, "-m", "http.server", str(server.port), "--bind", "127.0.0.1",
                      "--directory", str(site)]
    return server


def test_the_server_is_killed_and_its_data_dir_removed_when_the_replay_fails(tmp_path: Path) -> None:
    server = _stand_in(tmp_path / "failing")
    with pytest.raises(RuntimeError, match="replay failed"):
        with server:
            assert psutil.pid_exists(server.process.pid) and server.home.is_dir()
            raise RuntimeError("replay failed")

    assert server.info["stopped_by"] == "SIGKILL" and server.process.returncode == -signal.SIGKILL
    assert not psutil.pid_exists(server.process.pid) and not server.home.exists()

    calm = _stand_in(tmp_path / "calm")
    with calm:
        pass
    assert calm.info["stopped_by"] == "SIGTERM" and calm.process.returncode == -signal.SIGTERM
    assert not calm.home.exists()


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    server = live.ServerProcess("unused", log_path=tmp_path / "server.log", ready_timeout_s=30)
    server.command = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]

    with pytest.raises(RuntimeError, match="exited with code 3 before it was ready(.|\n)*no model here"):
        with server:
            pass
    assert not server.home.exists()


def test_a_window_counts_system2_inline_and_queued_in_the_background_but_not_skipped_or_dropped() -> None:
    def reply(route: str, method: str | None = None, system2: str | None = None) -> live.Reply:
        return live.Reply(live.Query("What is 2 + 2?", "arithmetic", "4"), True, 1.0, text="4", route=route,
                          method=method, system2=system2)

    replies = [reply("system2", "pal"), reply("system1", "pal"), reply("system1", system2="queued"),
               reply("system1", system2="dropped"), reply("system1", system2="skipped"), reply("system1")]
    state = live.ServerState(None, {}, {})
    record = live.window_record(1, 6, replies, [], state, state, 6.0)

    assert record["system2_share"] == 3 / 6  # inline with an answer, inline without one, queued
    assert record["system2_answered_share"] == 1 / 6
    assert record["system2_background_share"] == 2 / 6 and record["system2_skipped_share"] == 1 / 6
    assert record["served_accuracy"] == 1.0
    assert record["background"] == {} and record["background_waiting"] is None

    assert record["examples_learned"] is None and record["examples_per_hour"] is None  # no buffer counts read

    before = live.ServerState(10.0, {}, {}, 7.0, {"queued": 20, "labelled": 5, "skipped": 0}, examples=12, at=100.0)
    after = live.ServerState(30.0, {}, {}, 3.0, {"queued": 24, "labelled": 9, "skipped": 4}, examples=15, at=190.0)
    record = live.window_record(2, 12, replies, [], before, after, 6.0)
    assert record["background"] == {"queued": 4, "labelled": 4, "skipped": 4} and record["background_waiting"] == 3.0
    # 3 examples in the 90 s between the two reads (not the 6 s of replay alone: labels go on during the probes)
    assert record["examples_learned"] == 3 and record["examples_per_hour"] == 120.0


def test_examples_learned_are_the_buffer_but_its_rejected_rows_read_from_real_metrics_text() -> None:
    from agent.metrics import Metrics

    snapshot = {"system2_acceptance_rate": 0.5, "buffer": {"pending": 3, "used": 2, "holdout": 1, "rejected": 4},
                "runs": {}, "serving": {}}
    assert live.learned_examples(live.parse_metrics(Metrics().render(snapshot))) == 6
    assert live.learned_examples(live.parse_metrics(Metrics().render({**snapshot, "buffer": {}}))) == 0
    assert live.learned_examples(live.parse_metrics(Metrics().render(None))) is None  # the store did not answer


def test_a_pace_starts_requests_an_interval_apart_from_any_client_and_never_bursts_to_catch_up() -> None:
    import threading
    import time

    pace, starts, lock = live.Pace(0.05), [], threading.Lock()

    def client() -> None:
        for _ in range(3):
            start = pace.wait()
            woke = time.monotonic()  # on a busy machine a thread may run late, never early
            with lock:
                starts.append((start, woke))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    assert len(starts) == 6 and all(woke >= start for start, woke in starts)
    assert all(b[0] - a[0] >= 0.045 for a, b in zip(starts, starts[1:]))

    time.sleep(0.2)  # nobody asked for four intervals: the next two starts are still an interval apart
    first = time.monotonic()
    pace.wait()
    pace.wait()
    assert time.monotonic() - first >= 0.045


def test_the_background_latency_bar_compares_with_system1_alone_on_the_same_queries() -> None:
    def window(p50: float, background: float) -> dict:
        return {"promoted": [], "system2_tokens_per_query_metrics": 10.0, "system2_tokens_per_query_responses": 0.0,
                "system2_share": 0.5, "latency_p50_s": p50, "probe": {"latency_p50_s": 0.3},
                "system2_background_share": background, "errors": 0}

    def p50_check(result: dict) -> dict:
        result.update(retention={"kept_share": None, "kept": 0, "right_start": 0}, errors_outside_windows=0,
                      requests=10)
        return live.checks(result)[3]

    background = {"windows": [window(0.7, 0.5), window(0.57, 0.5)], "system1_alone": {"latency_p50_s": 0.4}}
    check = p50_check(background)
    assert check["result"] == "pass"  # 0.57 <= 1.5 x 0.4, although 1.5 x the probes' 0.3 would fail
    assert "same queries p50 0.40 s (on the probes 0.30 s)" in check["measured"]
    assert p50_check({**background, "system1_alone": {"latency_p50_s": 0.3}})["result"] == "fail"
    # inline: only halving counts, whatever System 1 alone takes
    assert p50_check({"windows": [window(1.6, 0.0), window(0.5, 0.0)], "system1_alone": {"latency_p50_s": 0.1}}
                     )["result"] == "pass"
    assert p50_check({"windows": [window(1.6, 0.0), window(0.9, 0.0)], "system1_alone": {"latency_p50_s": 0.8}}
                     )["result"] == "fail"
