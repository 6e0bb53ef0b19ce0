"""The ``mepd`` command line: one dispatcher, one module per subcommand.

Each subcommand lives in ``mepd.commands.<name>`` and provides ``add_arguments(parser)``
and ``run(args) -> int``. The dispatcher imports a subcommand's module only to build
its parser; heavy imports happen inside ``run``. Exit status convention, shared by
every subcommand: 0 success, 1 a negative answer (not mapped, denied, render failed,
tests failed), 2 a usage, configuration or input error with a one-line message on
stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). A module that does not exist yet is left out of the
# parser rather than breaking every other subcommand.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "map": ("mepd.commands.map", "map identities to a local account (debug a mapping)"),
    "policy": ("mepd.commands.policy", "test and explain authorization policies"),
    "render": ("mepd.commands.render", "render a user endpoint configuration template"),
    "serve": ("mepd.commands.serve", "run the daemon"),
    "check": ("mepd.commands.check", "validate everything a start would load"),
    "token": ("mepd.commands.token", "issue tokens of the local issuer"),
    "status": ("mepd.commands.admin", "show the running daemon's state"),
    "reload": ("mepd.commands.admin", "make the running daemon reload its files"),
    "functions": ("mepd.commands.functions", "list the functions registered with the daemon"),
}

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mepd", description="mep: multi-user function-as-a-service endpoint")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        sp = sub.add_parser(name, help=help_text, description=help_text)
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(sp)
        sp.set_defaults(_run=getattr(module, f"run_{name}", None) or module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return 130
