"""``mepd map``: map identities read on stdin with a mapping file, and explain the result.

What administrators run to debug a mapping. Reads ``{"identities": [...]}``, a bare
list of identity objects, or one identity object on stdin and prints one JSON object:
``username``, ``matched_identity``, ``mapper``, ``rule``, ``candidates``, ``skipped``
(expression documents that could not be evaluated for these identities, and why),
``account`` and ``error`` (a reason code or null: the specific one, such as
``identity.account_uid_too_low``, where a caller of the daemon sees only
``identity.account_refused``).

Where the mapping and the account rules come from: ``--mapping-config FILE`` with the
rules as flags (``--min-uid``, ``--deny``; the account checks then use this tool's own
uid as the daemon's uid), or ``--config FILE [--endpoint NAME]``: the endpoint's
``mapping`` and the settings' ``min_uid``, ``deny_accounts`` and ``allow_nologin_shell``,
checked exactly as the daemon checks them (``mepd.sites.account_policy``, locked and
expired accounts included when run as root). With neither, the settings are
``$MEPD_CONFIG`` or ``/etc/mep/mepd.yaml``. Run it as the account the daemon runs as to
see exactly what the daemon would decide.

Exit status: 0 mapped and the account accepted (with ``--no-account-check``: a portable
name was produced); 1 not mapped, the mapping program failed, or the account was
refused (the JSON says which, a line on stderr gives the detail); 2 the mapping file,
the settings or the input is invalid (one line on stderr naming the file, nothing on
stdout). ``--json``: the answer also carries ``detail`` (what the stderr line says),
and an invalid file or input is a JSON answer too (``{"error": "usage", "detail": …}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from mepcore.identity import AccountPolicy, IdentityMapper
    from mepcore.ports import ShadowDatabase
    from mepcore.types import IdentitySet

MAX_INPUT_BYTES = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--mapping-config",
        metavar="FILE",
        help="identity mapping file (a JSON list of Globus Connect Server mapping documents)",
    )
    source.add_argument(
        "--config",
        metavar="FILE",
        help="the settings YAML: the endpoint's mapping and the settings' account rules "
        "(default without --mapping-config: $MEPD_CONFIG, else /etc/mep/mepd.yaml)",
    )
    parser.add_argument("--endpoint", metavar="NAME", help="the endpoint of --config to use")
    parser.add_argument(
        "--json", action="store_true", help="detail in the JSON answer; errors as JSON too"
    )
    parser.add_argument(
        "--no-account-check",
        action="store_true",
        help="do not look the account up; only check that the name is a portable user name",
    )
    parser.add_argument(
        "--min-uid",
        type=int,
        default=None,
        metavar="N",
        help="smallest uid a mapping may produce (default 1000; uid 0 is always refused)",
    )
    parser.add_argument(
        "--deny",
        action="append",
        default=[],
        metavar="NAME",
        help="an account name that may never be used (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time limit for an external mapping program (default 10)",
    )


def _fail_usage(args: argparse.Namespace, message: str) -> int:
    line = " ".join(message.split())
    sys.stderr.write(f"mepd map: {line}\n")
    if args.json:
        sys.stdout.write(json.dumps({"error": "usage", "detail": line}) + "\n")
    return 2


@attrs.frozen
class _Source:
    """The mapping and the account rules to check its result with."""

    mapper: IdentityMapper
    policy: AccountPolicy
    shadow: ShadowDatabase | None = None


class _UsageError(Exception):
    """An option, the mapping file or the input cannot be used (exit 2)."""


def run(args: argparse.Namespace) -> int:
    from mepcore.errors import IdentityError
    from mepcore.identity import is_portable_username

    try:
        source = _load_source(args)
        identities = _read_identities()
    except _UsageError as exc:
        return _fail_usage(args, exc.args[0])
    out: dict[str, Any] = {
        "username": None,
        "matched_identity": None,
        "mapper": None,
        "rule": None,
        "candidates": [],
        "skipped": [],
        "account": None,
        "error": None,
    }
    answer = partial(_answer, with_detail=args.json)
    try:
        result = source.mapper.map(identities)
    except IdentityError as exc:
        out["candidates"] = list(exc.context.get("candidates", []))
        return answer(out, exc.admin_reason, exc.detail)
    out.update(result.to_dict())
    if result.username is None:
        return answer(out, "identity.no_mapping", "no mapping rule matched these identities")
    if not args.no_account_check:
        return _answer_with_account(out, result.username, source, answer)
    if not is_portable_username(result.username):
        return answer(
            out,
            "identity.invalid_username",
            f"{result.username!r} is not a portable POSIX user name",
        )
    return answer(out, None, "")


def _load_source(args: argparse.Namespace) -> _Source:
    """The mapping file and account rules of the flags, or of the settings."""
    from mepcore.identity import AccountPolicy

    if not args.timeout > 0:
        raise _UsageError("--timeout must be positive")
    if args.mapping_config is None:
        return _source_of_settings(args)
    if args.endpoint:
        raise _UsageError("--endpoint needs --config")
    min_uid = 1000 if args.min_uid is None else args.min_uid
    if min_uid < 0:
        raise _UsageError("--min-uid must not be negative")
    policy = AccountPolicy(min_uid=min_uid, daemon_uid=os.getuid(), deny=args.deny)
    return _Source(_load_mapper(args.mapping_config, args.timeout), policy)


def _source_of_settings(args: argparse.Namespace) -> _Source:
    """The endpoint's mapping and the daemon's own account checks (``--config``)."""
    from mepcore.errors import MepError
    from mepcore.ports import SystemShadowDatabase
    from mepd.cli import default_config
    from mepd.settings import Settings
    from mepd.sites import account_policy

    if args.min_uid is not None or args.deny:
        raise _UsageError("--min-uid and --deny go with --mapping-config; --config has its own")
    config = args.config or default_config()
    try:
        settings = Settings.from_file(config)
    except MepError as exc:
        raise _UsageError(exc.detail or str(exc)) from exc
    chosen = [ep for ep in settings.endpoints if args.endpoint in (None, ep.name)]
    if not chosen:
        raise _UsageError(f"{config}: no endpoint {args.endpoint!r}")
    if len(chosen) > 1:
        raise _UsageError(f"{config} has several endpoints: choose one with --endpoint")
    # As the daemon: unprivileged, /etc/shadow cannot be read and is not consulted.
    shadow = SystemShadowDatabase() if os.geteuid() == 0 else None
    return _Source(
        _load_mapper(str(chosen[0].mapping), args.timeout),
        account_policy(settings, os.geteuid()),
        shadow,
    )


def _load_mapper(path: str, timeout: float) -> IdentityMapper:
    from mepcore.errors import IdentityConfigError
    from mepcore.identity import IdentityMapper

    try:
        return IdentityMapper.from_file(path, timeout=timeout)
    except IdentityConfigError as exc:
        # Every problem at once, on the one line: fixing them one run at a time is slow.
        problems = "; ".join(f"{v.path}: {v.message}" for v in exc.violations)
        raise _UsageError(f"{path}: {problems}" if problems else exc.detail) from exc


def _read_identities() -> IdentitySet:
    from mepcore.errors import IdentityError
    from mepcore.types import IdentitySet

    raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    if len(raw) > MAX_INPUT_BYTES:
        raise _UsageError(f"input: larger than {MAX_INPUT_BYTES} bytes")
    try:
        return IdentitySet.from_json(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        raise _UsageError(f"input: not valid JSON: {exc}") from exc
    except IdentityError as exc:
        raise _UsageError(f"input: {exc.detail or exc.public_message}") from exc


def _answer_with_account(
    out: dict[str, Any], username: str, source: _Source, answer: Callable[..., int]
) -> int:
    """Check the mapped account as the daemon would, and answer with it."""
    from mepcore.errors import IdentityError
    from mepcore.identity import check_account
    from mepcore.ports import SystemAccountDatabase

    today = int(time.time() // 86400)
    try:
        account = check_account(
            username, SystemAccountDatabase(), source.policy, shadow=source.shadow, today=today
        )
    except IdentityError as exc:
        # The specific code (what a caller sees is ``identity.account_refused``).
        return answer(out, exc.admin_reason, exc.detail)
    out["account"] = {
        "name": account.name,
        "uid": account.uid,
        "gid": account.gid,
        "home": account.home,
        "shell": account.shell,
        "groups": list(account.group_names),
    }
    return answer(out, None, "")


def _answer(out: dict[str, Any], error: str | None, detail: str, *, with_detail: bool) -> int:
    out["error"] = error
    if with_detail:
        out["detail"] = " ".join(detail.split()) or None
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    sys.stdout.flush()
    if error is None:
        return 0
    sys.stderr.write(f"mepd map: {error}: {' '.join(detail.split())}\n")
    return 1
