"""API keys: where they come from, what they may do, and that their secrets stay secret."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from agent.auth import ALL_RIGHTS, KeyRing, check_exposure, is_loopback, unnamed_source
from agent.config import AgentConfig, ServerConfig
from agent.errors import ConfigError


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def test_keys_come_from_the_flag_the_table_and_a_file(tmp_path: Path) -> None:
    file = tmp_path / "keys.toml"
    file.write_text(f'[carol]\nkey_sha256 = "{sha("c-secret")}"\nrights = ["answer", "teach", "steer"]\n')
    server = ServerConfig(api_key="one-secret", api_keys_file=str(file),
                          api_keys={"alice": {"key_sha256": sha("a-secret"), "rights": ["answer", "teach"]},
                                    "bob": {"key": "b-secret"}})
    ring = KeyRing.load(server)
    assert ring.configured
    assert ring.names() == [unnamed_source("one-secret"), "alice", "bob", "carol"]
    assert unnamed_source("one-secret") == "key-" + sha("one-secret")[:12]
    assert ring.authenticate("one-secret").rights == ALL_RIGHTS
    assert ring.authenticate("a-secret").rights == {"answer", "teach"}
    assert ring.authenticate("b-secret").rights == {"answer"}  # no rights given: answered, never taught
    assert ring.authenticate("c-secret").name == "carol"
    assert ring.authenticate("wrong") is None and ring.authenticate("") is None
    assert ring.admin_names() == {unnamed_source("one-secret")}
    assert "secret" not in repr(ring.keys) and "secret" not in repr(server)


def test_a_json_keys_file(tmp_path: Path) -> None:
    file = tmp_path / "keys.json"
    file.write_text(json.dumps({"ops": {"key_sha256": sha("o"), "rights": ["admin"]}}))
    ring = KeyRing.load(ServerConfig(api_keys_file=str(file)))
    assert ring.authenticate("o").name == "ops" and ring.admin_enabled and ring.admin_names() == {"ops"}


def test_plain_keys_in_a_file_others_may_read_are_warned_about(tmp_path: Path, caplog) -> None:
    file = tmp_path / "keys.toml"
    file.write_text('[alice]\nkey = "a-secret"\n')
    file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="agent.auth"):
        KeyRing.load(ServerConfig(api_keys_file=str(file)))
    assert "chmod 600" in caplog.text and "a-secret" not in caplog.text
    caplog.clear()
    file.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="agent.auth"):
        KeyRing.load(ServerConfig(api_keys_file=str(file)))
    assert caplog.text == ""


def test_the_admin_token_opens_admin_routes_only() -> None:
    ring = KeyRing.load(ServerConfig(admin_token="t0ken"))
    assert not ring.configured and ring.admin_enabled
    assert ring.is_admin_token("t0ken") and not ring.is_admin_token("other")
    assert ring.authenticate("t0ken") is None
    assert not KeyRing.load(ServerConfig()).admin_enabled


@pytest.mark.parametrize(("table", "words"), [
    ({"alice": {"key": "s", "rights": ["answer", "fly"]}}, "unknown right(s) ['fly']"),
    ({"alice": {"rights": ["answer"]}}, "exactly one of key_sha256"),
    ({"alice": {"key": "s", "key_sha256": sha("s")}}, "exactly one of key_sha256"),
    ({"alice": {"key_sha256": "abc"}}, "64 hex digits"),
    ({"alice": {"key": ""}}, "non-empty"),
    ({"alice": {"key": "s", "right": ["answer"]}}, "unknown field(s) ['right']"),
    ({"local": {"key": "s"}}, "reserved"),
    ({"a b": {"key": "s"}}, "a name is"),
    ({"alice": "s"}, "must be a table"),
])
def test_bad_key_tables_are_config_errors_that_show_no_secret(table, words, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(env={"S2AGENT_API_KEYS": json.dumps(table)})
    assert words in str(info.value) and "S2AGENT_API_KEYS" in str(info.value)
    file = tmp_path / "keys.json"
    file.write_text(json.dumps(table))
    with pytest.raises(ConfigError, match="keys.json"):
        KeyRing.load(ServerConfig(api_keys_file=str(file)))


def test_unreadable_or_malformed_key_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        KeyRing.load(ServerConfig(api_keys_file=str(tmp_path / "missing.toml")))
    bad = tmp_path / "keys.toml"
    bad.write_text('[alice\nkey = "hunter2"')
    with pytest.raises(ConfigError, match="not valid TOML"):
        KeyRing.load(ServerConfig(api_keys_file=str(bad)))
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(env={"S2AGENT_API_KEYS": '{"alice": {"key": "hunter2"'})
    assert "hunter2" not in str(info.value) and "not shown" in str(info.value)
    same = {"alice": {"key": "x"}, "bob": {"key_sha256": sha("x")}}
    with pytest.raises(ConfigError, match="same secret"):
        KeyRing.load(ServerConfig(api_keys=same))
    file = tmp_path / "more.json"
    file.write_text(json.dumps({"alice": {"key": "y"}}))
    with pytest.raises(ConfigError, match="in both"):
        KeyRing.load(ServerConfig(api_keys={"alice": {"key": "x"}}, api_keys_file=str(file)))


def test_keys_in_the_toml_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[server.api_keys.alice]\nkey_sha256 = "{sha("a")}"\nrights = ["answer", "teach"]\n'
                    '[consolidation]\nmax_source_share = 0.25\nuncapped_sources = ["alice"]\n')
    config = AgentConfig.load(path, env={})
    assert KeyRing.load(config.server).authenticate("a").name == "alice"
    assert config.consolidation.max_source_share == 0.25 and config.consolidation.uncapped_sources == ["alice"]
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            AgentConfig.load(env={"S2AGENT_CONSOLIDATION__MAX_SOURCE_SHARE": bad})


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                ("10.0.0.5", False), ("example.org", False)])
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_network_address_without_keys_is_refused_unless_allowed() -> None:
    none = KeyRing.load(ServerConfig())
    check_exposure("127.0.0.1", none, allow_unauthenticated=False)
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0 without API keys"):
        check_exposure("0.0.0.0", none, allow_unauthenticated=False)
    check_exposure("0.0.0.0", none, allow_unauthenticated=True)
    check_exposure("0.0.0.0", KeyRing.load(ServerConfig(api_key="k")), allow_unauthenticated=False)
    with pytest.raises(ConfigError):  # the admin token opens /admin only: /v1 would still be open
        check_exposure("0.0.0.0", KeyRing.load(ServerConfig(admin_token="t")), allow_unauthenticated=False)
