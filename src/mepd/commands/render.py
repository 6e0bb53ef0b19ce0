"""``mepd render``: render a user endpoint configuration template as the daemon would.

For administrators writing or debugging a template: reads the site files, validates
the variables, renders, validates the endpoint config, and prints the YAML (or, with
``--json``, the validated config and its config key). ``_GC.user_runtime`` is what mep's
client would send from this machine unless ``--user-runtime`` gives one. Keys the
template sets that mep
accepts and ignores (Globus Compute keys it cannot honour) are listed on stderr as
warnings. ``_GC.env`` is the site's user environment file (the user endpoint has its
full environment); ``_GC.parent_config`` is ``--parent-config`` (empty without it). It
deliberately starts nothing and does not drop privileges: it is a dry run of
``mepcore.config``.

Exit status: 0 rendered; 1 the variables or the rendering were refused (the reason
code and every violation on stderr); 2 a usage error, an unreadable or invalid input
file, or an unknown ``--user``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from mepcore.config import EndpointConfig, SiteFiles
    from mepcore.types import Account, Identity

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2
_MAX_INPUT_BYTES = 16 * 1_048_576


class _InputError(Exception):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--template", required=True, metavar="FILE", help="user_config_template.yaml.j2"
    )
    parser.add_argument("--schema", metavar="FILE", help="user_config_schema.json")
    parser.add_argument(
        "--environment",
        metavar="FILE",
        help="user_environment.yaml (checked; its variables are _GC.env)",
    )
    parser.add_argument(
        "--user-config",
        metavar="JSON|@FILE",
        default="{}",
        help="the user's variables: JSON text, or @FILE to read it from a file",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="fill _GC.mapped_identity.local from this account (default: the current user)",
    )
    parser.add_argument(
        "--mapped-identity",
        metavar="FILE",
        help="JSON identity document for _GC.mapped_identity.id / .identity",
    )
    parser.add_argument(
        "--user-runtime",
        metavar="FILE",
        help="JSON object for _GC.user_runtime (default: what mep's client on this machine sends)",
    )
    parser.add_argument("--parent-config", metavar="FILE", help="JSON object for _GC.parent_config")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the validated endpoint config as JSON with its config_key",
    )


def _read(path: str, what: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise _InputError(f"{what} {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_INPUT_BYTES:
        raise _InputError(f"{what} {path}: larger than {_MAX_INPUT_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _InputError(f"{what} {path}: not valid UTF-8") from exc


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _InputError(f"{what}: invalid JSON at {exc.lineno}:{exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise _InputError(f"{what}: nested too deeply") from exc


def _print_error(exc: Exception) -> None:
    from mepcore.errors import MepError

    if isinstance(exc, MepError):
        sys.stderr.write(f"mepd render: {exc.reason}: {exc.detail or exc.public_message}\n")
        for violation in exc.violations:
            sys.stderr.write(f"  {violation.path}: {violation.message}\n")
    else:
        sys.stderr.write(f"mepd render: {exc}\n")


@attrs.frozen
class _Inputs:
    """Everything one rendering needs, read from the files the command line names."""

    site: SiteFiles
    variables: Any
    account: Account
    identity: Identity | None
    user_runtime: dict[str, Any] | None
    parent_config: dict[str, Any] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Inputs:
        from mepcore.config import SiteFiles
        from mepcore.types import Identity

        site = SiteFiles.from_files(args.template, args.schema, args.environment)
        raw = args.user_config
        variables_text = _read(raw[1:], "--user-config") if raw.startswith("@") else raw
        variables = _json(variables_text, "--user-config")
        account = _account(args.user)
        identity = None
        if args.mapped_identity is not None:
            document = _json_file(args.mapped_identity, "--mapped-identity")
            identity = Identity.from_mapping(document)
        return cls(
            site=site,
            variables=variables,
            account=account,
            identity=identity,
            user_runtime=_runtime(args.user_runtime),
            parent_config=_json_object(args.parent_config, "--parent-config"),
        )


def _json_file(path: str, what: str) -> Any:
    return _json(_read(path, what), what)


def _account(name: str | None) -> Account:
    """The named account, or the current user's (a placeholder when it has no entry)."""
    from mepcore.ports import SystemAccountDatabase
    from mepcore.types import Account

    accounts = SystemAccountDatabase()
    if name is not None:
        account = accounts.by_name(name)
        if account is None or account.name != name:
            raise _InputError(f"--user {name}: no such account")
        return account
    return accounts.by_uid(os.getuid()) or Account(
        name="nobody-placeholder", uid=os.getuid(), gid=os.getgid(), home="/", shell=""
    )


def _runtime(path: str | None) -> dict[str, Any]:
    """``--user-runtime``, else what the client sends from here: a template that reads
    the runtime (Globus Compute's default one does) renders as for a real submission."""
    if path is not None:
        return _json_object(path, "--user-runtime") or {}
    from mepcore.client.service import user_runtime

    return user_runtime()


def _json_object(path: str | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    value = _json_file(path, what)
    if not isinstance(value, dict):
        raise _InputError(f"{what}: must be a JSON object")
    return value


def _render(inputs: _Inputs) -> tuple[dict[str, Any], str, EndpointConfig]:
    """The checked variables, the rendered text and the endpoint config it parses to."""
    from mepcore.config import (
        MappedIdentity,
        parse_endpoint_config,
        render_template,
        validate_variables,
    )

    site = inputs.site
    checked = validate_variables(inputs.variables, site.schema)
    text = render_template(
        site.template_text,
        checked,
        mapped=MappedIdentity(account=inputs.account, identity=inputs.identity),
        user_runtime=inputs.user_runtime,
        parent_config=inputs.parent_config,
        environment=site.environment,
        includes=site.includes,
        template_name=site.template_name,
    )
    return checked, text, parse_endpoint_config(text)


def run(args: argparse.Namespace) -> int:
    from mepcore.config import config_key
    from mepcore.errors import ConfigError, MepError

    try:
        inputs = _Inputs.from_args(args)
    except (_InputError, MepError) as exc:  # MepError: a site file or identity that is not one
        _print_error(exc)
        return EXIT_USAGE
    try:
        checked, text, config = _render(inputs)
    except ConfigError as exc:
        _print_error(exc)
        return EXIT_NEGATIVE
    for warning in config.warnings:
        sys.stderr.write(f"mepd render: warning: {warning.path}: {warning.message}\n")
    if args.json:
        out = {
            "config": config.to_dict(),
            "config_key": config_key(inputs.account.name, inputs.site.template_digest, checked),
        }
        sys.stdout.write(json.dumps(out, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK
