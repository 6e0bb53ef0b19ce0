"""``mepd token issue``: print a token of the daemon's local issuer.

``mepd token issue --config FILE --identity alice@example.org [--linked ID …] [--mfa]
[--ttl 1h]`` signs a JWT (EdDSA) with the local issuer's key in the state directory
(created, mode 0600, if absent). The identity's id is derived from its name, so the same
name always yields the same identity. Only root (who can read the key) can issue.
"""

from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    match = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 90s, 15m, 1h, 7d)")
    return float(int(match.group(1)) * _UNITS[match.group(2) or "s"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    issue = sub.add_parser("issue", help="print a token for an identity")
    issue.add_argument("--config", required=True, metavar="FILE", help="the settings YAML")
    issue.add_argument(
        "--identity",
        required=True,
        metavar="USERNAME",
        help="the identity's username, e.g. alice@example.org",
    )
    issue.add_argument(
        "--linked",
        action="append",
        default=[],
        metavar="USERNAME",
        help="a linked identity (repeatable)",
    )
    issue.add_argument("--email", metavar="ADDRESS", help="an email claim")
    issue.add_argument("--mfa", action="store_true", help="mark the authentication as MFA")
    issue.add_argument(
        "--ttl",
        type=parse_ttl,
        default=3600.0,
        metavar="DURATION",
        help="lifetime (default 1h; at most the issuer's max_ttl)",
    )


def run(args: argparse.Namespace) -> int:
    from mepcore.errors import MepError
    from mepd.auth import issue_local_token, load_or_create_local_key
    from mepd.settings import Settings

    try:
        settings = Settings.from_file(args.config)
        issuer = settings.local_issuer
        if issuer is None:
            sys.stderr.write("mepd token: the settings have no local issuer\n")
            return 2
        if args.ttl > issuer.max_ttl:
            sys.stderr.write(f"mepd token: --ttl exceeds the issuer's max_ttl {issuer.max_ttl}s\n")
            return 2
        key = load_or_create_local_key(settings.state_dir)
    except (MepError, OSError) as exc:
        sys.stderr.write(f"mepd token: {exc}\n")
        return 2
    token = issue_local_token(
        key, issuer, args.identity, linked=args.linked, mfa=args.mfa, ttl=args.ttl, email=args.email
    )
    sys.stdout.write(token + "\n")
    return 0
