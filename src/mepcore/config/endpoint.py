"""The endpoint configuration a template produces: its schema and its frozen form.

``parse_endpoint_config`` loads the rendered YAML safely (duplicate keys and aliases
refused), validates it against the project's endpoint-config JSON Schema (unknown keys
are errors that name the key; ``high_assurance`` may not come from a template), fills
in documented defaults and returns an ``EndpointConfig``. The schema's keys are what the
engines honour (``keys``: one truth, tested against ``mepcore.tasks``), plus the
Globus Compute keys mep accepts and ignores, which are dropped with a warning
(``EndpointConfig.warnings``); ``null`` engine, provider and launcher values mean "not
given", as there. It deliberately does not
build engines or providers: ``mepcore.tasks`` consumes ``EngineConfig.to_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

from mepcore.config.keys import (
    DEFAULT_TEMPLATE_NAME,
    IGNORED_ENGINE_KEYS,
    IGNORED_KEYS,
    LAUNCHER_KEYS,
    PROVIDER_KEYS,
    drop_ignored,
    ignored_properties,
    launcher_schema,
    provider_schema,
    without_nulls,
)
from mepcore.config.limits import RenderLimits, VariableLimits
from mepcore.config.quickcheck import certainly_valid
from mepcore.config.variables import MAX_VIOLATIONS, schema_violations
from mepcore.errors import ConfigError, Violation
from mepcore.types import thaw

if TYPE_CHECKING:
    from mepcore.config.render import MappedIdentity

# jinja2 (mepcore.config.render) and yaml (mepcore.config.yamlsafe) are imported by the
# functions that render and parse: a configuration rendered before and handed back
# (``EndpointConfig.from_mapping``) needs neither, and a user endpoint starts faster.

ENGINE_TYPES = ("ThreadPoolEngine", "ProcessPoolEngine", "GlobusComputeEngine", "GlobusMPIEngine")
PROVIDER_TYPES = tuple(PROVIDER_KEYS)
LAUNCHER_TYPES = tuple(LAUNCHER_KEYS)

DEFAULT_ENGINE_TYPE = "ProcessPoolEngine"
DEFAULT_HEARTBEAT_PERIOD = 30.0
DEFAULT_IDLE_HEARTBEATS_SOFT = 10
DEFAULT_IDLE_HEARTBEATS_HARD = 5760

_STRING = {"type": "string", "maxLength": 65_536}
_NAME = {"type": "string", "minLength": 1, "maxLength": 256}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 100_000}
_POSITIVE = {"type": "integer", "minimum": 1, "maximum": 100_000}
_WALLTIME = {"type": "string", "pattern": r"^([0-9]+-)?[0-9]{1,3}(:[0-5][0-9]){0,2}$"}


_PORT = {"type": "integer", "minimum": 1, "maximum": 65_535}
_PORT_RANGE = {"type": "array", "items": _PORT, "minItems": 2, "maxItems": 2}


def _engine_schema(engine_type: str, options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "type": {"const": engine_type},
            **options,
            **ignored_properties(IGNORED_ENGINE_KEYS.get(engine_type, {})),
        },
        "additionalProperties": False,
    }


# GlobusComputeEngine options the MPI engine does not take: its workers claim no share of
# a node's cores, memory or accelerators (one worker runs one MPI application).
_NOT_MPI_OPTIONS = (
    "max_workers_per_node",
    "cores_per_worker",
    "mem_per_worker",
    "available_accelerators",
    "cpu_affinity",
)


def _mpi_engine_schema(htex: Mapping[str, Any]) -> dict[str, Any]:
    """``GlobusMPIEngine``: Parsl's MPI mode (``mepcore.tasks.parsl_mpi``)."""
    options = {
        k: v
        for k, v in htex["properties"].items()
        if k not in ("type", *_NOT_MPI_OPTIONS)
        and k not in IGNORED_ENGINE_KEYS["GlobusComputeEngine"]
    }
    options["max_workers_per_block"] = {"type": "integer", "minimum": 1, "maximum": 4096}
    options["mpi_launcher"] = {"enum": ["mpiexec", "srun", "aprun"]}
    return _engine_schema("GlobusMPIEngine", options)


def endpoint_config_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a rendered endpoint config (a fresh copy each call)."""
    max_workers = {"max_workers": {"type": "integer", "minimum": 1, "maximum": 4096}}
    engines = {
        "ThreadPoolEngine": _engine_schema("ThreadPoolEngine", max_workers),
        "ProcessPoolEngine": _engine_schema(
            "ProcessPoolEngine", {**max_workers, "prefetch": {"type": "integer", "minimum": 1}}
        ),
        "GlobusComputeEngine": _engine_schema("GlobusComputeEngine", _gc_engine_properties()),
    }
    engines["GlobusMPIEngine"] = _mpi_engine_schema(engines["GlobusComputeEngine"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mep endpoint configuration",
        "$defs": {"launcher": launcher_schema()},
        "type": "object",
        "properties": {
            "display_name": _NAME,
            "engine": _engine_choice(engines),
            "heartbeat_period": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            "idle_heartbeats_soft": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
            "idle_heartbeats_hard": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
            "endpoint_setup": {"type": ["string", "null"], "maxLength": 65_536},
            "endpoint_teardown": {"type": ["string", "null"], "maxLength": 65_536},
            "allowed_functions": {
                "type": ["array", "null"],
                "items": _NAME,
                "maxItems": 10_000,
                "uniqueItems": True,
            },
            **ignored_properties(IGNORED_KEYS),
        },
        "additionalProperties": False,
    }


def _gc_engine_properties() -> dict[str, Any]:
    """GlobusComputeEngine's keys; its provider's and launcher's are those of their Parsl
    constructors (``keys``)."""
    return {
        "max_workers_per_node": {"type": "integer", "minimum": 1, "maximum": 4096},
        "cores_per_worker": {"type": "number", "exclusiveMinimum": 0},
        "mem_per_worker": {"type": "number", "exclusiveMinimum": 0},
        "available_accelerators": {
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": 1024},
                {"type": "array", "items": _NAME, "maxItems": 1024},
            ]
        },
        "prefetch_capacity": _COUNT,
        "heartbeat_period": {"type": "integer", "minimum": 1, "maximum": 3600},
        "heartbeat_threshold": {"type": "integer", "minimum": 1, "maximum": 86_400},
        "max_idletime": {"type": "number", "minimum": 0, "maximum": 86_400},
        # Parsl's scaling strategy (run inside the engine) and its poller's options
        "strategy": {"enum": ["simple", "htex_auto_scale", "none"]},
        "job_status_kwargs": {
            "type": "object",
            "properties": {
                "strategy": {"enum": ["simple", "htex_auto_scale", "none"]},
                "max_idletime": {"type": "number", "minimum": 0, "maximum": 86_400},
                "strategy_period": {
                    "type": "number",
                    "minimum": 0.1,
                    "maximum": 86_400,
                },
            },
            "additionalProperties": False,
        },
        "max_retries_on_system_failure": {"type": "integer", "minimum": 0, "maximum": 100},
        # where the interchange listens for workers; where run directories go
        "address": _NAME,
        "run_dir": {"type": "string", "minLength": 1, "maxLength": 4096},
        "worker_debug": {"type": "boolean"},
        # HighThroughputExecutor's own options, passed on as they are
        "worker_port_range": _PORT_RANGE,
        "interchange_port_range": _PORT_RANGE,
        "poll_period": {"type": "integer", "minimum": 1, "maximum": 60_000},
        "cpu_affinity": _NAME,
        "drain_period": {"type": "integer", "minimum": 1},
        "encrypted": {"type": "boolean"},
        "provider": provider_schema(),
    }


def _engine_choice(engines: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """``engine``: one of ``ENGINE_TYPES``, checked against that type's own schema."""
    return {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": list(ENGINE_TYPES)}},
        "allOf": [
            {"if": {"properties": {"type": {"const": name}}, "required": ["type"]}, "then": schema}
            for name, schema in engines.items()
        ],
    }


def _freeze(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


def _freeze_optional(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if value is None else MappingProxyType(dict(value))


@attrs.frozen
class EngineConfig:
    """Which engine runs tasks, its options, and (Parsl engine) the provider."""

    type: str
    options: Mapping[str, Any] = attrs.field(converter=_freeze, factory=dict)
    provider: Mapping[str, Any] | None = attrs.field(converter=_freeze_optional, default=None)

    def to_dict(self) -> dict[str, Any]:
        """``{"type": …, **options, "provider": {"type": …, …}}`` as plain JSON data."""
        out: dict[str, Any] = {"type": self.type, **thaw(self.options)}
        if self.provider is not None:
            out["provider"] = thaw(self.provider)
        return out


def _str_tuple(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _violations(value: Any) -> tuple[Violation, ...]:
    return tuple(value)


def _schema_violations(data: Mapping[str, Any], limit: int) -> list[Violation]:
    """What jsonschema finds wrong with ``data`` (the project's own schema, whose validity
    is a test, so no re-check per parse). A document ``certainly_valid`` vouches for has
    nothing to find, and jsonschema is not even imported: a user endpoint starts faster
    and smaller (docs/performance.md); every other document gets jsonschema's report."""
    schema = endpoint_config_schema()
    if certainly_valid(schema, data):
        return []
    import jsonschema

    return schema_violations(jsonschema.Draft202012Validator(schema), data, limit=limit)


@attrs.frozen
class EndpointConfig:
    """A validated user endpoint configuration, with defaults filled in."""

    engine: EngineConfig = attrs.field(factory=lambda: EngineConfig(DEFAULT_ENGINE_TYPE))
    idle_heartbeats_soft: int = DEFAULT_IDLE_HEARTBEATS_SOFT
    idle_heartbeats_hard: int = DEFAULT_IDLE_HEARTBEATS_HARD
    heartbeat_period: float = DEFAULT_HEARTBEAT_PERIOD
    endpoint_setup: str | None = None
    endpoint_teardown: str | None = None
    allowed_functions: tuple[str, ...] | None = attrs.field(converter=_str_tuple, default=None)
    display_name: str | None = None
    # What was accepted and ignored (Globus Compute keys mep cannot honour): not config.
    warnings: tuple[Violation, ...] = attrs.field(converter=_violations, default=(), eq=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine.to_dict(),
            "idle_heartbeats_soft": self.idle_heartbeats_soft,
            "idle_heartbeats_hard": self.idle_heartbeats_hard,
            "heartbeat_period": self.heartbeat_period,
            "endpoint_setup": self.endpoint_setup,
            "endpoint_teardown": self.endpoint_teardown,
            "allowed_functions": (
                None if self.allowed_functions is None else list(self.allowed_functions)
            ),
            "display_name": self.display_name,
        }

    def to_document(self) -> dict[str, Any]:
        """``to_dict`` without the keys left unset: a document ``from_mapping`` reads
        back as an equal configuration (the schema has no nulls for those keys)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    @classmethod
    def from_mapping(cls, data: Any, *, max_violations: int = MAX_VIOLATIONS) -> EndpointConfig:
        """Validate a loaded document (see ``parse_endpoint_config``) and convert it; a
        refusal reports at most ``max_violations`` problems."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                "config.endpoint_config_invalid",
                "the endpoint configuration must be a mapping",
                violations=[Violation("$", "must be a mapping", "type")],
            )
        found: list[Violation] = []
        if "high_assurance" in data:
            found.append(
                Violation(
                    "$.high_assurance",
                    "high_assurance may not be set by a template",
                    "forbidden_key",
                )
            )
            data = {k: v for k, v in data.items() if k != "high_assurance"}
        non_string = [k for k in data if not isinstance(k, str)]
        for key in non_string:
            found.append(Violation("$", f"key {key!r} is not a string", "type"))
        if not non_string:
            data = without_nulls(data)
            found.extend(_schema_violations(data, max_violations))
        if found:
            raise ConfigError(
                "config.endpoint_config_invalid",
                f"{len(found)} problem(s), first {found[0].path}: {found[0].message}",
                violations=found[:max_violations],
            )
        data, warnings = drop_ignored(data)
        engine_data = dict(data.get("engine") or {"type": DEFAULT_ENGINE_TYPE})
        engine_type = engine_data.pop("type")
        provider = engine_data.pop("provider", None)
        return cls(
            engine=EngineConfig(type=engine_type, options=engine_data, provider=provider),
            idle_heartbeats_soft=data.get("idle_heartbeats_soft", DEFAULT_IDLE_HEARTBEATS_SOFT),
            idle_heartbeats_hard=data.get("idle_heartbeats_hard", DEFAULT_IDLE_HEARTBEATS_HARD),
            heartbeat_period=float(data.get("heartbeat_period", DEFAULT_HEARTBEAT_PERIOD)),
            endpoint_setup=data.get("endpoint_setup"),
            endpoint_teardown=data.get("endpoint_teardown"),
            allowed_functions=data.get("allowed_functions"),
            display_name=data.get("display_name"),
            warnings=warnings,
        )


def parse_endpoint_config(
    yaml_text: str, *, max_violations: int = MAX_VIOLATIONS
) -> EndpointConfig:
    """Load rendered YAML and validate it; ``ConfigError`` with reason
    ``config.yaml_invalid`` or ``config.endpoint_config_invalid`` (every violation, up
    to ``max_violations``)."""
    from mepcore.config.yamlsafe import YamlLoadError, load_yaml

    try:
        data = load_yaml(yaml_text)
    except YamlLoadError as exc:
        where = f"line {exc.line}, column {exc.column}" if exc.line else "$"
        raise ConfigError(
            "config.yaml_invalid",
            str(exc),
            violations=[Violation(where, exc.message, "yaml")],
        ) from exc
    return EndpointConfig.from_mapping(data, max_violations=max_violations)


def render_endpoint_config(
    template_text: str,
    variables: Mapping[str, Any],
    *,
    mapped: MappedIdentity,
    user_runtime: Mapping[str, Any] | None = None,
    includes: Mapping[str, str] | None = None,
    limits: RenderLimits = RenderLimits(),  # noqa: B008 - frozen, so sharing is safe
    template_name: str = DEFAULT_TEMPLATE_NAME,
    variable_limits: VariableLimits = VariableLimits(),  # noqa: B008
    parent_config: Mapping[str, Any] | None = None,
    environment: Mapping[str, str] | None = None,
) -> EndpointConfig:
    """``render_template`` then ``parse_endpoint_config``. Pass the same
    ``variable_limits`` the variables were validated with; ``limits.max_violations``
    bounds the problems reported by either step."""
    from mepcore.config.render import render_template

    text = render_template(
        template_text,
        variables,
        mapped=mapped,
        user_runtime=user_runtime,
        includes=includes,
        limits=limits,
        template_name=template_name,
        variable_limits=variable_limits,
        parent_config=parent_config,
        environment=environment,
    )
    return parse_endpoint_config(text, max_violations=limits.max_violations)
