"""``mepd status`` and ``mepd reload``: talk to the running daemon over its admin socket.

The socket is ``<state_dir>/admin.sock`` (mode 0600, root's): only root (or the daemon's
own account) can use these commands. ``status`` prints the daemon's state as JSON
(``--json`` too, and then an unreachable daemon is also a JSON answer:
``{"ok": false, "error": ...}``); ``reload`` makes it load mapping, policy, templates
and issuer keys again and prints what failed to load (the previous version of such a
file stays in force). Without ``--config`` or ``--state-dir`` the settings are
``$MEPD_CONFIG`` or ``/etc/mep/mepd.yaml`` (``mepd.cli``).

Exit status: 0 success, 1 the reload reported problems, 2 the daemon cannot be reached
(the message names the settings file or the socket).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", metavar="FILE", help="the settings YAML (for its state_dir)")
    group.add_argument("--state-dir", metavar="DIR", help="the daemon's state directory")


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument(
        "--json", action="store_true", help="JSON on stdout, also when the daemon is unreachable"
    )


def add_reload_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)


add_arguments = add_status_arguments


def _ask(args: argparse.Namespace, command: str) -> Any:
    from mepcore.errors import MepError
    from mepd.daemon import ADMIN_SOCKET, admin_request
    from mepd.settings import Settings

    try:
        state = (
            Path(args.state_dir) if args.state_dir else Settings.from_file(args.config).state_dir
        )
    except MepError as exc:
        return _unreachable(args, command, str(exc))
    socket_path = state / ADMIN_SOCKET
    try:
        return admin_request(state, {"command": command})
    except (MepError, OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return _unreachable(args, command, f"{socket_path}: {reason}")


def _unreachable(args: argparse.Namespace, command: str, why: str) -> None:
    sys.stderr.write(f"mepd {command}: cannot reach the daemon: {why}\n")
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps({"ok": False, "error": why}) + "\n")


def run_status(args: argparse.Namespace) -> int:
    answer = _ask(args, "status")
    if answer is None:
        return 2
    sys.stdout.write(json.dumps(answer.get("status", answer), indent=2, sort_keys=True) + "\n")
    return 0 if answer.get("ok") else 1


def run_reload(args: argparse.Namespace) -> int:
    answer = _ask(args, "reload")
    if answer is None:
        return 2
    sys.stdout.write(json.dumps(answer, indent=2, sort_keys=True) + "\n")
    for problem in answer.get("problems", []):
        sys.stderr.write(f"mepd reload: {problem}\n")
    return 0 if answer.get("ok") else 1


run = run_status
