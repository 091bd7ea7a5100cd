"""A damaged database, seen by the operator: ``agent store check``, one-line errors, a server and a consolidation
that refuse to write into it. Real SQLite files, damaged the way ``tests/store/test_integrity.py`` damages them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

import agent.consolidation
from agent import Agent, AgentConfig
from agent.cli import main
from agent.server import create_app
from agent.server.errors import api_error
from store import (
    SCHEMA_VERSION,
    Store,
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreReadOnly,
    StoreUnavailable,
)
from tests.agent.test_server import ServerThread
from tests.store.test_integrity import (
    damaged_database,
    database_with_rows,
    overwrite_middle_pages,
)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user data dir, no stray S2AGENT_* settings, no network."""
    for key in list(os.environ):
        if key.startswith("S2AGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("S2AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    assert err.startswith("agent: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_store_check_on_a_healthy_database(capsys, tmp_path):
    db = database_with_rows(tmp_path / "agent.db", rows=20)
    code, out, _ = run(capsys, "--db", str(db), "store", "check")
    assert code == 0
    assert out.startswith(f"ok: {db} (sqlite, ") and f"schema version {SCHEMA_VERSION}" in out
    assert "PRAGMA integrity_check" in out
    code, out, _ = run(capsys, "--db", str(db), "store", "check", "--quick", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["problems"] == []


def test_store_check_lists_the_first_problems_and_exits_1(capsys, tmp_path):
    db = damaged_database(tmp_path / "agent.db")
    before = digest(db)
    code, out, _ = run(capsys, "--db", str(db), "store", "check")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"damaged: {db} (sqlite,") and lines[1].startswith("  ")
    assert f"sqlite3 {db} .recover" in out
    code, out, _ = run(capsys, "--db", str(db), "store", "check", "--json")
    assert code == 1 and json.loads(out)["problems"]
    assert digest(db) == before  # checking never writes


def test_store_check_calls_a_text_file_what_it_is(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes\n")
    code, out, _ = run(capsys, "--db", str(notes), "store", "check")
    assert code == 1 and "not a database" in out
    code, _, err = run(capsys, "--db", str(tmp_path / "missing.db"), "store", "check")
    assert code == 2 and "no database at" in one_line_error(err)
    assert not (tmp_path / "missing.db").exists()


def test_store_stats_on_a_damaged_file_is_one_line(capsys, tmp_path):
    db = damaged_database(tmp_path / "agent.db")
    code, out, err = run(capsys, "--db", str(db), "store", "stats")
    assert code == 2 and out == ""
    assert f"{db} is damaged" in one_line_error(err) and ".recover" in err


def test_a_server_refuses_to_start_on_a_damaged_file(capsys, tmp_path, tiny_model_dir):
    db = damaged_database(tmp_path / "agent.db")
    before = digest(db)
    code, _, err = run(capsys, "--db", str(db), "--model", str(tiny_model_dir), "serve", "--port", "1")
    assert code == 2
    assert "is damaged (PRAGMA quick_check:" in one_line_error(err) and "will not write to it" in err
    assert digest(db) == before


def test_a_consolidation_checks_the_store_before_it_writes(tmp_path, tiny_model_dir, monkeypatch):
    db = database_with_rows(tmp_path / "agent.db")
    config = AgentConfig(model=str(tiny_model_dir), db=str(db), threads=1, max_new_tokens=8, seed=0)
    with Agent(config) as running:  # healthy when the server started...
        overwrite_middle_pages(db)  # ...damaged since
        running.store.engine.dispose()  # no page of the old file left in a pooled connection's cache
        before = digest(db)
        monkeypatch.setattr(agent.consolidation, "STORE_CHECK_MAX_AGE_S", 0.0)
        with pytest.raises(StoreCorrupt, match="is damaged"):
            running.consolidate()
        assert digest(db) == before  # no run row, no lock row: nothing written
    with Store(db) as store, pytest.raises(StoreCorrupt):
        store.verify()


def test_a_store_damaged_under_a_running_server_answers_503_store_damaged(tmp_path, tiny_model_dir):
    db = database_with_rows(tmp_path / "agent.db")
    config = AgentConfig(model=str(tiny_model_dir), db=str(db), threads=1, max_new_tokens=8, seed=0)
    config.server.admin_token = "secret"
    with Agent(config) as running, ServerThread(create_app(running)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/readyz").json()["status"] == "ready"
        overwrite_middle_pages(db)
        running.store.engine.dispose()
        stats = http.get("/admin/stats", headers={"Authorization": "Bearer secret"})
        assert stats.status_code == 503, stats.text
        error = stats.json()["error"]
        assert error["code"] == "store_damaged" and "is damaged" in error["message"]
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "store_damaged"
        before = digest(db)
        chat = http.post("/v1/chat/completions", json={"model": "default",
                                                       "messages": [{"role": "user", "content": "1 + 1?"}]})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "store_damaged"
        assert digest(db) == before  # the answer was not logged into the damaged file


@pytest.mark.parametrize(("error", "code"), [(StoreBusy("locked"), "store_busy"), (StoreFull("full"), "store_full"),
                                             (StoreReadOnly("ro"), "store_read_only"),
                                             (StoreCorrupt("bad page"), "store_damaged"),
                                             (StoreUnavailable("I/O error"), "store_unavailable")])
def test_store_trouble_is_a_503_of_its_own_even_in_a_rollback(error, code):
    for operation in (None, "chat", "rollback"):  # not "rollback refused": nothing is wrong with the request
        assert (api_error(error, operation).status, api_error(error, operation).code) == (503, code)
    assert api_error(StoreError("no such version"), "rollback").status == 409
