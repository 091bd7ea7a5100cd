"""The adapter registry tells the truth: what cannot load never serves, and what serves is what is reported.

Real adapters on the tiny llama, real truncated weight files, the real server on 127.0.0.1 and the CLI; each
test runs on SQLite and PostgreSQL (``tiny_config``), except the CLI's, which read a SQLite file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import httpx
import pytest

from agent import Agent
from agent.cli import main
from agent.errors import AdapterError
from agent.server import create_app
from store import Store
from tests.agent.test_server import ServerThread
from tests.conftest import make_random_adapter

ADMIN = {"Authorization": "Bearer secret"}


def truncate(folder: Path) -> None:
    """Cut an adapter's weights in half, as a full disk or an interrupted copy leaves them."""
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def add_adapter(store: Store, model_dir: Path, root: Path, version: int, parent: int | None,
                scope: str | None = None) -> Path:
    folder = make_random_adapter(model_dir, root / f"v{version}", seed=version)
    store.register_adapter(version, str(folder), parent, scope=scope)
    return folder


@pytest.fixture
def config(tiny_config):
    tiny_config.server.admin_token = "secret"
    return tiny_config


def model_ids(http: httpx.Client) -> list[str]:
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


# --- rollback and promotion: load, then commit -----------------------------------------------------------------
def test_rollback_to_weights_that_do_not_load_is_refused_with_409_and_changes_nothing(config, tiny_model_dir,
                                                                                       tmp_path):
    with Agent(config) as agent:
        add_adapter(agent.store, tiny_model_dir, tmp_path, 1, None)
        v2 = add_adapter(agent.store, tiny_model_dir, tmp_path, 2, 1)
        agent.store.promote_adapter(2)
        agent.store.promote_adapter(1)  # v1 serves; v2 was promoted once, so it is a rollback target
        agent.refresh_adapters(force=True)
        truncate(v2)
        with ServerThread(create_app(agent)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            refused = http.post("/admin/rollback", json={"version": 2}, headers=ADMIN)
            assert refused.status_code == 409, refused.text
            error = refused.json()["error"]
            assert error["code"] == "rollback_refused" and error["param"] == "version"
            assert "do not load" in error["message"] and "v1 keeps serving" in error["message"]
            assert agent.store.serving_adapter().version == 1  # the registry kept its serving version
            assert agent.serving_version() == 1
            assert f"{agent.model_name}:adapter-v2" not in model_ids(http)
            assert f"{agent.model_name}:adapter-v1" in model_ids(http)
            chat = http.post("/v1/chat/completions", json={"model": "default",
                                                           "messages": [{"role": "user", "content": "1 + 1?"}]})
            assert chat.json()["s2agent"]["adapter_version"] == 1  # the previous adapter keeps serving
            rows = {r["version"]: r for r in http.get("/admin/adapters", headers=ADMIN).json()["data"]}
            assert (rows[1]["serving"], rows[1]["loaded"]) == (True, True)
            assert (rows[2]["serving"], rows[2]["loaded"]) == (False, False)


def test_rollback_skips_an_ancestor_whose_weights_do_not_load(config, tiny_model_dir, tmp_path):
    with Agent(config) as agent:
        for version, parent in ((1, None), (2, 1), (3, 2)):
            add_adapter(agent.store, tiny_model_dir, tmp_path, version, parent)
            agent.store.promote_adapter(version)
        truncate(tmp_path / "v2")
        row = agent.rollback()
        assert row is not None and row.version == 1
        assert agent.serving_version() == 1 and agent.store.serving_adapter().version == 1
        assert agent.adapter_failures() == []


def test_promoting_weights_that_do_not_load_is_refused(config, tiny_model_dir, tmp_path):
    with Agent(config) as agent:
        add_adapter(agent.store, tiny_model_dir, tmp_path, 1, None)
        agent.promote(1)
        assert agent.serving_version() == 1
        truncate(add_adapter(agent.store, tiny_model_dir, tmp_path, 2, 1))
        with pytest.raises(AdapterError, match="cannot promote adapter v2: its weights do not load"):
            agent.promote(2)
        assert agent.store.serving_adapter().version == 1 and agent.serving_version() == 1
        assert agent.store.get_adapter(2).status == "candidate"


# --- what serves is what is reported -----------------------------------------------------------------------------
def test_a_damaged_serving_adapter_at_start_is_logged_and_visible(config, tiny_model_dir, tmp_path, caplog):
    with Store(config.db) as store:
        v1 = add_adapter(store, tiny_model_dir, tmp_path, 1, None)
        store.promote_adapter(1)
    truncate(v1)  # e.g. the disk filled while the adapter was copied; then the server restarts
    with caplog.at_level(logging.ERROR, logger="agent.loop"), Agent(config) as agent:
        assert any("v1" in r.getMessage() and "does not load" in r.getMessage() for r in caplog.records)
        assert agent.serving_version() is None  # the base model answers, and says so:
        [failure] = agent.adapter_failures()
        assert (failure["scope"], failure["version"], failure["serving_version"]) == (None, 1, None)
        with ServerThread(create_app(agent)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            ready = http.get("/readyz").json()
            assert ready["status"] == "degraded" and ready["adapter_failures"][0]["version"] == 1
            models = http.get("/v1/models").json()["data"]
            assert [m["id"] for m in models] == [agent.model_name]  # v1 is not advertised
            assert models[0]["s2agent"]["adapter_failures"][0]["version"] == 1
            assert "s2agent_adapter_load_failures 1" in http.get("/metrics").text
            rows = http.get("/admin/adapters", headers=ADMIN).json()
            assert rows["data"][0]["loaded"] is False and "corrupted" in rows["data"][0]["load_error"]
            assert rows["serving"] == {}
            chat = http.post("/v1/chat/completions", json={"model": "default",
                                                           "messages": [{"role": "user", "content": "1 + 1?"}]})
            assert chat.status_code == 200 and chat.json()["s2agent"]["adapter_version"] is None
            assert http.post("/admin/rollback", json={"version": 0}, headers=ADMIN).status_code == 200
            ready = http.get("/readyz").json()
            assert ready["status"] == "ready" and ready["adapter_failures"] == []
            assert "s2agent_adapter_load_failures 0" in http.get("/metrics").text


def test_an_unloadable_promotion_by_another_process_keeps_the_previous_adapter(config, tiny_model_dir, tmp_path,
                                                                              caplog, monkeypatch):
    with Agent(config) as agent:
        add_adapter(agent.store, tiny_model_dir, tmp_path, 1, None)
        agent.promote(1)
        with Store(config.db) as other:  # another process's registry change, through its own connections
            v2 = add_adapter(other, tiny_model_dir, tmp_path, 2, 1)
            good = v2.with_name("v2-good")
            shutil.copytree(v2, good)
            truncate(v2)
            other.promote_adapter(2)
        with caplog.at_level(logging.ERROR, logger="agent.loop"):
            agent.refresh_adapters(force=True)
            monkeypatch.setattr("agent.loop.ADAPTER_POLL_SECONDS", 0.0)
            agent.refresh_adapters()  # polled again: not retried (nor logged) until ADAPTER_RETRY_SECONDS pass
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "v2" in errors[0].getMessage() and "serving v1 instead" in errors[0].getMessage()
        assert agent.serving_version() == 1
        assert [(f["version"], f["serving_version"]) for f in agent.adapter_failures()] == [(2, 1)]
        with ServerThread(create_app(agent)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            models = http.get("/v1/models").json()["data"]
            assert [m["id"] for m in models] == [agent.model_name, f"{agent.model_name}:adapter-v1"]
            assert models[1]["s2agent"]["registry_serving"] is False  # what serves here, not what the registry says
            asked = http.post("/v1/chat/completions", json={"model": f"{agent.model_name}:adapter-v2",
                                                            "messages": [{"role": "user", "content": "hi"}]})
            assert asked.status_code == 404
        shutil.rmtree(v2)
        shutil.copytree(good, v2)  # the operator restores the files
        agent.refresh_adapters(force=True)
        assert agent.serving_version() == 2 and agent.adapter_failures() == []


# --- the CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("S2AGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("S2AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_cli_refuses_a_rollback_to_weights_that_do_not_load(cli_env, tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "agent.db"
    with Store(db) as store:
        add_adapter(store, tiny_model_dir, tmp_path, 1, None)
        truncate(add_adapter(store, tiny_model_dir, tmp_path, 2, 1))
        store.promote_adapter(2)
        store.promote_adapter(1)
    capsys.readouterr()  # what building the adapters printed
    code = main(["--db", str(db), "adapters", "rollback", "2"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("agent: error: cannot roll back to v2: its weights do not load") and "nothing changed" in err
    with Store(db) as store:
        assert store.serving_adapter().version == 1

    assert main(["--db", str(db), "adapters", "rollback", "0"]) == 0  # the base model needs no weights
    capsys.readouterr()
    with Store(db) as store:
        assert store.serving_adapter() is None


def test_cli_adapters_ls_flags_a_serving_adapter_that_does_not_load(cli_env, tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "agent.db"
    with Store(db) as store:
        truncate(add_adapter(store, tiny_model_dir, tmp_path, 1, None))
        store.promote_adapter(1)  # marked serving by a process that did not check
    capsys.readouterr()
    assert main(["--db", str(db), "adapters", "ls"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("v1 "))
    assert " ! " in row
    assert "! v1 is marked serving but does not load" in out and "agent adapters rollback" in out
    assert main(["--db", str(db), "adapters", "ls", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["serving"] is True and "corrupted" in listed["load_error"]
