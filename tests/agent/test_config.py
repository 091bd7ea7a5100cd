"""AgentConfig: defaults < TOML < S2AGENT_* environment < overrides, with types checked at every step."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError, default_data_dir


def write_toml(folder: Path, text: str) -> Path:
    path = folder / "agent.toml"
    path.write_text(text)
    return path


# --- defaults ------------------------------------------------------------------------------------
def test_defaults_without_any_source() -> None:
    config = AgentConfig.load(env={})
    assert config == AgentConfig()
    assert config.model == "default"
    assert config.backend == "hf"
    assert config.routing.threshold == 0.5
    assert config.routing.router == "threshold"
    assert config.system2.samples == 8
    assert config.system2.method == "cot"
    assert config.consolidation.min_examples == 16
    assert config.consolidation.target_modules[0] == "q_proj"
    assert config.scheduler.interval_minutes is None
    assert config.server.admin_token is None
    assert config.server.host == "127.0.0.1"


def test_default_instances_do_not_share_mutable_fields() -> None:
    a, b = AgentConfig(), AgentConfig()
    a.consolidation.target_modules.append("lm_head")
    a.system2.methods_by_tag["math"] = "pal"
    assert "lm_head" not in b.consolidation.target_modules
    assert b.system2.methods_by_tag == {}


def test_to_dict_round_trips_every_section() -> None:
    data = AgentConfig().to_dict()
    assert set(data) >= {"model", "routing", "system2", "consolidation", "scheduler", "server"}
    assert data["routing"]["threshold"] == 0.5
    assert data["consolidation"]["rank"] == 16


# --- precedence ----------------------------------------------------------------------------------
def test_toml_sets_fields_and_sections(tmp_path: Path) -> None:
    path = write_toml(tmp_path, """
model = "/models/tiny"
max_batch = 4
[routing]
threshold = 0.25
[system2]
methods_by_tag = { arithmetic = "pal" }
[system2.prompts.cot]
user = "Q: {question}"
[consolidation]
target_modules = ["q_proj", "v_proj"]
resume = true
""")
    config = AgentConfig.load(path, env={})
    assert config.model == "/models/tiny"
    assert config.max_batch == 4
    assert config.routing.threshold == 0.25
    assert config.routing.quantile == 0.1  # untouched fields keep their defaults
    assert config.system2.methods_by_tag == {"arithmetic": "pal"}
    assert config.system2.prompts == {"cot": {"user": "Q: {question}"}}
    assert config.consolidation.target_modules == ["q_proj", "v_proj"]
    assert config.consolidation.resume is True


def test_toml_below_env_below_overrides(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[routing]\nthreshold = 0.1\nquantile = 0.2\n[system2]\nsamples = 3\n")
    env = {"S2AGENT_ROUTING__THRESHOLD": "0.4", "S2AGENT_SYSTEM2__SAMPLES": "5"}

    assert AgentConfig.load(path, env={}).routing.threshold == 0.1
    config = AgentConfig.load(path, env=env)
    assert config.routing.threshold == 0.4
    assert config.system2.samples == 5
    assert config.routing.quantile == 0.2  # the TOML value the environment does not touch stays

    config = AgentConfig.load(path, env=env, overrides={"routing.threshold": 0.9, "model": None})
    assert config.routing.threshold == 0.9
    assert config.system2.samples == 5
    assert config.model == "default"  # a None override (an unset CLI flag) changes nothing


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S2AGENT_ROUTING__THRESHOLD", "0.35")
    assert AgentConfig.load().routing.threshold == 0.35


def test_override_may_be_a_whole_section() -> None:
    config = AgentConfig.load(env={}, overrides={"routing": {"router": "always", "threshold": 0.2}})
    assert config.routing.router == "always"
    assert config.routing.threshold == 0.2


# --- type coercion from strings --------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, raw, path, value",
    [
        ("S2AGENT_CONSOLIDATION__RESUME", "true", ("consolidation", "resume"), True),
        ("S2AGENT_CONSOLIDATION__RESUME", "YES", ("consolidation", "resume"), True),
        ("S2AGENT_CONSOLIDATION__PER_TAG", "0", ("consolidation", "per_tag"), False),
        ("S2AGENT_CONSOLIDATION__PER_TAG", "off", ("consolidation", "per_tag"), False),
        ("S2AGENT_MAX_BATCH", "4", ("max_batch",), 4),
        ("S2AGENT_BATCH_WAIT_MS", "2.5", ("batch_wait_ms",), 2.5),
        ("S2AGENT_ROUTING__THRESHOLD", "1", ("routing", "threshold"), 1.0),
        ("S2AGENT_SEED", "7", ("seed",), 7),
        ("S2AGENT_SEED", "none", ("seed",), None),
        ("S2AGENT_THREADS", "", ("threads",), None),
        ("S2AGENT_SCHEDULER__INTERVAL_MINUTES", "5", ("scheduler", "interval_minutes"), 5.0),
        ("S2AGENT_CONSOLIDATION__TARGET_MODULES", '["q_proj", "o_proj"]', ("consolidation", "target_modules"),
         ["q_proj", "o_proj"]),
        ("S2AGENT_SYSTEM2__METHODS_BY_TAG", '{"arithmetic": "pal"}', ("system2", "methods_by_tag"),
         {"arithmetic": "pal"}),
        ("S2AGENT_MODEL", "/models/x", ("model",), "/models/x"),
        ("S2AGENT_DB", "sqlite:////tmp/a.db", ("db",), "sqlite:////tmp/a.db"),
    ],
)
def test_env_strings_are_coerced(key: str, raw: str, path: tuple[str, ...], value: object) -> None:
    target: object = AgentConfig.load(env={key: raw})
    for part in path:
        target = getattr(target, part)
    assert target == value
    assert type(target) is type(value)


@pytest.mark.parametrize(
    "key, raw",
    [
        ("S2AGENT_MAX_BATCH", "lots"),
        ("S2AGENT_MAX_BATCH", "4.5"),
        ("S2AGENT_CONSOLIDATION__RESUME", "maybe"),
        ("S2AGENT_ROUTING__THRESHOLD", "high"),
        ("S2AGENT_CONSOLIDATION__TARGET_MODULES", "q_proj,v_proj"),  # lists come as JSON
        ("S2AGENT_CONSOLIDATION__TARGET_MODULES", '{"a": 1}'),
    ],
)
def test_bad_env_values_name_the_key_and_variable(key: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(env={key: raw})
    message = str(info.value)
    assert key in message  # the source: the environment variable
    assert key[len("S2AGENT_"):].lower().replace("__", ".") in message  # the dotted key
    assert "expects" in message and "got" in message


@pytest.mark.parametrize(
    "toml, key",
    [
        ('model = 3', "model"),
        ('max_batch = "many"', "max_batch"),
        ('threads = true', "threads"),  # a bool is not an int
        ('[routing]\nthreshold = "low"', "routing.threshold"),
        ('[consolidation]\ntarget_modules = "q_proj"', "consolidation.target_modules"),
        ('[consolidation]\nresume = "perhaps"', "consolidation.resume"),
    ],
)
def test_bad_toml_types_name_the_key_and_file(tmp_path: Path, toml: str, key: str) -> None:
    path = write_toml(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(path, env={})
    assert repr(key) in str(info.value)
    assert str(path) in str(info.value)


def test_toml_float_for_int_field_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max_batch = 4.7\n")
    with pytest.raises(ConfigError, match="max_batch"):
        AgentConfig.load(path, env={})


# --- unknown keys and sections -------------------------------------------------------------------
def test_unknown_toml_key_names_key_source_and_known_keys(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[routing]\nthreshhold = 0.3\n")
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(path, env={})
    message = str(info.value)
    assert "'routing.threshhold'" in message
    assert str(path) in message
    assert "threshold" in message.split("known here:")[1]


def test_unknown_toml_section(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[routng]\nthreshold = 0.3\n")
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(path, env={})
    assert "'routng'" in str(info.value)
    assert str(path) in str(info.value)


def test_section_given_as_a_scalar(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "routing = 0.3\n")
    with pytest.raises(ConfigError, match="'routing' must be a table"):
        AgentConfig.load(path, env={})


@pytest.mark.parametrize(
    "key, dotted",
    [
        ("S2AGENT_ROUTING__THRESHHOLD", "routing.threshhold"),
        ("S2AGENT_ROUTNG__THRESHOLD", "routng.threshold"),
        ("S2AGENT_ROUTING__THRESHOLD__X", "routing.threshold.x"),
        ("S2AGENT_FROBNICATE", "frobnicate"),
    ],
)
def test_unknown_env_keys_name_the_variable(key: str, dotted: str) -> None:
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(env={key: "1"})
    assert key in str(info.value)
    assert repr(dotted) in str(info.value)


def test_unknown_override_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"'routing.nope' \(from option routing.nope\)"):
        AgentConfig.load(env={}, overrides={"routing.nope": 1})


def test_non_config_variables_are_not_keys(tmp_path: Path) -> None:
    env = {"S2AGENT_HOME": str(tmp_path), "S2AGENT_CACHE_DIR": str(tmp_path), "PATH": "/bin", "HOME": "/x"}
    assert AgentConfig.load(env=env) == AgentConfig()


# --- files ---------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        AgentConfig.load(missing, env={})
    assert str(missing) in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[routing\nthreshold = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        AgentConfig.load(path, env={})
    assert str(path) in str(info.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- admin token ---------------------------------------------------------------------------------
def test_admin_token_from_env() -> None:
    assert AgentConfig.load(env={"S2AGENT_ADMIN_TOKEN": "s3cret"}).server.admin_token == "s3cret"
    assert AgentConfig.load(env={"S2AGENT_ADMIN_TOKEN": ""}).server.admin_token is None


def test_admin_token_env_beats_toml_and_loses_to_overrides(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[server]\nadmin_token = "from-file"\n')
    env = {"S2AGENT_ADMIN_TOKEN": "from-env"}
    assert AgentConfig.load(path, env={}).server.admin_token == "from-file"
    assert AgentConfig.load(path, env=env).server.admin_token == "from-env"
    assert AgentConfig.load(path, env=env, overrides={"server.admin_token": "flag"}).server.admin_token == "flag"


# --- paths ---------------------------------------------------------------------------------------
def test_db_and_adapters_default_under_s2agent_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("S2AGENT_HOME", str(tmp_path / "home"))
    config = AgentConfig()
    assert default_data_dir() == tmp_path / "home"
    assert config.db_url() == str(tmp_path / "home" / "agent.db")
    assert config.adapters_path() == (tmp_path / "home" / "adapters").resolve()


def test_data_dir_falls_back_to_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("S2AGENT_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "s2agent"
    assert AgentConfig().db_url() == str(tmp_path / "xdg" / "s2agent" / "agent.db")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_data_dir() == tmp_path / "user" / ".local" / "share" / "s2agent"


def test_adapters_sit_beside_the_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("S2AGENT_HOME", str(tmp_path / "home"))
    assert AgentConfig(db=str(tmp_path / "d" / "x.db")).adapters_path() == (tmp_path / "d" / "adapters").resolve()
    url = f"sqlite:///{tmp_path / 'e' / 'y.db'}"
    assert AgentConfig(db=url).adapters_path() == (tmp_path / "e" / "adapters").resolve()
    pg = AgentConfig(db="postgresql://user@localhost/agent")
    assert pg.db_url() == "postgresql://user@localhost/agent"
    assert pg.adapters_path() == tmp_path / "home" / "adapters"
    assert AgentConfig(db=url, adapters_dir=str(tmp_path / "own")).adapters_path() == tmp_path / "own"


def test_the_shipped_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "agent.toml"
    config = AgentConfig.load(example, env={})
    assert config.consolidation.per_tag and config.scoping.classifier
    assert config.system2.methods_by_tag["arithmetic"] == "pal"
