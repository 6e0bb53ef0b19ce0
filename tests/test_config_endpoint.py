"""parse_endpoint_config / render_endpoint_config: safe YAML, schema, defaults, shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mepcore.config import (
    DEFAULT_HEARTBEAT_PERIOD,
    DEFAULT_IDLE_HEARTBEATS_HARD,
    DEFAULT_IDLE_HEARTBEATS_SOFT,
    ENGINE_TYPES,
    LAUNCHER_TYPES,
    PROVIDER_TYPES,
    EndpointConfig,
    EngineConfig,
    MappedIdentity,
    endpoint_config_schema,
    parse_endpoint_config,
    render_endpoint_config,
)
from mepcore.config.keys import IGNORED_ENGINE_KEYS, IGNORED_KEYS
from mepcore.errors import ConfigError
from mepcore.tasks import engine_keys
from mepcore.types import Account

MAPPED = MappedIdentity(Account("bob", 1002, 1002, "/home/bob", "/bin/sh", (1002,), ("bob",)))

SLURM = """
display_name: Slurm
engine:
  type: GlobusComputeEngine
  max_workers_per_node: 4
  provider:
    type: SlurmProvider
    partition: compute
    account: proj
    walltime: "01:00:00"
    nodes_per_block: 2
    worker_init: module load python
    launcher:
      type: SrunLauncher
idle_heartbeats_soft: 3
idle_heartbeats_hard: 100
heartbeat_period: 15
endpoint_setup: echo setup
endpoint_teardown: null
allowed_functions: [a, b]
"""


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_endpoint_config(text)
    return info.value


def test_defaults_when_everything_is_omitted() -> None:
    for text in ("", "{}", "# nothing\n"):
        config = parse_endpoint_config(text)
        assert config == EndpointConfig()
        assert config.engine == EngineConfig("ProcessPoolEngine")
        assert config.heartbeat_period == DEFAULT_HEARTBEAT_PERIOD == 30.0
        assert config.idle_heartbeats_soft == DEFAULT_IDLE_HEARTBEATS_SOFT == 10
        assert config.idle_heartbeats_hard == DEFAULT_IDLE_HEARTBEATS_HARD == 5760
        assert config.allowed_functions is None
        assert config.display_name is None


def test_a_full_parsl_config() -> None:
    config = parse_endpoint_config(SLURM)
    assert config.engine.type == "GlobusComputeEngine"
    assert dict(config.engine.options) == {"max_workers_per_node": 4}
    assert config.engine.provider is not None
    assert config.engine.provider["partition"] == "compute"
    assert config.engine.to_dict() == {
        "type": "GlobusComputeEngine",
        "max_workers_per_node": 4,
        "provider": {
            "type": "SlurmProvider",
            "partition": "compute",
            "account": "proj",
            "walltime": "01:00:00",
            "nodes_per_block": 2,
            "worker_init": "module load python",
            "launcher": {"type": "SrunLauncher"},
        },
    }
    assert config.to_dict() == {
        "engine": config.engine.to_dict(),
        "idle_heartbeats_soft": 3,
        "idle_heartbeats_hard": 100,
        "heartbeat_period": 15.0,
        "endpoint_setup": "echo setup",
        "endpoint_teardown": None,
        "allowed_functions": ["a", "b"],
        "display_name": "Slurm",
    }
    assert config.allowed_functions == ("a", "b")


@pytest.mark.parametrize("engine", ["ThreadPoolEngine", "ProcessPoolEngine"])
def test_local_engines_take_max_workers(engine: str) -> None:
    config = parse_endpoint_config(f"engine: {{type: {engine}, max_workers: 3}}")
    assert config.engine.to_dict() == {"type": engine, "max_workers": 3}
    assert config.engine.provider is None


def test_unknown_top_level_keys_are_named() -> None:
    err = refused("engine: {type: ThreadPoolEngine}\nbogus: 1\nalso_bad: 2\n")
    assert err.reason == "config.endpoint_config_invalid"
    assert sorted(v.path for v in err.violations) == ["$.also_bad", "$.bogus"]
    assert all("unknown key" in v.message for v in err.violations)


def test_unknown_engine_provider_and_launcher_keys_are_named() -> None:
    err = refused(
        "engine:\n  type: GlobusComputeEngine\n  nonsense: 1\n"
        "  provider: {type: SlurmProvider, partitoin: x, launcher: {type: SrunLauncher, y: 1}}\n"
    )
    assert sorted(v.path for v in err.violations) == [
        "$.engine.nonsense",
        "$.engine.provider.launcher.y",
        "$.engine.provider.partitoin",
    ]


def test_provider_only_for_the_parsl_engine_and_types_are_checked() -> None:
    err = refused("engine: {type: ProcessPoolEngine, provider: {type: LocalProvider}}")
    assert [v.path for v in err.violations] == ["$.engine.provider"]
    err = refused("engine: {type: DaskEngine}")
    assert [v.path for v in err.violations] == ["$.engine.type"]
    err = refused("engine: {type: GlobusComputeEngine, provider: {type: EvilProvider}}")
    assert [v.path for v in err.violations] == ["$.engine.provider.type"]
    err = refused("engine: {max_workers: 2}")
    assert err.violations[0].path == "$.engine"


def test_every_violation_is_reported() -> None:
    err = refused(
        "engine: {type: ThreadPoolEngine, max_workers: 0}\nheartbeat_period: -1\n"
        "idle_heartbeats_soft: x\nallowed_functions: [a, a]\nx: 1\n"
    )
    assert sorted(v.path for v in err.violations) == [
        "$.allowed_functions",
        "$.engine.max_workers",
        "$.heartbeat_period",
        "$.idle_heartbeats_soft",
        "$.x",
    ]


def test_high_assurance_may_not_be_set() -> None:
    for value in ("true", "false"):
        err = refused(f"high_assurance: {value}\n")
        assert err.reason == "config.endpoint_config_invalid"
        assert [v.path for v in err.violations] == ["$.high_assurance"]
        assert "high_assurance" in err.violations[0].message


def test_duplicate_keys_are_refused_with_position() -> None:
    err = refused("engine:\n  type: ThreadPoolEngine\nengine:\n  type: ProcessPoolEngine\n")
    assert err.reason == "config.yaml_invalid"
    assert "duplicate key 'engine'" in err.detail
    assert err.violations[0].path == "line 3, column 1"
    nested = refused("engine:\n  type: ThreadPoolEngine\n  type: ProcessPoolEngine\n")
    assert nested.violations[0].path == "line 3, column 3"


def test_aliases_merge_keys_tags_and_broken_yaml_are_refused() -> None:
    assert refused("a: &x 1\nb: *x\n").reason == "config.yaml_invalid"
    assert refused("base: &b {x: 1}\nother:\n  <<: *b\n").reason == "config.yaml_invalid"
    assert refused("a: !!python/object/apply:os.system ['true']\n").reason == "config.yaml_invalid"
    assert refused("a: [1\n").reason == "config.yaml_invalid"
    assert refused("- a\n- b\n").reason == "config.endpoint_config_invalid"


def _render(template: str, variables: dict[str, Any]) -> EndpointConfig:
    return render_endpoint_config(template, variables, mapped=MAPPED)


def test_render_endpoint_config_end_to_end_with_hostile_values() -> None:
    template = (
        "engine:\n  type: GlobusComputeEngine\n  provider:\n    type: SlurmProvider\n"
        "    partition: {{ partition }}\n    worker_init: {{ init }}\n"
    )
    config = _render(template, {"partition": "a\nhigh_assurance: true", "init": 'x"\n  y: "z'})
    assert config.engine.provider is not None
    assert config.engine.provider["partition"] == "a\nhigh_assurance: true"
    assert config.engine.provider["worker_init"] == 'x"\n  y: "z'


def test_high_assurance_written_by_a_template_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        _render("high_assurance: {{ flag }}\n", {"flag": False})
    assert info.value.violations[0].path == "$.high_assurance"


def test_duplicate_keys_produced_by_rendering_are_refused() -> None:
    template = (
        "engine: {type: ThreadPoolEngine}\n{% for i in range(2) %}display_name: x\n{% endfor %}"
    )
    with pytest.raises(ConfigError) as info:
        _render(template, {})
    assert info.value.reason == "config.yaml_invalid"


# -- one truth: the schema's keys are what the engines honour at start -----------------


def _engine_schemas() -> dict[str, dict[str, Any]]:
    schema = endpoint_config_schema()
    return {
        rule["if"]["properties"]["type"]["const"]: rule["then"]
        for rule in schema["properties"]["engine"]["allOf"]
    }


def _typed(table_schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        rule["if"]["properties"]["type"]["const"]: rule["then"]["properties"]
        for rule in table_schema["allOf"]
    }


@pytest.mark.parametrize("engine", ENGINE_TYPES)
def test_schema_engine_keys_are_exactly_what_the_engine_honours(engine: str) -> None:
    schema_keys = set(_engine_schemas()[engine]["properties"])
    ignored = set(IGNORED_ENGINE_KEYS.get(engine, {}))
    assert ignored <= schema_keys
    # Honoured at start = accepted by the schema and not ignored; nothing both ways.
    assert schema_keys - ignored == set(engine_keys(engine))
    assert not ignored & set(engine_keys(engine))


def test_provider_and_launcher_keys_are_the_parsl_constructors() -> None:
    import inspect

    from mepcore.tasks import parsl_build

    provider_schemas = _typed(_engine_schemas()["GlobusComputeEngine"]["properties"]["provider"])
    assert set(provider_schemas) == set(parsl_build.PROVIDER_TYPES) == set(PROVIDER_TYPES)
    for name, cls in parsl_build.provider_classes().items():
        assert set(provider_schemas[name]) - {"type"} == set(inspect.signature(cls).parameters)
    assert provider_schemas["SlurmProvider"]["launcher"] == {"$ref": "#/$defs/launcher"}
    launcher_schemas = _typed(endpoint_config_schema()["$defs"]["launcher"])
    assert set(launcher_schemas) == set(parsl_build.LAUNCHER_TYPES) == set(LAUNCHER_TYPES)
    for name, cls in parsl_build.launcher_classes().items():
        assert set(launcher_schemas[name]) - {"type"} == set(inspect.signature(cls).parameters)


def _sample(schema: dict[str, Any]) -> Any:
    """A value the schema accepts (the smallest one it names)."""
    if "enum" in schema:
        return schema["enum"][0]
    if "oneOf" in schema:
        return _sample(schema["oneOf"][0])
    kind = schema.get("type")
    if kind == "string":
        return "00:10:00" if "pattern" in schema else "x"
    if kind == "integer":
        return max(schema.get("minimum", 1), 1)
    if kind == "number":
        return 0.5 if schema.get("maximum", 2) <= 1 else 2.5
    if kind == "boolean":
        return False
    if kind == "array":
        return [_sample(schema["items"])] * schema.get("minItems", 1)
    if kind == "object":
        return {}
    raise AssertionError(f"no sample for {schema}")


def test_every_value_the_schema_accepts_for_a_provider_or_launcher_starts() -> None:
    # Value by value: what passes render is accepted by the constructors at start.
    from mepcore.tasks.parsl_build import build_provider

    provider_schemas = _typed(_engine_schemas()["GlobusComputeEngine"]["properties"]["provider"])
    for name, keys in provider_schemas.items():
        for key, schema in keys.items():
            if key in ("type", "launcher"):
                continue
            doc = {"type": name, key: _sample(schema)}
            if (name, key) == ("LSFProvider", "request_by_nodes"):
                with pytest.raises(ConfigError):  # needs both core counts, as Parsl says
                    parse_endpoint_config(
                        json.dumps({"engine": {"type": "GlobusComputeEngine", "provider": doc}})
                    )
                doc.update(cores_per_block=4, cores_per_node=2)
            parse_endpoint_config(
                json.dumps({"engine": {"type": "GlobusComputeEngine", "provider": doc}})
            )
            build_provider(doc)
    for name, keys in _typed(endpoint_config_schema()["$defs"]["launcher"]).items():
        for key, schema in keys.items():
            if key == "type":
                continue
            doc = {"type": "LocalProvider", "launcher": {"type": name, key: _sample(schema)}}
            build_provider(doc)


def test_every_engine_value_the_schema_accepts_starts() -> None:
    from parsl.executors import HighThroughputExecutor

    from mepcore.tasks import ExecutorLimits, build_engine

    schemas = _engine_schemas()
    for engine, schema in schemas.items():
        ignored = IGNORED_ENGINE_KEYS.get(engine, {})
        for key, sub in schema["properties"].items():
            if key in ("type", "provider") or key in ignored:
                continue
            # One rule between keys the engine checks at start: the threshold must be
            # longer than the heartbeat period (5 s by default).
            doc = {"type": engine, key: 60 if key == "heartbeat_threshold" else _sample(sub)}
            parse_endpoint_config(json.dumps({"engine": doc}))
            built = build_engine(doc, ExecutorLimits())
            if engine == "GlobusComputeEngine":
                options: dict[str, Any] = dict(built.options)  # type: ignore[attr-defined]
                HighThroughputExecutor(provider=built.provider, **options)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("engine", "key"),
    [(engine, key) for engine, keys in IGNORED_ENGINE_KEYS.items() for key in keys],
)
def test_globus_compute_engine_keys_mep_cannot_honour_are_accepted_with_a_warning(
    engine: str, key: str
) -> None:
    config = parse_endpoint_config(json.dumps({"engine": {"type": engine, key: "anything"}}))
    assert key not in config.engine.to_dict()
    [warning] = config.warnings
    assert warning.path == f"$.engine.{key}"
    assert warning.message == f"accepted and ignored: {IGNORED_ENGINE_KEYS[engine][key]}"


@pytest.mark.parametrize("key", sorted(IGNORED_KEYS))
def test_top_level_keys_mep_cannot_honour_are_accepted_with_a_warning(key: str) -> None:
    config = parse_endpoint_config(json.dumps({key: 5671}))
    assert [(w.path, w.code) for w in config.warnings] == [(f"$.{key}", "ignored_key")]
    assert key not in config.to_dict()


def test_nulls_in_engine_provider_and_launcher_mean_not_given() -> None:
    config = parse_endpoint_config(
        "engine: {type: GlobusComputeEngine, max_workers_per_node: null,"
        " provider: {type: SlurmProvider, partition: null, launcher: {type: SrunLauncher,"
        " overrides: null}}}"
    )
    assert config.engine.to_dict() == {
        "type": "GlobusComputeEngine",
        "provider": {"type": "SlurmProvider", "launcher": {"type": "SrunLauncher"}},
    }


def test_a_globus_function_uuid_in_allowed_functions_is_warned_about() -> None:
    config = parse_endpoint_config(
        "allowed_functions: [0b6a3c6e-1111-2222-3333-444455556666, " + "a" * 64 + "]"
    )
    assert [w.path for w in config.warnings] == ["$.allowed_functions[0]"]
    assert config.allowed_functions is not None and len(config.allowed_functions) == 2


def test_keys_the_engines_cannot_honour_are_refused_at_render() -> None:
    # Once passed the schema and refused at start; now refused at render.
    for engine in (
        "engine: {type: GlobusComputeEngine, max_workers: 2}",
        "engine: {type: ThreadPoolEngine, prefetch: 2}",
        "engine: {type: GlobusComputeEngine, provider: {type: SlurmProvider, queue: q}}",
        "engine: {type: GlobusComputeEngine, executor: {}}",
    ):
        assert refused(engine).reason == "config.endpoint_config_invalid", engine
    # Once refused at render though the engine honours them.
    for key, value in (
        ("address", "10.0.0.1"),
        ("worker_port_range", [50000, 50100]),
        ("interchange_port_range", [51000, 51100]),
        ("poll_period", 10),
        ("cpu_affinity", "block"),
        ("drain_period", 60),
        ("encrypted", False),
        ("run_dir", "/scratch/x"),
    ):
        parse_endpoint_config(json.dumps({"engine": {"type": "GlobusComputeEngine", key: value}}))


def test_the_endpoint_config_schema_is_a_valid_schema() -> None:
    # parse_endpoint_config does not re-check its own schema at every parse.
    from mepcore.config.variables import schema_validator

    schema_validator(endpoint_config_schema(), source="endpoint-config schema")
