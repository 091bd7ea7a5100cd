"""AgentConfig: defaults < TOML < S2AGENT_* environment < overrides, with types, allowed values, ranges and
prompt templates checked at every step (and in code), every field documented."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest

import agent.config
from agent.config import AgentConfig, ConfigError, Interval, default_data_dir, within
from policies.answers import AnswerKind
from policies.routing import ROUTERS
from policies.system2 import METHODS


def write_toml(folder: Path, text: str) -> Path:
    path = folder / "agent.toml"
    path.write_text(text)
    return path


# --- defaults ------------------------------------------------------------------------------------
def test_defaults_load_and_validate() -> None:
    config = AgentConfig.load(env={})
    assert config == AgentConfig()
    assert config.validate() is config


def test_default_instances_do_not_share_mutable_fields() -> None:
    a, b = AgentConfig(), AgentConfig()
    a.consolidation.target_modules.append("lm_head")
    a.system2.methods_by_tag["math"] = "pal"
    assert "lm_head" not in b.consolidation.target_modules
    assert b.system2.methods_by_tag == {}


def test_to_dict_loads_back_to_the_same_config() -> None:
    config = AgentConfig.load(env={}, overrides={"routing.threshold": 0.3, "system2.methods_by_tag": {"a": "pal"},
                                                 "scheduler.min_pending": 8})
    data = config.to_dict()
    assert AgentConfig.load(env={}, overrides=data) == config


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
user = "Q: {query}"
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
    assert config.system2.prompts == {"cot": {"user": "Q: {query}"}}
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


# --- allowed values and ranges, from every source --------------------------------------------------
def set_from(source: str, key: str, value: object, tmp_path: Path) -> AgentConfig:
    """Set ``key`` to ``value`` from a TOML file, the environment, a CLI-style override or code."""
    *section, name = key.split(".")
    if source == "toml":
        header = f"[{section[0]}]\n" if section else ""
        return AgentConfig.load(write_toml(tmp_path, f"{header}{name} = {json.dumps(value)}\n"), env={})
    if source == "env":
        raw = value if isinstance(value, str) else json.dumps(value)
        return AgentConfig.load(env={"S2AGENT_" + key.upper().replace(".", "__"): raw})
    if source == "override":
        return AgentConfig.load(env={}, overrides={key: value})
    if section:  # code: the section's own constructor
        cls = typing.get_type_hints(AgentConfig)[section[0]]
        return AgentConfig(**{section[0]: cls(**{name: value})})
    return AgentConfig(**{name: value})


SOURCES = ["toml", "env", "override", "code"]

ENUMERATED = [
    ("backend", "vlm", "hf, vllm"),
    ("answer_kind", "numbr", "text, yesno, number, choice, verdict"),
    ("routing.router", "thresh", "threshold, always, never"),
    ("routing.estimator", "logprobz", "logprob, agreement"),
    ("consolidation.bf16", "yes", "auto, on, off"),  # used to mean "off", silently
    ("system2.method", "tot", ", ".join(agent.config.METHOD_NAMES)),  # each method, and each on the teacher
]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("key, typo, allowed", ENUMERATED)
def test_enumerated_fields_refuse_a_typo_naming_key_and_allowed_values(tmp_path: Path, source: str, key: str,
                                                                       typo: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        set_from(source, key, typo, tmp_path)
    message = str(info.value)
    assert f"{key!r}" in message and f"must be one of {allowed}; got {typo!r}" in message
    assert {"toml": str(tmp_path / "agent.toml"), "env": "S2AGENT_", "override": "option", "code": "code"}[source] \
        in message


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("key, mapping, allowed", [
    ("kinds_by_tag", {"arithmetic": "number", "math": "nmber"}, "text, yesno, number, choice, verdict"),
    ("system2.methods_by_tag", {"arithmetic": "pal", "math": "pall"}, ", ".join(agent.config.METHOD_NAMES)),
])
def test_per_tag_tables_refuse_an_unknown_value(tmp_path: Path, source: str, key: str, mapping: dict,
                                                allowed: str) -> None:
    *section, name = key.split(".")
    table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in mapping.items())
    path = write_toml(tmp_path, (f"[{section[0]}]\n" if section else "") + f"{name} = {{ {table} }}\n")
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(path, env={}) if source == "toml" else set_from(source, key, mapping, tmp_path)
    assert f"{key!r}" in str(info.value) and f"'math' = {mapping['math']!r} is not one of {allowed}" in str(info.value)


def test_enumerations_are_the_runtime_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    hints = typing.get_type_hints(agent.config.RoutingConfig)
    assert typing.get_args(hints["router"]) == tuple(ROUTERS)
    assert typing.get_type_hints(AgentConfig)["answer_kind"] is AnswerKind
    with pytest.raises(ConfigError):
        AgentConfig.load(env={}, overrides={"system2.method": "arith"})
    monkeypatch.setitem(METHODS, "arith", object)  # a method registered the documented way is a valid name
    assert AgentConfig.load(env={}, overrides={"system2.method": "arith"}).system2.method == "arith"


OUT_OF_RANGE = [
    ("routing.threshold", 1.5, "[0, 1]"),
    ("routing.quantile", -0.1, "[0, 1]"),
    ("routing.agreement_samples", 0, "[1, inf)"),
    ("system2.samples", 0, "[1, inf)"),
    ("system2.agreement_threshold", 2, "[0, 1]"),
    ("system2.temperature", -0.5, "[0, inf)"),
    ("system2.timeout_s", 0, "(0, inf)"),
    ("system2.max_new_tokens", 0, "[1, inf)"),
    ("consolidation.holdout_fraction", 1.0, "[0, 1)"),
    ("consolidation.learning_rate", 0, "(0, inf)"),
    ("consolidation.epochs", 0, "[1, inf)"),
    ("consolidation.dropout", 1, "[0, 1)"),
    ("scoping.min_similarity", 1.2, "[0, 1]"),
    ("scheduler.interval_minutes", -1, "[0, 525600]"),
    ("scheduler.interval_minutes", 1e308, "[0, 525600]"),  # past a year the scheduler's clock overflows
    ("server.max_prompts", 0, "[1, inf)"),
    ("server.read_timeout_s", 0, "(0, 3600]"),
    ("scheduler.check_seconds", -1, "(0, inf)"),
    ("server.port", 0, "[1, 65535]"),
    ("server.port", 65536, "[1, 65535]"),
    ("max_batch", 0, "[1, inf)"),
    ("threads", 0, "[1, inf)"),
]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("key, value, interval", OUT_OF_RANGE)
def test_values_out_of_range_are_refused(tmp_path: Path, source: str, key: str, value: float,
                                         interval: str) -> None:
    with pytest.raises(ConfigError) as info:
        set_from(source, key, value, tmp_path)
    assert f"{key!r}" in str(info.value) and f"must be in {interval}; got" in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("routing.threshold", 0), ("routing.threshold", 1), ("consolidation.holdout_fraction", 0),
    ("system2.temperature", 0), ("server.port", 1), ("server.port", 65535), ("scheduler.interval_minutes", 0),
])
def test_bounds_that_mean_something_are_accepted(tmp_path: Path, key: str, value: object) -> None:
    for source in SOURCES:
        if value is None and source == "toml":
            continue  # TOML has no null; an unset key keeps the default
        target: object = set_from(source, key, value, tmp_path)
        for part in key.split("."):
            target = getattr(target, part)
        assert target == value


@pytest.mark.parametrize("raw", ["nan", "inf"])
def test_env_nan_and_infinity_are_not_in_range(raw: str) -> None:
    with pytest.raises(ConfigError, match="routing.threshold"):
        AgentConfig.load(env={"S2AGENT_ROUTING__THRESHOLD": raw})


def test_a_non_number_in_a_ranged_field_built_in_code() -> None:
    with pytest.raises(ConfigError, match=r"'routing.threshold' \(from code\) must be a number in \[0, 1\]"):
        agent.config.RoutingConfig(threshold="high")


def test_values_assigned_after_construction_are_caught_by_validate(tmp_path: Path) -> None:
    from agent import Agent

    config = AgentConfig(db=str(tmp_path / "agent.db"), model=str(tmp_path / "no-model"))
    config.routing.threshold = 1.01
    with pytest.raises(ConfigError, match=r"'routing.threshold' \(from code\) must be in \[0, 1\]"):
        config.validate()
    with pytest.raises(ConfigError, match="routing.threshold"):
        Agent(config)  # before it opens the store or looks for the model
    assert not (tmp_path / "agent.db").exists()


def test_intervals() -> None:
    assert 0 in Interval("[0, 1)") and 1 not in Interval("[0, 1)") and 0 not in Interval("(0, inf)")
    assert 65535 in Interval("[1, 65535]") and float("inf") not in Interval("(0, inf)")
    with pytest.raises(ValueError, match="not an interval"):
        within("0..1", 0.5)  # a class using a malformed interval fails when it is defined


# --- prompt templates ------------------------------------------------------------------------------
def test_a_bad_placeholder_in_a_template_override_names_the_template(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[system2.prompts.cot]\nuser = "Q: {question}"\n')
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(path, env={})
    message = str(info.value)
    assert "'system2.prompts.cot.user'" in message and str(path) in message
    assert "{question}" in message and "{query}" in message


@pytest.mark.parametrize("prompts, key, words", [
    ({"cot": {"usr": "{query}"}}, "system2.prompts.cot.usr", "not a template of cot; its templates: system, user"),
    ({"tot": {"user": "{query}"}}, "system2.prompts.tot", "not a System 2 method with prompt templates"),
    ({"bsm": {"merge": "{judgments}"}}, "system2.prompts.bsm.merge", "{judgments}, which it is not given"),
])
def test_template_names_are_checked_from_every_source(tmp_path: Path, prompts: dict, key: str, words: str) -> None:
    for load in (lambda: AgentConfig.load(env={"S2AGENT_SYSTEM2__PROMPTS": json.dumps(prompts)}),
                 lambda: AgentConfig.load(env={}, overrides={"system2.prompts": prompts}),
                 lambda: agent.config.System2Config(prompts=prompts)):
        with pytest.raises(ConfigError) as info:
            load()
        assert repr(key) in str(info.value) and words in str(info.value)


def test_good_template_overrides_load(tmp_path: Path) -> None:
    path = write_toml(tmp_path, """
[system2.prompts.cot]
user = 'Q: {query} Reply as JSON: {{"answer": "..."}}'
[system2.prompts.rar]
respond = "{rephrased}"
""")
    assert AgentConfig.load(path, env={}).system2.prompts["rar"] == {"respond": "{rephrased}"}


# --- every field is documented where it is defined -------------------------------------------------
def test_every_config_field_has_a_docstring() -> None:
    tree = ast.parse(inspect.getsource(agent.config))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    sections = [AgentConfig, *(cls for cls in typing.get_type_hints(AgentConfig).values()
                               if dataclasses.is_dataclass(cls))]
    undocumented = []
    for cls in sections:
        body = classes[cls.__name__].body
        for node, after in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign):
                documented = (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                              and isinstance(after.value.value, str) and after.value.value.strip())
                if not documented:
                    undocumented.append(f"{cls.__name__}.{node.target.id}")
        assert {n.target.id for n in body if isinstance(n, ast.AnnAssign)} == {f.name for f in dataclasses.fields(cls)}
    assert undocumented == []


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
