"""``mepd serve --config FILE``: run the daemon in the foreground (systemd runs it so).

Exit status: 0 after a clean drain (SIGTERM), 2 when the settings or a file they point
to cannot be loaded (one line per problem on stderr; ``mepd check`` lists them all).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the settings YAML")


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
        return Daemon.open(settings).run()
    except MepError as exc:
        sys.stderr.write(f"mepd serve: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"mepd serve: {exc}\n")
        return 2
