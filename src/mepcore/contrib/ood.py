"""``mep-ood-map``: Open OnDemand's ``user_map_cmd``, answered with a mep mapping file.

Open OnDemand's Apache module runs ``user_map_cmd`` with the authenticated user
(``REMOTE_USER``, URL-encoded as in a form: ``alice%40campus.edu``) appended as the last
argument, reads the first line of standard output as the local user name, and refuses
the request when that line is empty. This program maps the name with a mep
identity-mapping file and applies mep's account checks (``LoginGate``), so one mapping
file and one set of safety rules serve mepd and Open OnDemand::

    user_map_cmd: "/opt/mep/bin/mep-ood-map --mapping-config /etc/mep/mapping.json"

Answers: exit 0 with the account name and a newline on stdout when the name maps to an
account that may be used; exit 1 with *nothing* on stdout when it does not map or the
account is refused (one line on stderr, which Apache writes to its error log, says why:
``mep-ood-map: identity.account_root: account 'root' refused: uid 0``); exit 2 with
nothing on stdout when the options or the mapping file are unusable.

The remote user is always the **last** argument, whatever it looks like: a remote user
named ``--allow-nologin-shell`` is a name to map, never an option (options come before
it, from ``ood_portal.yml``). ``--no-decode`` takes it literally, for calling by hand.
Help and every message go to stderr, so stdout never holds anything but a mapped name.

The account checks use this program's own uid as the service's uid (the Apache account
Open OnDemand runs it as is refused, as is uid 0 and every uid below ``--min-uid``).
Locked and expired accounts are refused only when the program can read
``/etc/shadow`` (as root); otherwise Apache's own account checks (PAM) apply.

Deliberately not here: the policy (Open OnDemand asks only for the name) and any
caching (every request maps anew, like mepd).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = ["PROG", "build_parser", "main", "map_remote_user"]

PROG = "mep-ood-map"
EXIT_MAPPED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """Help goes to stderr: stdout carries a mapped account name and nothing else."""

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_help(file if file is not None else sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} --mapping-config FILE [options] REMOTE_USER",
        description=(
            "Map Open OnDemand's remote user to a local account with a mep identity-mapping "
            "file and mep's account checks; print the account name, or nothing and exit 1."
        ),
        epilog=(
            "REMOTE_USER is always the last argument and is URL-decoded (Open OnDemand "
            "passes it URL-encoded) unless --no-decode is given."
        ),
    )
    parser.add_argument(
        "--mapping-config",
        required=True,
        metavar="FILE",
        help="mep identity mapping file (a JSON list of mapping documents)",
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
        "--allow-nologin-shell",
        action="store_true",
        help="accept accounts whose shell is nologin or false (refused by default)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time limit for an external mapping program (default 10)",
    )
    parser.add_argument(
        "--no-decode",
        action="store_true",
        help="take REMOTE_USER literally instead of URL-decoding it",
    )
    return parser


class _UsageError(Exception):
    """The options or the mapping file cannot be used (exit 2)."""


def _split(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """Options, and the remote user: always the last argument (after an optional ``--``)."""
    if not argv:
        return [], None
    *options, remote = argv
    if options and options[-1] == "--":
        options.pop()
    return options, remote


def map_remote_user(remote_user: str, args: argparse.Namespace) -> str:
    """The local account name for Open OnDemand's remote user, or ``IdentityError``.

    ``_UsageError`` when the options or the mapping file are unusable."""
    from mepcore.contrib.login import LoginGate
    from mepcore.errors import IdentityConfigError
    from mepcore.identity import AccountPolicy
    from mepcore.ports import SystemShadowDatabase

    if args.min_uid < 0:
        raise _UsageError("--min-uid must not be negative")
    if not args.timeout > 0:
        raise _UsageError("--timeout must be positive")
    policy = AccountPolicy(
        min_uid=args.min_uid,
        daemon_uid=os.getuid(),
        deny=args.deny,
        allow_nologin_shell=args.allow_nologin_shell,
    )
    # Unprivileged, /etc/shadow cannot be read: the check is skipped, as in mepd.
    shadow = SystemShadowDatabase() if os.geteuid() == 0 else None
    try:
        gate = LoginGate.from_file(
            args.mapping_config, policy=policy, shadow=shadow, timeout=args.timeout
        )
    except IdentityConfigError as exc:
        problems = "; ".join(f"{v.path}: {v.message}" for v in exc.violations)
        raise _UsageError(f"{args.mapping_config}: {problems}" if problems else exc.detail) from exc
    login = remote_user if args.no_decode else unquote_plus(remote_user, errors="strict")
    return gate.resolve(login).account.name


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG}: {' '.join(message.split())}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 mapped, 1 refused, 2 usage)."""
    from mepcore.errors import IdentityError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    options, remote = _split(argv)
    if remote is None or (not options and remote in ("-h", "--help")):
        # Nothing to map: how to call it, on stderr (exit 0 when asked for).
        parser.print_help()
        return EXIT_MAPPED if remote else EXIT_USAGE
    try:
        args = parser.parse_args(options)
    except SystemExit as exc:  # argparse already said what is wrong on stderr
        return EXIT_USAGE if exc.code else EXIT_MAPPED
    try:
        name = map_remote_user(remote, args)
    except _UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except UnicodeDecodeError:
        _say("identity.input_invalid: the remote user is not URL-encoded UTF-8")
        return EXIT_REFUSED
    except IdentityError as exc:
        # The specific code (why the account was refused) is for the administrator.
        _say(f"{exc.admin_reason}: {exc.detail or exc.public_message}")
        return EXIT_REFUSED
    sys.stdout.write(name + "\n")
    sys.stdout.flush()
    return EXIT_MAPPED


if __name__ == "__main__":
    raise SystemExit(main())
