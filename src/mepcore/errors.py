"""The one error hierarchy of mep.

Every error carries a stable dotted ``reason`` code (``identity.no_mapping``,
``authz.denied``…), a ``public_message`` that is safe to show a remote caller, and an
admin-only ``detail``. A few codes are for administrators only (``ADMIN_ONLY_REASONS``:
why an account was refused); such an error keeps its code as ``admin_reason`` and
shows callers the public code it stands for. Errors that report several problems at
once (schema violations) carry them as ``violations``, each with a JSON path.

The catalogue ``REASONS`` lists every reason code the project emits with its default
public message; docs and tests are checked against it. This module deliberately does
not translate third-party errors: each component does that once, at its boundary,
with ``raise … from``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import attrs

__all__ = [
    "ADMIN_ONLY_REASONS",
    "REASONS",
    "ApiError",
    "AuthError",
    "AuthzConfigError",
    "AuthzError",
    "ChannelError",
    "ConfigError",
    "IdentityConfigError",
    "IdentityError",
    "MepError",
    "SiteConfigError",
    "SpawnError",
    "StoreError",
    "TaskError",
    "TemplateConfigError",
    "Violation",
]

# Stable reason codes and their default public messages. Public messages never name
# local accounts, files or internals: they are what a remote caller may read.
REASONS: Mapping[str, str] = MappingProxyType(
    {
        # generic
        "mep.internal": "internal error",
        "mep.invalid_input": "the input is not valid",
        # identity mapping
        "identity.mapping_invalid": "the identity mapping configuration is invalid",
        "identity.input_invalid": "the identity input is not valid",
        "identity.no_mapping": "your identity is not mapped to a local account",
        "identity.mapper_failed": "identity mapping failed",
        "identity.mapper_timeout": "identity mapping failed",
        "identity.mapper_output_invalid": "identity mapping failed",
        "identity.mapper_output_too_large": "identity mapping failed",
        "identity.ambiguous_mapping": (
            "your linked identities map to different local accounts; ask the administrator"
        ),
        # The one code a caller sees for every refused account (ADMIN_ONLY_REASONS).
        "identity.account_refused": "your identity maps to an account that may not be used",
        "identity.invalid_username": "your identity maps to an account that may not be used",
        "identity.account_missing": "your identity maps to an account that may not be used",
        "identity.account_name_mismatch": "your identity maps to an account that may not be used",
        "identity.account_root": "your identity maps to an account that may not be used",
        "identity.account_uid_too_low": "your identity maps to an account that may not be used",
        "identity.account_daemon": "your identity maps to an account that may not be used",
        "identity.account_denied": "your identity maps to an account that may not be used",
        "identity.account_not_served": "your identity maps to an account that may not be used",
        "identity.account_locked": "your identity maps to an account that may not be used",
        "identity.account_expired": "your identity maps to an account that may not be used",
        "identity.account_nologin": "your identity maps to an account that may not be used",
        "identity.pam_refused": "your identity maps to an account that may not be used",
        # authorization
        "authz.denied": "the policy does not allow this request",
        "authz.allowed": "the policy allows this request",
        "authz.explicit_deny": "the policy does not allow this request",
        "authz.condition_failed": "the policy does not allow this request",
        "authz.policy_invalid": "the authorization policy is invalid",
        "authz.model_invalid": "the authorization model is invalid",
        "authz.request_invalid": "the authorization request is not valid",
        # configuration (templates, variables, endpoint config)
        "config.template_invalid": "the endpoint configuration template is invalid",
        "config.schema_invalid": "the user configuration schema is invalid",
        "config.environment_invalid": "the user environment file is invalid",
        "config.invalid_variables": "the user endpoint configuration variables are not valid",
        "config.reserved_variable": "a user endpoint configuration variable uses a reserved name",
        "config.variables_too_large": "the user endpoint configuration variables are too large",
        "config.render_failed": "the endpoint configuration could not be rendered",
        "config.sandbox_violation": "the endpoint configuration template did something unsafe",
        "config.render_limit": "rendering the endpoint configuration exceeded a limit",
        "config.undefined_variable": (
            "the endpoint configuration template uses an undefined variable"
        ),
        "config.yaml_invalid": "the rendered endpoint configuration is not valid YAML",
        "config.endpoint_config_invalid": "the rendered endpoint configuration is not valid",
        # spawning and lifecycle of user endpoints
        "spawn.interpreter_unreadable": "the user endpoint cannot start for this account",
        "spawn.launch_failed": "the user endpoint could not be started",
        "spawn.privilege_drop": "the user endpoint could not drop privileges",
        "spawn.cgroup_failed": "the user endpoint could not be contained",
        "spawn.start_failed": "the user endpoint could not be started",
        "spawn.log_unavailable": "the endpoint log could not be read",
        "spawn.start_timeout": "the user endpoint did not start in time",
        "spawn.too_many_endpoints": "too many user endpoints",
        "spawn.too_many_starts": "too many user endpoints are starting; try again",
        "spawn.settings_invalid": "the spawn settings are invalid",
        "spawn.shutting_down": "the service is shutting down",
        # channel between the daemon and a user endpoint
        "channel.frame_too_large": "a message was too large",
        "channel.frame_invalid": "a message was malformed",
        "channel.closed": "the connection to the user endpoint closed",
        # tasks
        "task.failed": "the task raised an exception",
        "task.timeout": "the task exceeded its walltime",
        "task.worker_lost": "the worker running the task was lost",
        "task.provider_failed": "the batch system did not start workers for the task",
        "task.endpoint_lost": "the user endpoint running the task was lost",
        "task.result_buffer_full": (
            "the result was produced while the daemon was away and did not fit the user "
            "endpoint's result buffer"
        ),
        "task.result_too_large": "the task result is too large",
        "task.payload_too_large": "the task payload is too large",
        "task.deserialization_failed": "the task payload could not be deserialized",
        "task.serialization_failed": "the task result could not be serialized",
        "task.function_not_allowed": "this function is not allowed on this endpoint",
        "task.function_unknown": "the function is not registered",
        "task.unknown_strategy": "the serialization strategy is not known",
        "task.envelope_invalid": "the task envelope is not valid",
        "task.cancelled": "the task was cancelled",
        "task.version_mismatch": (
            "the function was serialized by another Python version than the endpoint's"
        ),
        "task.not_found": "no such task",
        "task.engine_failed": "the execution engine failed",
        "task.record_damaged": "the stored record of this task is damaged",
        "task.resources_invalid": "the task's resource_specification is not valid",
        "task.resources_not_allowed": "the task asks for more nodes or ranks than allowed",
        "task.resources_exceed_block": "the task asks for more nodes than a block has",
        # daemon: authentication, API, limits, settings
        "auth.missing_token": "authentication required",
        "auth.invalid_token": "the token is not valid",
        "auth.expired_token": "the token has expired",
        "auth.unknown_issuer": "the token issuer is not trusted",
        "auth.issuer_unavailable": "the token could not be verified right now",
        "api.bad_request": "the request is not valid",
        "api.not_found": "not found",
        "api.body_too_large": "the request body is too large",
        "api.too_many_requests": "too many requests; try again later",
        "api.unavailable": "the service is unavailable",
        "api.endpoint_unknown": "no such endpoint",
        # the HTTP edge (mepd.edge, mepd.api): strict input, timeouts, limits
        "api.method_not_allowed": "this method is not allowed on this path",
        "api.unsupported_media_type": "the request body must be JSON (application/json)",
        "api.request_timeout": "the request was not received in time",
        "api.rate_limited": "too many requests from this identity; try again later",
        "api.too_many_connections": "too many connections; try again later",
        "settings.invalid": "the daemon settings are invalid",
        # rule 8: a file root would read, load or execute that it cannot trust
        "settings.untrusted_file": "the daemon refuses a file it cannot trust",
        "api.shutting_down": "the service is shutting down; try again later",
        "audit.unavailable": "the service cannot record this request and refuses it",
        "store.unavailable": "the service cannot store this request right now; try again later",
        "store.invalid": "the service's task store cannot be used",
        # client (mepcore.client): failures seen by the caller's side
        "client.unavailable": "the service could not be reached",
        "client.protocol_error": "the service sent an answer the client does not understand",
        "client.unknown_reason": "the service refused the request",
        "client.login_required": "log in first (mep login), or pass a token",
        "client.login_failed": "the login did not complete",
    }
)

# Codes that say *why* an account was refused, mapped to the one code a caller sees.
# Told apart, they would let a caller probe which accounts exist, which are locked or
# below ``min_uid``; so the error keeps the specific code as ``admin_reason`` (admin
# log, audit record, ``mepd map``) and shows callers only ``reason``. Decided when the
# error is made, so no code path that forwards ``reason`` can leak the specific one.
ADMIN_ONLY_REASONS: Mapping[str, str] = MappingProxyType(
    dict.fromkeys(
        (
            "identity.invalid_username",
            "identity.account_missing",
            "identity.account_name_mismatch",
            "identity.account_root",
            "identity.account_uid_too_low",
            "identity.account_daemon",
            "identity.account_denied",
            "identity.account_not_served",
            "identity.account_locked",
            "identity.account_expired",
            "identity.account_nologin",
            "identity.pam_refused",
        ),
        "identity.account_refused",
    )
)


@attrs.frozen
class Violation:
    """One problem found in an input, located by a JSON path (``$.a[0].b``)."""

    path: str
    message: str
    code: str = "invalid"

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message, "code": self.code}


class MepError(Exception):
    """Base of every error mep raises on purpose.

    ``reason`` must be a code from ``REASONS``; ``public_message`` defaults to the
    catalogue's message; ``detail`` is for administrators only (logs, CLI output).

    ``admin_reason`` is the code as raised; ``reason`` is what a caller may see: the
    same code, except that an ``ADMIN_ONLY_REASONS`` code becomes its public code (and
    its public message is always the catalogue's). Logs and audit records use
    ``admin_reason``; answers to callers use ``reason`` (``to_public``).
    """

    default_reason: ClassVar[str] = "mep.internal"

    def __init__(
        self,
        reason: str | None = None,
        detail: str = "",
        *,
        public_message: str | None = None,
        violations: Iterable[Violation] = (),
        context: Mapping[str, Any] | None = None,
    ) -> None:
        self.admin_reason = reason or self.default_reason
        if self.admin_reason not in REASONS:
            raise ValueError(f"unknown reason code {self.admin_reason!r}")
        self.reason = ADMIN_ONLY_REASONS.get(self.admin_reason, self.admin_reason)
        if self.reason != self.admin_reason:
            public_message = None
        self.public_message = public_message or REASONS[self.reason]
        self.detail = detail
        self.violations: tuple[Violation, ...] = tuple(violations)
        self.context: Mapping[str, Any] = MappingProxyType(dict(context or {}))
        super().__init__(self.admin_reason, detail or self.public_message)

    def __str__(self) -> str:
        text = f"{self.admin_reason}: {self.detail or self.public_message}"
        if self.violations:
            text += "".join(f"\n  {v.path}: {v.message}" for v in self.violations)
        return text

    def to_public(self) -> dict[str, Any]:
        """What a remote caller may see (no detail, no context)."""
        out: dict[str, Any] = {"reason": self.reason, "message": self.public_message}
        if self.violations and self.expose_violations:
            out["violations"] = [v.to_dict() for v in self.violations]
        return out

    # Violations of a caller's own input (their variables) are safe to return to
    # them; violations found in administrators' files are not.
    expose_violations: ClassVar[bool] = False


class SiteConfigError(MepError):
    """A file an administrator wrote (mapping, policy, template, settings) is broken."""

    default_reason = "settings.invalid"


class IdentityError(MepError):
    default_reason = "identity.no_mapping"


class IdentityConfigError(IdentityError, SiteConfigError):
    default_reason = "identity.mapping_invalid"


class AuthzError(MepError):
    default_reason = "authz.denied"


class AuthzConfigError(AuthzError, SiteConfigError):
    default_reason = "authz.policy_invalid"


class ConfigError(MepError):
    """A caller's variables or the rendering of a template failed."""

    default_reason = "config.render_failed"
    expose_violations = True


class TemplateConfigError(ConfigError, SiteConfigError):
    default_reason = "config.template_invalid"
    expose_violations = False


class SpawnError(MepError):
    default_reason = "spawn.start_failed"


class ChannelError(MepError):
    default_reason = "channel.frame_invalid"


class TaskError(MepError):
    default_reason = "task.failed"


class AuthError(MepError):
    default_reason = "auth.invalid_token"


class ApiError(MepError):
    default_reason = "api.bad_request"


class StoreError(MepError):
    """The task store cannot be used: ``store.invalid`` at start (empty, foreign or
    unreadable file), ``store.unavailable`` when a write fails (disk full, I/O error)."""

    default_reason = "store.unavailable"
