"""``mepd serve --config FILE``: run the daemon in the foreground (systemd runs it so).

Exit status: 0 after a clean drain (SIGTERM), 2 when the settings or a file they point
to cannot be loaded (one line per problem on stderr; ``mepd check`` lists them all), or
when the task store cannot be used (``--fresh-store`` sets it aside and starts anew).
``--keep-endpoints``: SIGTERM leaves the user endpoints running for the next mepd (an
in-place upgrade, docs/admin-guide.md).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the settings YAML")
    parser.add_argument(
        "--fresh-store",
        action="store_true",
        help="if the task store cannot be used (empty, foreign, damaged beyond reading), "
        "rename it to <name>.<time>.bad and start with a new, empty one",
    )
    parser.add_argument(
        "--keep-endpoints",
        action="store_true",
        help="on SIGTERM, close the API and the store but leave the user endpoints running "
        "with their tasks, for the next mepd to re-adopt (an in-place upgrade; needs "
        "restart.adopt_endpoints: true)",
    )


def run(args: argparse.Namespace) -> int:
    from mepcore.errors import MepError
    from mepd.daemon import Daemon
    from mepd.logs import configure_logging
    from mepd.settings import Settings

    try:
        settings = Settings.from_file(args.config)
    except MepError as exc:
        sys.stderr.write(f"mepd serve: {exc}\n")
        return 2
    configure_logging(settings.log_level)
    try:
        if args.keep_endpoints and not settings.restart.adopt_endpoints:
            sys.stderr.write(
                "mepd serve: --keep-endpoints needs restart.adopt_endpoints: true "
                "(endpoints started without it die with the daemon)\n"
            )
            return 2
        from mepd.malloc import pin_thresholds

        pin_thresholds()
        daemon = Daemon.open(settings, fresh_store=args.fresh_store)
        daemon.keep_endpoints = args.keep_endpoints
        return daemon.run()
    except MepError as exc:
        sys.stderr.write(f"mepd serve: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"mepd serve: {exc}\n")
        return 2
