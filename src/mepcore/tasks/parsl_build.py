"""What a Parsl engine is built from: providers, launchers, scaling and heartbeat settings.

Providers and launchers come from closed tables (``PROVIDER_TYPES``, ``LAUNCHER_TYPES``),
their options checked against the chosen class's constructor, never used to import
anything by name. ``ScalingPolicy`` holds Parsl's strategy settings; the engine keys an
endpoint config may set are named here too.

This module checks and constructs; it deliberately starts nothing (no executor, no
block, no thread) and imports Parsl only inside the functions that need its classes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import attrs

from mepcore.errors import ConfigError, Violation

__all__ = [
    "LAUNCHER_TYPES",
    "PROVIDER_TYPES",
    "STRATEGIES",
    "ScalingPolicy",
    "build_launcher",
    "build_provider",
    "launcher_classes",
    "provider_classes",
]

PROVIDER_TYPES = (
    "LocalProvider",
    "SlurmProvider",
    "PBSProProvider",
    "TorqueProvider",
    "LSFProvider",
    "CondorProvider",
    "GridEngineProvider",
)
LAUNCHER_TYPES = (
    "SingleNodeLauncher",
    "SimpleLauncher",
    "SrunLauncher",
    "SrunMPILauncher",
    "MpiExecLauncher",
    "MpiRunLauncher",
    "AprunLauncher",
    "JsrunLauncher",
)
STRATEGIES = ("simple", "htex_auto_scale", "none")
# HighThroughputExecutor options an endpoint config may set (besides type and provider).
_HTEX_OPTIONS = frozenset(
    {
        "max_workers_per_node",
        "cores_per_worker",
        "mem_per_worker",
        "address",
        "worker_port_range",
        "interchange_port_range",
        "heartbeat_period",
        "heartbeat_threshold",
        "poll_period",
        "prefetch_capacity",
        "cpu_affinity",
        "available_accelerators",
        "encrypted",
        "worker_debug",
        "drain_period",
    }
)
_ENGINE_KEYS = _HTEX_OPTIONS | {
    "type",
    "provider",
    "run_dir",
    "strategy",
    "max_idletime",
    "job_status_kwargs",
    "max_retries_on_system_failure",
}
_JOB_STATUS_KEYS = frozenset({"strategy", "max_idletime", "strategy_period"})
# Parsl's manager checks its workers once per heartbeat period: its default (30 s) makes
# a lost worker a 30 s wait.
_DEFAULT_HEARTBEAT_PERIOD = 5
# A block whose manager sends nothing for this long is lost (Parsl: 120 s). Six missed
# heartbeats: long enough for a busy login node, short enough that a cancelled job's
# tasks are reported while the caller still cares. Also how long a worker pool keeps
# going without its interchange (when the endpoint is gone).
_DEFAULT_HEARTBEAT_THRESHOLD = 30
_DEFAULT_STRATEGY = "simple"
_DEFAULT_MAX_IDLETIME = 120.0
_DEFAULT_STRATEGY_PERIOD = 5.0


def _invalid(path: str, message: str) -> ConfigError:
    return ConfigError(
        "config.endpoint_config_invalid",
        f"{path}: {message}",
        violations=[Violation(path, message)],
    )


def provider_classes() -> Mapping[str, type]:
    """The closed table of Parsl providers (imports Parsl)."""
    from parsl import providers

    return {name: getattr(providers, name) for name in PROVIDER_TYPES}


def launcher_classes() -> Mapping[str, type]:
    """The closed table of Parsl launchers (imports Parsl)."""
    from parsl import launchers

    return {name: getattr(launchers, name) for name in LAUNCHER_TYPES}


def _construct(cls: type, options: Mapping[str, Any], path: str) -> Any:
    parameters = inspect.signature(cls).parameters
    for key in options:
        if key not in parameters or key == "self":
            raise _invalid(f"{path}.{key}", f"is not an option of {cls.__name__}")
        if not _same_kind(parameters[key], options[key]):
            raise _invalid(path, f"{key} must be like its default {parameters[key].default!r}")
    try:
        return cls(**options)
    except Exception as exc:  # typeguard's TypeCheckError and Parsl's own checks
        raise _invalid(path, f"{type(exc).__name__}: {exc}") from exc


def _same_kind(parameter: inspect.Parameter, value: Any) -> bool:
    """Whether ``value`` has the plain type of a constructor default (not every Parsl
    class checks its arguments' types)."""
    kind = type(parameter.default)
    if kind not in (bool, int, float, str):
        return True
    # Parsl's parallelism is a fraction even where its default is written as 1.
    fraction = parameter.name == "parallelism"
    if kind is float or (kind is int and ("float" in str(parameter.annotation) or fraction)):
        return type(value) in (int, float)
    return type(value) is kind


def build_launcher(config: Any, path: str = "$.engine.provider.launcher") -> Any:
    if not isinstance(config, Mapping) or not isinstance(config.get("type"), str):
        raise _invalid(path, "must be a mapping with a type")
    cls = launcher_classes().get(config["type"])
    if cls is None:
        raise _invalid(f"{path}.type", f"must be one of {', '.join(LAUNCHER_TYPES)}")
    return _construct(cls, {k: v for k, v in config.items() if k != "type"}, path)


def build_provider(config: Any, path: str = "$.engine.provider") -> Any:
    """A Parsl provider from its endpoint-config mapping, through the closed tables."""
    if not isinstance(config, Mapping) or not isinstance(config.get("type"), str):
        raise _invalid(path, "must be a mapping with a type")
    cls = provider_classes().get(config["type"])
    if cls is None:
        raise _invalid(f"{path}.type", f"must be one of {', '.join(PROVIDER_TYPES)}")
    options = {k: v for k, v in config.items() if k not in ("type", "launcher")}
    if "launcher" in config:
        options["launcher"] = build_launcher(config["launcher"], f"{path}.launcher")
    return _construct(cls, options, path)


# -- scaling settings -----------------------------------------------------------------------


@attrs.frozen
class ScalingPolicy:
    """Parsl's strategy settings: ``strategy``, ``max_idletime`` (seconds a block may stay
    idle before it is scaled in) and ``strategy_period`` (seconds between two runs)."""

    strategy: str = _DEFAULT_STRATEGY
    max_idletime: float = _DEFAULT_MAX_IDLETIME
    strategy_period: float = _DEFAULT_STRATEGY_PERIOD

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ScalingPolicy:
        """From the engine keys ``strategy``, ``max_idletime`` and ``job_status_kwargs``
        (Parsl's ``JobStatusPoller`` arguments); one setting given twice must agree."""
        kwargs = config.get("job_status_kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise _invalid("$.engine.job_status_kwargs", "must be a mapping")
        for key in kwargs:
            if key not in _JOB_STATUS_KEYS:
                raise _invalid(f"$.engine.job_status_kwargs.{key}", "is not a known option")
        merged: dict[str, Any] = dict(kwargs)
        for key in ("strategy", "max_idletime"):
            if key in config:
                if key in kwargs and kwargs[key] != config[key]:
                    raise _invalid(
                        f"$.engine.{key}", "disagrees with the same setting in job_status_kwargs"
                    )
                merged[key] = config[key]
        strategy = merged.get("strategy", _DEFAULT_STRATEGY)
        if strategy not in STRATEGIES:
            raise _invalid("$.engine.strategy", f"must be one of {', '.join(STRATEGIES)}")
        numbers = {}
        for key, default, low in (
            ("max_idletime", _DEFAULT_MAX_IDLETIME, 0.0),
            ("strategy_period", _DEFAULT_STRATEGY_PERIOD, 0.1),
        ):
            value = merged.get(key, default)
            if type(value) not in (int, float) or not low <= value <= 86_400:
                raise _invalid(f"$.engine.{key}", f"must be a number from {low:g} to 86400")
            numbers[key] = float(value)
        return cls(strategy, numbers["max_idletime"], numbers["strategy_period"])


def _heartbeat_options(options: dict[str, Any]) -> None:
    options.setdefault("heartbeat_period", _DEFAULT_HEARTBEAT_PERIOD)
    period = options["heartbeat_period"]
    options.setdefault("heartbeat_threshold", max(_DEFAULT_HEARTBEAT_THRESHOLD, 3 * period))
    threshold = options["heartbeat_threshold"]
    if type(period) is int and type(threshold) is int and threshold <= period:
        raise _invalid("$.engine.heartbeat_threshold", "must be longer than heartbeat_period")
