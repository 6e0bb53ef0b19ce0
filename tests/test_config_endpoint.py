"""parse_endpoint_config / render_endpoint_config: safe YAML, schema, defaults, shape."""

from __future__ import annotations

from typing import Any

import pytest

from mepcore.config import (
    DEFAULT_HEARTBEAT_PERIOD,
    DEFAULT_IDLE_HEARTBEATS_HARD,
    DEFAULT_IDLE_HEARTBEATS_SOFT,
    EndpointConfig,
    EngineConfig,
    MappedIdentity,
    parse_endpoint_config,
    render_endpoint_config,
)
from mepcore.errors import ConfigError
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
