"""``mep``: the scientists' command line (``mep logs ENDPOINT``).

A small argparse program with one subcommand per action. Each subcommand is a function
``(args, client) -> int`` registered in ``SUBCOMMANDS`` with the function that adds its
own arguments; the service comes from ``--url``/``MEP_URL`` and the token from
``--token``/``MEP_TOKEN``, as for the ``Executor``. Adding a subcommand means adding a
pair there; nothing else changes.

Errors are one line on stderr naming the reason code, exit status 1 (2 for usage);
never a traceback. Deliberately not here: anything the ``Client`` does not offer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from mepcore.client import login_cli
from mepcore.client.errors import ClientError
from mepcore.client.service import Client
from mepcore.errors import MepError

Run = Callable[[argparse.Namespace, Client], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


def _logs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", help="the endpoint's name on the daemon")
    parser.add_argument(
        "-n",
        "--lines",
        type=int,
        default=200,
        help="how many of the last lines to show (1 to 5000, default 200)",
    )


def _logs(args: argparse.Namespace, client: Client) -> int:
    answer = client.log(args.endpoint, args.lines)
    if not answer.get("exists"):
        print(f"mep: no endpoint log yet at {answer.get('path')}", file=sys.stderr)
        return 0
    for line in answer.get("lines", []):
        print(line)
    return 0


# name -> (help, add its arguments, run it)
SUBCOMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "logs": (
        "show your endpoint log (start, endpoint_setup output, failures)",
        _logs_arguments,
        _logs,
    ),
    "login": (
        "log in to the daemon (device login, or --client-id for a robot)",
        login_cli.login_arguments,
        login_cli.run_login,
    ),
    "logout": ("forget the login to the daemon", lambda _: None, login_cli.run_logout),
    "whoami": ("show who you are logged in as", lambda _: None, login_cli.run_whoami),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mep", description="mep, the scientists' side.")
    parser.add_argument("--url", help="the daemon's URL (default: $MEP_URL)")
    parser.add_argument("--token", help="bearer token (default: $MEP_TOKEN)")
    parser.add_argument(
        "--ca-bundle", help="CA bundle to verify the daemon's certificate (default: system)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, run = SUBCOMMANDS[args.command]
    options: dict[str, object] = {}
    if args.ca_bundle:
        options["verify"] = args.ca_bundle
    try:
        with Client.from_environment(
            os.environ if environ is None else environ, args.url, token=args.token, **options
        ) as client:
            return run(args, client)
    except (ClientError, MepError) as exc:
        # The detail: this process's own (no URL given…) or the daemon's public message.
        print(f"mep: {exc.reason}: {exc.detail or exc.public_message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
