"""``mepd map``: map identities read on stdin with a mapping file, and explain the result.

What administrators run to debug a mapping. Reads ``{"identities": [...]}``, a bare
list of identity objects, or one identity object on stdin and prints one JSON object:
``username``, ``matched_identity``, ``mapper``, ``rule``, ``candidates``, ``account``
and ``error`` (a reason code or null: the specific one, such as
``identity.account_uid_too_low``, where a caller of the daemon sees only
``identity.account_refused``).

Exit status: 0 mapped and the account accepted (with ``--no-account-check``: a portable
name was produced); 1 not mapped, the mapping program failed, or the account was
refused (the JSON says which, a line on stderr gives the detail); 2 the mapping file or
the input is invalid (one line on stderr, nothing on stdout).

The account checks use this tool's own uid (``os.getuid()``) as the daemon's uid, so
run it as the account the daemon runs as to see exactly what the daemon would decide.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mepcore.identity import IdentityMapper
    from mepcore.types import IdentitySet

MAX_INPUT_BYTES = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mapping-config",
        required=True,
        metavar="FILE",
        help="identity mapping file (a JSON list of Globus Connect Server mapping documents)",
    )
    parser.add_argument(
        "--no-account-check",
        action="store_true",
        help="do not look the account up; only check that the name is a portable user name",
    )
    parser.add_argument(
        "--min-uid",
        type=int,
        default=1000,
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


def _fail_usage(message: str) -> int:
    sys.stderr.write(f"mepd map: {' '.join(message.split())}\n")
    return 2


class _UsageError(Exception):
    """An option, the mapping file or the input cannot be used (exit 2)."""


def run(args: argparse.Namespace) -> int:
    from mepcore.errors import IdentityError
    from mepcore.identity import is_portable_username

    try:
        mapper = _load_mapper(args)
        identities = _read_identities()
    except _UsageError as exc:
        return _fail_usage(exc.args[0])
    out: dict[str, Any] = {
        "username": None,
        "matched_identity": None,
        "mapper": None,
        "rule": None,
        "candidates": [],
        "account": None,
        "error": None,
    }
    try:
        result = mapper.map(identities)
    except IdentityError as exc:
        out["candidates"] = list(exc.context.get("candidates", []))
        return _answer(out, exc.admin_reason, exc.detail)
    out.update(result.to_dict())
    if result.username is None:
        return _answer(out, "identity.no_mapping", "no mapping rule matched these identities")
    if not args.no_account_check:
        return _answer_with_account(out, result.username, args)
    if not is_portable_username(result.username):
        return _answer(
            out,
            "identity.invalid_username",
            f"{result.username!r} is not a portable POSIX user name",
        )
    return _answer(out, None, "")


def _load_mapper(args: argparse.Namespace) -> IdentityMapper:
    from mepcore.errors import IdentityConfigError
    from mepcore.identity import IdentityMapper

    if args.min_uid < 0:
        raise _UsageError("--min-uid must not be negative")
    if not args.timeout > 0:
        raise _UsageError("--timeout must be positive")
    try:
        return IdentityMapper.from_file(args.mapping_config, timeout=args.timeout)
    except IdentityConfigError as exc:
        # Every problem at once, on the one line: fixing them one run at a time is slow.
        problems = "; ".join(f"{v.path}: {v.message}" for v in exc.violations)
        raise _UsageError(f"{args.mapping_config}: {problems}" if problems else exc.detail) from exc


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


def _answer_with_account(out: dict[str, Any], username: str, args: argparse.Namespace) -> int:
    """Check the mapped account as the daemon would, and answer with it."""
    from mepcore.errors import IdentityError
    from mepcore.identity import AccountPolicy, check_account
    from mepcore.ports import SystemAccountDatabase

    policy = AccountPolicy(min_uid=args.min_uid, daemon_uid=os.getuid(), deny=args.deny)
    try:
        account = check_account(username, SystemAccountDatabase(), policy)
    except IdentityError as exc:
        # The specific code (what a caller sees is ``identity.account_refused``).
        return _answer(out, exc.admin_reason, exc.detail)
    out["account"] = {
        "name": account.name,
        "uid": account.uid,
        "gid": account.gid,
        "home": account.home,
        "shell": account.shell,
        "groups": list(account.group_names),
    }
    return _answer(out, None, "")


def _answer(out: dict[str, Any], error: str | None, detail: str) -> int:
    out["error"] = error
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    sys.stdout.flush()
    if error is None:
        return 0
    sys.stderr.write(f"mepd map: {error}: {' '.join(detail.split())}\n")
    return 1
