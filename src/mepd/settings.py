"""The daemon's settings: one YAML file, validated by a JSON Schema, turned into values.

``Settings.from_file`` reads the file safely (duplicate keys refused), validates it
against ``SETTINGS_SCHEMA`` and reports *every* violation with the key that is wrong
(``$.limits.max_body_bytes``). Relative paths are resolved against the directory of
the settings file. This module deliberately loads nothing the settings point to
(mapping, policy, templates): the daemon and ``mepd check`` do that.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import jsonschema
import yaml

from mepcore.errors import SiteConfigError, Violation
from mepcore.tasks import ResourceLimits, resource_limits_schema

# Only asymmetric algorithms: a verifier that holds a public key must never accept an
# HMAC token "signed" with that public key, and "none" is never a signature.
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")

_CLAIMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        name: {"type": "string", "minLength": 1}
        for name in ("id", "username", "email", "name", "linked", "mfa", "auth_time")
    },
}

_PATH = {"type": "string", "minLength": 1}
# One file, or a list of files used in order (policy files are merged, tables all run).
_PATHS = {"oneOf": [_PATH, {"type": "array", "minItems": 1, "items": _PATH}]}
_POS_INT = {"type": "integer", "minimum": 1}
_POS_NUM = {"type": "number", "exclusiveMinimum": 0}

LIMIT_DEFAULTS: dict[str, int | float] = {
    "max_body_bytes": 64 * 1024 * 1024,
    "max_json_depth": 32,
    "max_tasks_per_request": 10_000,
    "max_variables_bytes": 64 * 1024,
    "endpoints_per_user": 4,
    "endpoints_total": 64,
    "concurrent_starts": 8,
    "queued_tasks_per_user": 200_000,
    "max_payload_bytes": 10 * 1024 * 1024,
    "max_result_bytes": 10 * 1024 * 1024,
    "max_walltime": 24 * 3600.0,
    "result_retention": 7 * 24 * 3600.0,
    # Retention by size: an account's oldest finished tasks go before result_retention
    # when it keeps more finished tasks, or more result bytes, than these.
    "retained_tasks_per_user": 1_000_000,
    "retained_result_bytes_per_user": 4 * 1024**3,
    "start_timeout": 60.0,
    "drain_timeout": 30.0,
    "max_wait_timeout": 60.0,
    "introspection_cache_entries": 10_000,
}

_ISSUER_SCHEMAS: dict[str, dict[str, Any]] = {
    "local": {
        "additionalProperties": False,
        "properties": {
            "type": {"const": "local"},
            "issuer": {"type": "string", "minLength": 1},
            "audience": {"type": "string", "minLength": 1},
            "max_ttl": _POS_INT,
        },
    },
    "jwt": {
        "additionalProperties": False,
        "required": ["issuer", "audience"],
        "properties": {
            "type": {"const": "jwt"},
            "issuer": {"type": "string", "minLength": 1},
            "audience": {"type": "string", "minLength": 1},
            "jwks_file": _PATH,
            "jwks_url": {"type": "string", "pattern": "^https?://"},
            "algorithms": {
                "type": "array",
                "minItems": 1,
                "items": {"enum": list(ASYMMETRIC_ALGORITHMS)},
            },
            "leeway": {"type": "number", "minimum": 0, "maximum": 300},
            "claims": _CLAIMS_SCHEMA,
            # The JOSE "typ" header values taken as access tokens ("at+jwt" per RFC 9068;
            # "application/" may be left out; "" accepts a token without "typ").
            "token_types": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "maxLength": 64},
            },
            # Bounds on how long a fetched JWKS is used (its Cache-Control max-age).
            "jwks_min_age": {"type": "number", "minimum": 1, "maximum": 86400},
            "jwks_max_age": {"type": "number", "minimum": 1, "maximum": 7 * 86400},
            # Advertised to ``mep login`` (GET /v1/auth): the public client for device
            # login (RFC 8628) and the scopes it asks for.
            "device_client_id": {"type": "string", "minLength": 1, "maxLength": 256},
            # The resource indicator (RFC 8707) mep login asks tokens for, if needed.
            "login_resource": {"type": "string", "minLength": 1, "maxLength": 1024},
            "device_scopes": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[!#-\\[\\]-~]{1,128}$"},
            },
        },
    },
    "introspection": {
        "additionalProperties": False,
        "required": ["client_id", "client_secret_file"],
        "properties": {
            "type": {"const": "introspection"},
            "url": {"type": "string", "pattern": "^https?://"},
            "issuer": {"type": "string", "minLength": 1},
            "audience": {"type": "string", "minLength": 1},
            "client_id": {"type": "string", "minLength": 1},
            "client_secret_file": _PATH,
            "cache_seconds": {"type": "number", "minimum": 0},
            "claims": _CLAIMS_SCHEMA,
            # Answers without a subject (client credentials): the client id is the id.
            "accept_client_tokens": {"type": "boolean"},
        },
    },
}

# -- the HTTP edge (mepd.edge, mepd.ratelimit) ------------------------------------------
# ``edge:`` bounds what one connection, one peer and one identity can hold or send:
#   header_timeout            s a connection may take to send a request's headers (then closed)
#   body_timeout              s from the headers to the end of the body (then 408)
#   max_connections           open connections in total (default: half the fd limit)
#   max_connections_per_peer  open connections from one IP address
#   rate, burst               requests per second per identity (token bucket; 429 beyond)
EDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "header_timeout": _POS_NUM,
        "body_timeout": _POS_NUM,
        "max_connections": _POS_INT,
        "max_connections_per_peer": _POS_INT,
        "rate": _POS_NUM,
        "burst": _POS_INT,
    },
}


@attrs.frozen
class EdgeSettings:
    """The ``edge:`` section (see ``EDGE_SCHEMA``); ``max_connections`` None: derived from
    the process's file-descriptor limit when the daemon starts."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int | None = None
    max_connections_per_peer: int = 256
    rate: float = 100.0
    burst: int = 200

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EdgeSettings:
        return cls(**dict(data))


RESTART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "adopt_endpoints": {"type": "boolean"},
        "grace_period": {"type": "number", "minimum": 1, "maximum": 86400},
        "result_buffer_bytes": {"type": "integer", "minimum": 0},
    },
}


@attrs.frozen
class RestartSettings:
    """The ``restart:`` section (docs/admin-guide.md, "Restart and upgrade").

    ``adopt_endpoints`` false (the default): user endpoints die with the daemon (the
    parent-death signal), and their running tasks end as ``task.endpoint_lost``. True:
    they outlive it for ``grace_period`` seconds, keep their work, buffer up to
    ``result_buffer_bytes`` of results, and the next daemon re-adopts them after
    verifying them (``mepd.adoption``)."""

    adopt_endpoints: bool = False
    grace_period: float = 300.0
    result_buffer_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RestartSettings:
        return cls(**dict(data))


SETTINGS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mepd settings",
    "type": "object",
    "additionalProperties": False,
    "required": ["state_dir", "endpoints"],
    "properties": {
        "listen": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string", "minLength": 1},
                "port": {"type": "integer", "minimum": 0, "maximum": 65535},
            },
        },
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "required": ["cert", "key"],
            "properties": {"cert": _PATH, "key": _PATH},
        },
        "state_dir": _PATH,
        "audit_log": _PATH,
        "log_level": {"enum": ["debug", "info", "warning", "error"]},
        "min_uid": {"type": "integer", "minimum": 1},
        "deny_accounts": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "allow_nologin_shell": {"type": "boolean"},
        "pam": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enable": {"type": "boolean"},
                "service": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
            },
        },
        "python": _PATH,
        "durability": {"enum": ["normal", "full"]},
        "edge": EDGE_SCHEMA,
        "restart": RESTART_SCHEMA,
        "spawn": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "package_paths": {"type": "array", "items": _PATH},
                "path": {"type": "string", "minLength": 1},
                "lang": {"type": ["string", "null"]},
                "tz": {"type": ["string", "null"]},
                "inherit_stderr": {"type": "boolean"},
                "no_new_privs": {"type": "boolean"},
                "pin_malloc": {"type": "boolean"},
                "cgroup": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "enable": {"enum": ["auto", True, False]},
                        "pids_max": {"type": ["integer", "null"], "minimum": 1},
                        "memory_max": {
                            "oneOf": [
                                {"type": "integer", "minimum": 1},
                                {"type": "string", "pattern": "^[0-9]+[KMGT]?$"},
                                {"type": "null"},
                            ]
                        },
                        "parent": {"type": "string", "pattern": "^(/[A-Za-z0-9_.@:-]+)+$"},
                    },
                },
                "limits": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        name: {"type": ["integer", "null"], "minimum": 0}
                        for name in ("nproc", "nofile", "address_space", "core")
                    },
                },
            },
        },
        "limits": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                name: (_POS_INT if isinstance(value, int) else _POS_NUM)
                for name, value in LIMIT_DEFAULTS.items()
            },
        },
        "issuers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"enum": ["local", "jwt", "introspection"]}},
                "allOf": [
                    {"if": {"properties": {"type": {"const": kind}}}, "then": schema}
                    for kind, schema in _ISSUER_SCHEMAS.items()
                ],
            },
        },
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "template", "mapping", "policy_model", "policy"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
                    "template": _PATH,
                    # The template's name in the policy: template:<template_name>.
                    "template_name": {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                    },
                    "schema": _PATH,
                    "environment": _PATH,
                    "mapping": _PATH,
                    "policy_model": _PATH,
                    "policy": _PATHS,
                    "policy_tests": _PATHS,
                    "allowed_functions": {
                        "type": "array",
                        "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    },
                    # Shown to templates as _GC.parent_config.display_name.
                    "display_name": {"type": "string", "minLength": 1, "maxLength": 256},
                    # Caps on an MPI task's resource_specification (docs/engines.md).
                    "resource_limits": resource_limits_schema(),
                },
            },
        },
    },
}


def _json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (a silently ignored key is a trap)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_yaml(path: Path) -> Any:
    """Read a YAML file safely; duplicate keys and syntax errors become SiteConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SiteConfigError("settings.invalid", f"{path}: cannot read: {exc}") from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise SiteConfigError("settings.invalid", f"{path}: {exc}") from exc


def _resolve(base_dir: Path, value: str) -> Path:
    """A path from the settings: a relative one is relative to the settings file."""
    path = Path(value)
    return path if path.is_absolute() else base_dir / path


def _resolve_optional(base_dir: Path, value: str | None) -> Path | None:
    return None if value is None else _resolve(base_dir, value)


def _resolve_all(base_dir: Path, value: str | list[str] | None) -> tuple[Path, ...]:
    """One path or a list of them, each resolved; () for none."""
    if value is None:
        return ()
    return tuple(_resolve(base_dir, v) for v in ([value] if isinstance(value, str) else value))


def _require_valid(data: Any, source: Path | None) -> None:
    violations = _settings_violations(data)
    if violations:
        where = f"{source}: " if source else ""
        raise SiteConfigError(
            "settings.invalid",
            where + "; ".join(f"{v.path}: {v.message}" for v in violations),
            violations=violations,
        )


def _settings_violations(data: Any) -> list[Violation]:
    """Every violation of ``SETTINGS_SCHEMA``, then of the rules a schema cannot say."""
    validator = jsonschema.Draft202012Validator(SETTINGS_SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    violations = [Violation(_json_path(e.absolute_path), e.message) for e in errors]
    if isinstance(data, Mapping):
        violations += _duplicate_endpoint_violations(data.get("endpoints") or [])
        violations += _issuer_violations(data.get("issuers") or [])
    return violations


def _duplicate_endpoint_violations(endpoints: Any) -> list[Violation]:
    names = [e.get("name") for e in endpoints if isinstance(e, Mapping)]
    return [
        Violation(f"$.endpoints[{i}].name", f"duplicate endpoint {name!r}")
        for i, name in enumerate(names)
        if name in names[:i]
    ]


def _issuer_violations(issuers: Any) -> list[Violation]:
    violations = []
    for i, raw in enumerate(issuers):
        kind = raw.get("type") if isinstance(raw, Mapping) else None
        if kind == "jwt" and "jwks_file" in raw and "jwks_url" in raw:
            violations.append(Violation(f"$.issuers[{i}]", "at most one of jwks_file, jwks_url"))
        if kind == "introspection" and "url" not in raw and "issuer" not in raw:
            violations.append(Violation(f"$.issuers[{i}]", "needs url, or issuer (for discovery)"))
        if kind == "jwt" and raw.get("jwks_min_age", 0) > raw.get("jwks_max_age", 1e9):
            violations.append(
                Violation(f"$.issuers[{i}].jwks_min_age", "greater than jwks_max_age")
            )
    kinds = [i.get("type") for i in issuers if isinstance(i, Mapping)]
    if kinds.count("local") > 1:
        violations.append(Violation("$.issuers", "at most one local issuer"))
    return violations


@attrs.frozen
class Limits:
    max_body_bytes: int = int(LIMIT_DEFAULTS["max_body_bytes"])
    max_json_depth: int = int(LIMIT_DEFAULTS["max_json_depth"])
    max_tasks_per_request: int = int(LIMIT_DEFAULTS["max_tasks_per_request"])
    max_variables_bytes: int = int(LIMIT_DEFAULTS["max_variables_bytes"])
    endpoints_per_user: int = int(LIMIT_DEFAULTS["endpoints_per_user"])
    endpoints_total: int = int(LIMIT_DEFAULTS["endpoints_total"])
    concurrent_starts: int = int(LIMIT_DEFAULTS["concurrent_starts"])
    queued_tasks_per_user: int = int(LIMIT_DEFAULTS["queued_tasks_per_user"])
    max_payload_bytes: int = int(LIMIT_DEFAULTS["max_payload_bytes"])
    max_result_bytes: int = int(LIMIT_DEFAULTS["max_result_bytes"])
    max_walltime: float = float(LIMIT_DEFAULTS["max_walltime"])
    result_retention: float = float(LIMIT_DEFAULTS["result_retention"])
    retained_tasks_per_user: int = int(LIMIT_DEFAULTS["retained_tasks_per_user"])
    retained_result_bytes_per_user: int = int(LIMIT_DEFAULTS["retained_result_bytes_per_user"])
    start_timeout: float = float(LIMIT_DEFAULTS["start_timeout"])
    drain_timeout: float = float(LIMIT_DEFAULTS["drain_timeout"])
    max_wait_timeout: float = float(LIMIT_DEFAULTS["max_wait_timeout"])
    introspection_cache_entries: int = int(LIMIT_DEFAULTS["introspection_cache_entries"])

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Limits:
        return cls(**dict(data))


@attrs.frozen
class ClaimNames:
    """Which token claim becomes which identity field."""

    id: str = "sub"
    username: str = "preferred_username"
    email: str = "email"
    name: str = "name"
    linked: str = "identity_set"
    mfa: str = "mfa"
    auth_time: str = "auth_time"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ClaimNames:
        return cls(**dict(data))


# The issuer keys taken as they are written (the others are paths, tuples or claims).
_ISSUER_VALUE_KEYS = (
    "issuer",
    "audience",
    "jwks_url",
    "leeway",
    "url",
    "client_id",
    "cache_seconds",
    "max_ttl",
    "jwks_min_age",
    "jwks_max_age",
    "accept_client_tokens",
    "device_client_id",
    "login_resource",
)

# RFC 9068 access tokens; an OpenID provider's ID token never carries this type.
DEFAULT_TOKEN_TYPES = ("at+jwt",)


@attrs.frozen
class IssuerSettings:
    """One trusted issuer. ``type`` is ``local``, ``jwt`` or ``introspection``."""

    type: str
    issuer: str = "mepd-local"
    audience: str | None = None  # local: "mepd" when unset; introspection: unchecked
    jwks_file: Path | None = None
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway: float = 30.0
    claims: ClaimNames = ClaimNames()
    url: str | None = None
    client_id: str | None = None
    client_secret_file: Path | None = None
    cache_seconds: float = 300.0
    max_ttl: int = 30 * 24 * 3600
    token_types: tuple[str, ...] = DEFAULT_TOKEN_TYPES
    jwks_min_age: float = 60.0
    jwks_max_age: float = 24 * 3600.0
    accept_client_tokens: bool = False
    device_client_id: str | None = None
    login_resource: str | None = None
    device_scopes: tuple[str, ...] = ("openid", "offline_access")

    def __attrs_post_init__(self) -> None:
        # An introspection issuer without an ``issuer`` is named by its URL (part of
        # the identity and of task ownership, never the local issuer's name).
        if self.type == "introspection" and self.issuer == "mepd-local" and self.url:
            object.__setattr__(self, "issuer", self.url)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: Path) -> IssuerSettings:
        """One validated ``issuers`` entry; its key files resolved against ``base_dir``."""
        return cls(
            type=data["type"],
            **{k: v for k, v in data.items() if k in _ISSUER_VALUE_KEYS},
            algorithms=tuple(data.get("algorithms") or DEFAULT_ALGORITHMS),
            token_types=tuple(data.get("token_types") or DEFAULT_TOKEN_TYPES),
            device_scopes=tuple(data.get("device_scopes", ("openid", "offline_access"))),
            claims=ClaimNames.from_mapping(data.get("claims") or {}),
            jwks_file=_resolve_optional(base_dir, data.get("jwks_file")),
            client_secret_file=_resolve_optional(base_dir, data.get("client_secret_file")),
        )


DEFAULT_TEMPLATE_NAME = "default"


@attrs.frozen
class EndpointSettings:
    """One ``endpoints`` entry. ``policy`` is one file or several, merged in order (a
    deny line in any of them beats every allow line); ``policy_tests`` are decision
    tables (``mepd policy test`` format) run against that merged policy by ``mepd
    check``; ``template_name`` is what the policy calls the template (``template:…``)."""

    name: str
    template: Path
    mapping: Path
    policy_model: Path
    policy: tuple[Path, ...]
    schema: Path | None = None
    environment: Path | None = None
    policy_tests: tuple[Path, ...] = ()
    allowed_functions: tuple[str, ...] | None = None
    template_name: str = DEFAULT_TEMPLATE_NAME
    display_name: str | None = None
    resource_limits: ResourceLimits = ResourceLimits()  # noqa: RUF009 - frozen, shared safely

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: Path) -> EndpointSettings:
        """One validated ``endpoints`` entry; its files resolved against ``base_dir``."""
        return cls(
            name=data["name"],
            template=_resolve(base_dir, data["template"]),
            mapping=_resolve(base_dir, data["mapping"]),
            policy_model=_resolve(base_dir, data["policy_model"]),
            policy=_resolve_all(base_dir, data["policy"]),
            schema=_resolve_optional(base_dir, data.get("schema")),
            environment=_resolve_optional(base_dir, data.get("environment")),
            policy_tests=_resolve_all(base_dir, data.get("policy_tests")),
            allowed_functions=(
                tuple(data["allowed_functions"]) if "allowed_functions" in data else None
            ),
            template_name=data.get("template_name", DEFAULT_TEMPLATE_NAME),
            display_name=data.get("display_name"),
            resource_limits=ResourceLimits.from_mapping(data.get("resource_limits")),
        )


@attrs.frozen
class PamSettings:
    """PAM account management and sessions for user endpoints (``pam:`` in settings)."""

    service: str = "mep"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PamSettings | None:
        """None unless ``enable: true``."""
        if not data.get("enable", False):
            return None
        return cls(service=data.get("service", "mep"))


@attrs.frozen
class Settings:
    state_dir: Path
    endpoints: tuple[EndpointSettings, ...]
    source: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8470
    tls_cert: Path | None = None
    tls_key: Path | None = None
    audit_log: Path | None = None
    log_level: str = "info"
    min_uid: int = 1000
    deny_accounts: tuple[str, ...] = ()
    allow_nologin_shell: bool = False
    pam: PamSettings | None = None
    python: str = sys.executable
    durability: str = "normal"
    spawn: Mapping[str, Any] = attrs.field(factory=dict)
    limits: Limits = Limits()
    edge: EdgeSettings = EdgeSettings()
    restart: RestartSettings = RestartSettings()
    issuers: tuple[IssuerSettings, ...] = (IssuerSettings(type="local"),)

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.state_dir / "audit.jsonl"

    @property
    def local_issuer(self) -> IssuerSettings | None:
        for issuer in self.issuers:
            if issuer.type == "local":
                return issuer
        return None

    def endpoint(self, name: str) -> EndpointSettings | None:
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        return None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Settings:
        source = Path(path).absolute()
        data = load_yaml(source)
        return cls.from_mapping(data, base_dir=source.parent, source=source)

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: Path, source: Path | None = None) -> Settings:
        """Validate ``data`` and build the settings; every violation is reported at once."""
        _require_valid(data, source)
        listen = data.get("listen") or {}
        tls = data.get("tls") or {}
        return cls(
            state_dir=_resolve(base_dir, data["state_dir"]),
            endpoints=tuple(
                EndpointSettings.from_mapping(raw, base_dir=base_dir) for raw in data["endpoints"]
            ),
            source=source,
            host=listen.get("host", "127.0.0.1"),
            port=listen.get("port", 8470),
            tls_cert=_resolve_optional(base_dir, tls.get("cert")),
            tls_key=_resolve_optional(base_dir, tls.get("key")),
            audit_log=_resolve_optional(base_dir, data.get("audit_log")),
            log_level=data.get("log_level", "info"),
            min_uid=data.get("min_uid", 1000),
            deny_accounts=tuple(data.get("deny_accounts") or ()),
            allow_nologin_shell=data.get("allow_nologin_shell", False),
            pam=PamSettings.from_mapping(data.get("pam") or {}),
            python=str(_resolve(base_dir, data["python"])) if "python" in data else sys.executable,
            durability=data.get("durability", "normal"),
            spawn=dict(data.get("spawn") or {}),
            limits=Limits.from_mapping(data.get("limits") or {}),
            edge=EdgeSettings.from_mapping(data.get("edge") or {}),
            restart=RestartSettings.from_mapping(data.get("restart") or {}),
            issuers=tuple(
                IssuerSettings.from_mapping(raw, base_dir=base_dir)
                for raw in data.get("issuers") or [{"type": "local"}]
            ),
        )
