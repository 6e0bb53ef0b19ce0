"""Endpoint-config keys: what the engines honour, and which Globus Compute keys mep ignores.

One truth for the keys a template may write. The endpoint-config schema
(``endpoint.endpoint_config_schema``) is built from these tables and the engine options
written beside it; tests check them against what ``mepcore.tasks`` accepts when an
engine starts: the option keys of each engine (``mepcore.tasks.engine_keys``) and the
constructor of each Parsl provider and launcher mep offers (``PROVIDER_KEYS``,
``LAUNCHER_KEYS``, per type). So a key is either honoured at start or refused at
render, never passed by one and refused by the other.

Every key Globus Compute 4.19 accepts in a user endpoint's configuration is accepted
here too; those mep cannot honour are listed in ``IGNORED_KEYS`` / ``IGNORED_ENGINE_KEYS``
with the reason, accepted with any value, and dropped (``mepd render`` and ``mepd check``
say so). Keys that need a Python object (``executor``, ``storage_access``, …) cannot be
written in YAML and are refused, as they fail there too.

This module is data: it imports neither Parsl nor the engines.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from mepcore.errors import Violation

# The template file name a site uses when it names none (as Globus Compute does).
DEFAULT_TEMPLATE_NAME = "user_config_template.yaml.j2"

_STRING = {"type": "string", "maxLength": 65_536}
_NAME = {"type": "string", "minLength": 1, "maxLength": 256}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 100_000}
_POSITIVE = {"type": "integer", "minimum": 1, "maximum": 100_000}
_BOOL = {"type": "boolean"}
_WALLTIME = {"type": "string", "pattern": r"^([0-9]+-)?[0-9]{1,3}(:[0-5][0-9]){0,2}$"}
_SECONDS = {"type": "integer", "minimum": 1, "maximum": 3600}
_PARALLELISM = {"type": "number", "minimum": 0, "maximum": 1}

# Keys of every block-based provider: elasticity and the shell lines run first.
_BLOCKS = {
    "nodes_per_block": _POSITIVE,
    "init_blocks": _COUNT,
    "min_blocks": _COUNT,
    "max_blocks": _COUNT,
    "parallelism": _PARALLELISM,
    "worker_init": _STRING,
    "cmd_timeout": _SECONDS,
}


def _freeze(table: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in table.items()})


# Parsl providers mep offers, each with the keys of its constructor (``launcher`` is
# added by ``provider_schema``). Names and meanings are Parsl's.
PROVIDER_KEYS: Mapping[str, Mapping[str, Any]] = _freeze(
    {
        "LocalProvider": dict(_BLOCKS),
        "SlurmProvider": {
            **_BLOCKS,
            "partition": _NAME,
            "account": _NAME,
            "qos": _NAME,
            "constraint": _NAME,
            "clusters": _NAME,
            "cores_per_node": _POSITIVE,
            "mem_per_node": _POSITIVE,  # GB, an integer in Parsl
            "gpus_per_node": _COUNT,
            "gres": _NAME,
            "walltime": _WALLTIME,
            "scheduler_options": _STRING,
            "regex_job_id": _STRING,
            "status_batch_size": _POSITIVE,
            "exclusive": _BOOL,
        },
        "PBSProProvider": {
            **_BLOCKS,
            "account": _NAME,
            "queue": _NAME,
            "scheduler_options": _STRING,
            "select_options": _STRING,
            "cpus_per_node": _POSITIVE,
            "walltime": _WALLTIME,
        },
        "TorqueProvider": {
            **_BLOCKS,
            "account": _NAME,
            "queue": _NAME,
            "scheduler_options": _STRING,
            "walltime": _WALLTIME,
        },
        "LSFProvider": {
            **_BLOCKS,
            "cores_per_block": _POSITIVE,
            "cores_per_node": _POSITIVE,
            "walltime": _WALLTIME,
            "scheduler_options": _STRING,
            "project": _NAME,
            "queue": _NAME,
            "bsub_redirection": _BOOL,
            "request_by_nodes": _BOOL,
        },
        "CondorProvider": {
            **_BLOCKS,
            "cores_per_slot": _POSITIVE,
            "mem_per_slot": {"type": "number", "exclusiveMinimum": 0},
            "environment": {
                "type": "object",
                "additionalProperties": {"type": "string", "maxLength": 65_536},
            },
            "project": _STRING,
            "scheduler_options": _STRING,
            "transfer_input_files": {"type": "array", "items": _STRING, "maxItems": 1024},
            "walltime": _WALLTIME,
            "requirements": _STRING,
            "cmd_chunk_size": _POSITIVE,
        },
        "GridEngineProvider": {
            **_BLOCKS,
            "walltime": _WALLTIME,
            "scheduler_options": _STRING,
            "queue": _NAME,
        },
    }
)

# Parsl launchers mep offers, each with the keys of its constructor.
LAUNCHER_KEYS: Mapping[str, Mapping[str, Any]] = _freeze(
    {
        "SingleNodeLauncher": {"debug": _BOOL, "fail_on_any": _BOOL},
        "SimpleLauncher": {"debug": _BOOL},
        "SrunLauncher": {"debug": _BOOL, "overrides": _STRING},
        "SrunMPILauncher": {"debug": _BOOL, "overrides": _STRING},
        "MpiExecLauncher": {"debug": _BOOL, "bind_cmd": _STRING, "overrides": _STRING},
        "MpiRunLauncher": {"debug": _BOOL, "bash_location": _STRING, "overrides": _STRING},
        "AprunLauncher": {"debug": _BOOL, "overrides": _STRING},
        "JsrunLauncher": {"debug": _BOOL, "overrides": _STRING},
    }
)

_NO_AMQP = "mep has no AMQP connection: the daemon itself is the service its clients talk to"
_NO_GLOBUS = "it configures the Globus cloud service, which mep does not use"
_POLICY = "who may do what is decided by the daemon's Casbin policy (the settings' policy files)"
_RETRIES = "retries after a lost worker exist only for GlobusComputeEngine in mep"
_SERIALIZERS = "mep's serialization strategies are fixed by mep (mepcore.tasks.STRATEGIES)"
_WORKDIR = "tasks run in the user endpoint's working directory (the user's home)"
_LABEL = "mep names its executor and batch jobs itself, to find them again after a restart"
_ENDPOINT_ID = "set by Globus Compute itself; mep names user endpoints by their config key"
_INITIALIZER = "a worker initializer is a Python callable, which YAML cannot give"

# Top-level keys of a user endpoint's configuration mep accepts and ignores.
IGNORED_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "amqp_port": _NO_AMQP,
        "environment": _NO_GLOBUS,
        "local_compute_services": _NO_GLOBUS,
        "authentication_policy": _POLICY,
        "subscription_id": _NO_GLOBUS,
        "admins": _POLICY,
        "debug": "the log level is the daemon's (log_level in the settings)",
        "heartbeat_threshold": (
            "unused in Globus Compute as well; GlobusComputeEngine has its own"
            " engine.heartbeat_threshold"
        ),
        "paths": "mep keeps a user endpoint's directory and log in places of its own",
    }
)

# HighThroughputExecutor keys mep accepts and ignores (both Parsl engines).
_HTEX_IGNORED: Mapping[str, str] = {
    "label": _LABEL,
    "container_type": "mep runs no containers: functions run in the user endpoint's"
    " environment (set worker_init or endpoint_setup instead)",
    "container_uri": "mep runs no containers (see container_type)",
    "container_cmd_options": "mep runs no containers (see container_type)",
    "run_in_sandbox": _WORKDIR,
    "allowed_serializers": _SERIALIZERS,
    "working_dir": _WORKDIR,
    "launch_cmd": "mep sets the worker command itself (Globus Compute overrides it too)",
    "interchange_launch_cmd": (
        "mep sets the interchange command itself (Globus Compute overrides it too)"
    ),
    "block_error_handler": ("mep's engine reports failed blocks itself (task.provider_failed)"),
    "loopback_address": "the interchange's local connections are mep's business",
    "worker_port": "use worker_port_range",
    "address_probe_timeout": "mep gives workers the interchange's address itself",
    "worker_logdir_root": "workers log into the engine's run directory",
}

# Engine keys mep accepts and ignores, per engine type.
IGNORED_ENGINE_KEYS: Mapping[str, Mapping[str, str]] = _freeze(
    {
        "ThreadPoolEngine": {
            "label": _LABEL,
            "thread_name_prefix": "mep names its worker threads itself",
            "initargs": _INITIALIZER,
            "allowed_serializers": _SERIALIZERS,
        },
        "ProcessPoolEngine": {
            "label": _LABEL,
            "max_tasks_per_child": "mep's pool replaces a worker only when it dies",
            "initializer": _INITIALIZER,
            "initargs": _INITIALIZER,
            "mp_context": "mep's pool forks its workers itself",
            "endpoint_id": _ENDPOINT_ID,
            "max_retries_on_system_failure": _RETRIES,
            "working_dir": _WORKDIR,
            "allowed_serializers": _SERIALIZERS,
        },
        "GlobusComputeEngine": _HTEX_IGNORED,
        # the same executor in Parsl's MPI mode
        "GlobusMPIEngine": _HTEX_IGNORED,
    }
)


def ignored_properties(reasons: Mapping[str, str]) -> dict[str, Any]:
    """Schema properties for keys that are accepted with any value and ignored."""
    return {key: {"description": f"accepted and ignored: {why}"} for key, why in reasons.items()}


def launcher_schema() -> dict[str, Any]:
    """The schema of ``provider.launcher``: a type from ``LAUNCHER_KEYS`` and its keys."""
    return _typed_schema(LAUNCHER_KEYS)


LAUNCHER_REF = "#/$defs/launcher"


def provider_schema() -> dict[str, Any]:
    """The schema of ``engine.provider``: a type from ``PROVIDER_KEYS`` and its keys; its
    ``launcher`` refers to ``LAUNCHER_REF`` (``launcher_schema()`` in the root's
    ``$defs``)."""
    launcher = {"$ref": LAUNCHER_REF}
    return _typed_schema(
        {name: {**keys, "launcher": launcher} for name, keys in PROVIDER_KEYS.items()}
    )


# Rules between keys a constructor checks itself (so they are refused at render too).
_PROVIDER_RULES: Mapping[str, list[dict[str, Any]]] = MappingProxyType(
    {
        "LSFProvider": [
            {
                "if": {
                    "properties": {"request_by_nodes": {"const": False}},
                    "required": ["request_by_nodes"],
                },
                "then": {"required": ["cores_per_block", "cores_per_node"]},
            }
        ]
    }
)


def _typed_schema(table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": list(table)}},
        "allOf": [
            {
                "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                "then": {
                    "properties": {"type": {"const": name}, **_copy(keys)},
                    "additionalProperties": False,
                    **({"allOf": _copy(_PROVIDER_RULES[name])} if name in _PROVIDER_RULES else {}),
                },
            }
            for name, keys in table.items()
        ],
    }


def _copy(value: Any) -> Any:
    """Plain dicts and lists all the way down (a fresh copy each call)."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def without_nulls(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with the ``null`` values of ``engine``, its ``provider`` and the
    provider's ``launcher`` left out: Globus Compute passes only the keys that are not
    None to these classes, so ``partition: null`` means "not given" there too."""
    out = dict(data)
    engine = out.get("engine")
    if isinstance(engine, Mapping):
        engine = {k: v for k, v in engine.items() if v is not None}
        provider = engine.get("provider")
        if isinstance(provider, Mapping):
            provider = {k: v for k, v in provider.items() if v is not None}
            launcher = provider.get("launcher")
            if isinstance(launcher, Mapping):
                provider["launcher"] = {k: v for k, v in launcher.items() if v is not None}
            engine["provider"] = provider
        out["engine"] = engine
    return out


def drop_ignored(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[Violation]]:
    """A valid document without the keys mep ignores, and a warning for each (and for
    ``allowed_functions`` entries that are Globus Compute function UUIDs, which no mep
    function id can equal)."""
    out = {k: v for k, v in data.items() if k not in IGNORED_KEYS}
    warnings = [
        Violation(f"$.{key}", f"accepted and ignored: {IGNORED_KEYS[key]}", "ignored_key")
        for key in data
        if key in IGNORED_KEYS
    ]
    engine = data.get("engine")
    if isinstance(engine, Mapping):
        ignored = IGNORED_ENGINE_KEYS.get(str(engine.get("type")), {})
        out["engine"] = {k: v for k, v in engine.items() if k not in ignored}
        warnings += [
            Violation(f"$.engine.{key}", f"accepted and ignored: {ignored[key]}", "ignored_key")
            for key in engine
            if key in ignored
        ]
    for index, entry in enumerate(data.get("allowed_functions") or ()):
        if isinstance(entry, str) and _UUID.fullmatch(entry):
            warnings.append(
                Violation(
                    f"$.allowed_functions[{index}]",
                    "a Globus Compute function UUID: mep's function ids are the sha256 of the"
                    " function's body (mepd functions list), so this entry allows nothing",
                    "function_uuid",
                )
            )
    return out, warnings
