"""User endpoint configuration: user variables, sandboxed template rendering, endpoint config.

An administrator offers one Jinja2 template (Globus Compute's
``user_config_template.yaml.j2``), an optional JSON Schema for the variables users
send, and an optional environment file. ``SiteFiles.from_files`` reads them (the only
file access here); ``validate_variables`` checks a user's variables; ``render_template``
renders in a bounded sandbox; ``parse_endpoint_config`` turns the YAML into a frozen
``EndpointConfig``; ``config_key`` names the resulting user endpoint. Everything but
``SiteFiles.from_files`` is pure: no files, no environment, no global state.
See docs/config-templates.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mepcore._lazy import lazy_names

if TYPE_CHECKING:
    from mepcore.config.endpoint import (
        DEFAULT_ENGINE_TYPE,
        DEFAULT_HEARTBEAT_PERIOD,
        DEFAULT_IDLE_HEARTBEATS_HARD,
        DEFAULT_IDLE_HEARTBEATS_SOFT,
        ENGINE_TYPES,
        LAUNCHER_TYPES,
        PROVIDER_TYPES,
        EndpointConfig,
        EngineConfig,
        endpoint_config_schema,
        parse_endpoint_config,
        render_endpoint_config,
    )
    from mepcore.config.keys import IGNORED_ENGINE_KEYS, IGNORED_KEYS
    from mepcore.config.limits import RenderLimits, VariableLimits
    from mepcore.config.render import (
        DEFAULT_TEMPLATE_NAME,
        MappedIdentity,
        render_template,
    )
    from mepcore.config.site import (
        SiteFiles,
        load_environment,
        load_schema,
        site_warnings,
        template_digest,
    )
    from mepcore.config.variables import (
        RESERVED_NAMES,
        canonical_json,
        config_key,
        validate_variables,
    )

# Where each public name lives. A name is imported from its module when first asked
# for: a user endpoint renders and parses its configuration (``endpoint``, ``render``)
# and never loads the site files (``site``), which the daemon does.
_HOMES = {
    "endpoint": (
        "DEFAULT_ENGINE_TYPE",
        "DEFAULT_HEARTBEAT_PERIOD",
        "DEFAULT_IDLE_HEARTBEATS_HARD",
        "DEFAULT_IDLE_HEARTBEATS_SOFT",
        "ENGINE_TYPES",
        "LAUNCHER_TYPES",
        "PROVIDER_TYPES",
        "EndpointConfig",
        "EngineConfig",
        "endpoint_config_schema",
        "parse_endpoint_config",
        "render_endpoint_config",
    ),
    "keys": ("IGNORED_ENGINE_KEYS", "IGNORED_KEYS"),
    "limits": ("RenderLimits", "VariableLimits"),
    "render": ("DEFAULT_TEMPLATE_NAME", "MappedIdentity", "render_template"),
    "site": ("SiteFiles", "load_environment", "load_schema", "site_warnings", "template_digest"),
    "variables": ("RESERVED_NAMES", "canonical_json", "config_key", "validate_variables"),
}
__getattr__, __dir__ = lazy_names(__name__, _HOMES, globals())


__all__ = [
    "DEFAULT_ENGINE_TYPE",
    "DEFAULT_HEARTBEAT_PERIOD",
    "DEFAULT_IDLE_HEARTBEATS_HARD",
    "DEFAULT_IDLE_HEARTBEATS_SOFT",
    "DEFAULT_TEMPLATE_NAME",
    "ENGINE_TYPES",
    "IGNORED_ENGINE_KEYS",
    "IGNORED_KEYS",
    "LAUNCHER_TYPES",
    "PROVIDER_TYPES",
    "RESERVED_NAMES",
    "EndpointConfig",
    "EngineConfig",
    "MappedIdentity",
    "RenderLimits",
    "SiteFiles",
    "VariableLimits",
    "canonical_json",
    "config_key",
    "endpoint_config_schema",
    "load_environment",
    "load_schema",
    "parse_endpoint_config",
    "render_endpoint_config",
    "render_template",
    "site_warnings",
    "template_digest",
    "validate_variables",
]
