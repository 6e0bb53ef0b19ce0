"""``mepd functions list``: the functions registered with the running daemon.

An administrator needs function ids for ``allowed_functions`` and for policy lines
(``function:<id>``, ``g2`` sets). This command asks the running daemon over its admin
socket (``<state_dir>/admin.sock``, root's, like ``mepd status``); the daemon answers
from its own task store, so the store is never opened a second time. One line per
function, newest first: id (sha256 hex of the serialized function, as ``POST
/v1/functions`` answers it), registration time (UTC, RFC 3339) and the name the client
gave; ``--json`` prints the list as JSON instead.

Exit status: 0 listed (also when none is registered), 2 the daemon cannot be reached or
refused the request. Deliberately not here: showing or deleting function bodies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="functions_command", metavar="ACTION")
    listing = sub.add_parser("list", help="list the registered functions, newest first")
    where = listing.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="FILE", help="the settings YAML (for its state_dir)")
    where.add_argument("--state-dir", metavar="DIR", help="the daemon's state directory")
    listing.add_argument("--name", metavar="TEXT", help="only functions whose name contains TEXT")
    listing.add_argument(
        "--limit", type=int, default=1000, metavar="N", help="at most N functions (1..10000)"
    )
    listing.add_argument("--json", action="store_true", help="print the list as JSON")


def _when(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def format_table(functions: list[dict[str, Any]]) -> str:
    """The listing as text: a header, then id, registered, name per line."""
    lines = [f"{'FUNCTION ID':<64}  {'REGISTERED':<20}  NAME"]
    lines += [
        f"{f['function_id']:<64}  {_when(f['registered']):<20}  {f['name'] or '-'}"
        for f in functions
    ]
    return "\n".join(lines) + "\n"


def _ask(args: argparse.Namespace) -> dict[str, Any] | None:
    from mepcore.errors import MepError
    from mepd.daemon import admin_request
    from mepd.settings import Settings

    request: dict[str, Any] = {"command": "functions", "limit": args.limit}
    if args.name is not None:
        request["name"] = args.name
    try:
        state = (
            Path(args.state_dir) if args.state_dir else Settings.from_file(args.config).state_dir
        )
        answer = admin_request(state, request)
    except (MepError, OSError, ValueError) as exc:
        sys.stderr.write(f"mepd functions: cannot reach the daemon: {exc}\n")
        return None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else answer
        sys.stderr.write(f"mepd functions: the daemon refused: {error}\n")
        return None
    return answer


def run(args: argparse.Namespace) -> int:
    if getattr(args, "functions_command", None) != "list":
        sys.stderr.write("mepd functions: choose an action: list\n")
        return EXIT_USAGE
    answer = _ask(args)
    if answer is None:
        return EXIT_USAGE
    functions = list(answer.get("functions", []))
    if args.json:
        sys.stdout.write(json.dumps(functions, indent=2) + "\n")
    else:
        sys.stdout.write(format_table(functions))
    return EXIT_OK
