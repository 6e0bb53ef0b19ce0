"""The ``mepd`` command line: one dispatcher, one module per subcommand.

Each subcommand lives in ``mepd.commands.<name>`` and provides ``add_arguments(parser)``
and ``run(args) -> int``. The dispatcher imports a subcommand's module only to build
its parser; heavy imports happen inside ``run``. Exit status convention, shared by
every subcommand: 0 success, 1 a negative answer (not mapped, denied, render failed,
tests failed), 2 a usage, configuration or input error with a one-line message on
stderr that names the file at fault.

Conventions every subcommand follows, kept here so no subcommand has to:

- ``mepd --version``;
- the settings file: a subcommand whose ``--config`` was required (``serve``, ``check``,
  ``status``, ``reload``, ``functions list``, ``token issue``; ``map`` without
  ``--mapping-config``) uses ``$MEPD_CONFIG``, else ``/etc/mep/mepd.yaml``, when it is
  not given (``--state-dir`` still stands instead of it where a command takes one);
- a closed pipe (``mepd policy test | head``) ends the command quietly, with the
  shell's status for it (141), never with a traceback;
- ``--json`` (``check``, ``policy test``, ``status``, ``map``, ``functions list``): one
  JSON document on stdout, also when the answer is negative; the exit status is the
  same as without it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from mepd import __version__

# name -> (module, one-line help). A module that does not exist yet is left out of the
# parser rather than breaking every other subcommand.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "init": ("mepd.commands.init", "write a commented starting configuration into a folder"),
    "check": ("mepd.commands.check", "validate everything a start would load"),
    "serve": ("mepd.commands.serve", "run the daemon"),
    "status": ("mepd.commands.admin", "show the running daemon's state"),
    "reload": ("mepd.commands.admin", "make the running daemon reload its files"),
    "map": ("mepd.commands.map", "map identities to a local account (debug a mapping)"),
    "policy": ("mepd.commands.policy", "test and explain authorization policies"),
    "render": ("mepd.commands.render", "render a user endpoint configuration template"),
    "runtime": ("mepd.commands.runtime", "build the user endpoints' runtime (a virtualenv)"),
    "token": ("mepd.commands.token", "issue tokens of the local issuer"),
    "functions": ("mepd.commands.functions", "list the functions registered with the daemon"),
    "import-globus-compute": (
        "mepd.commands.import_gc",
        "write a mep deployment from a Globus Compute multi-user endpoint's files",
    ),
}

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

DEFAULT_CONFIG = "/etc/mep/mepd.yaml"
CONFIG_ENVIRONMENT = "MEPD_CONFIG"


def default_config(environ: Mapping[str, str] | None = None) -> str:
    """The settings file when ``--config`` is not given: ``$MEPD_CONFIG`` or the default."""
    env = os.environ if environ is None else environ
    return env.get(CONFIG_ENVIRONMENT) or DEFAULT_CONFIG


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


_CONFIG_HELP = f" (default: ${CONFIG_ENVIRONMENT}, else {DEFAULT_CONFIG})"


def _default_the_config(parser: argparse.ArgumentParser) -> None:
    """Make a required ``--config`` (alone or in a required either/or group) optional
    with the default settings file, in ``parser`` and the subparsers below it."""
    # argparse keeps actions and groups in these attributes; stable since Python 2.7.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _default_the_config(child)
        elif "--config" in action.option_strings:
            groups = [g for g in parser._mutually_exclusive_groups if action in g._group_actions]
            if action.required or any(g.required for g in groups):
                action.required = False
                for group in groups:
                    group.required = False
                action.help = (action.help or "the settings YAML") + _CONFIG_HELP
                parser.set_defaults(_config_default=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mepd", description="mep: multi-user function-as-a-service endpoint")
    parser.add_argument("--version", action="version", version=f"mepd {__version__}")
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
        _default_the_config(sp)
    return parser


def _apply_default_config(args: argparse.Namespace) -> None:
    if not getattr(args, "_config_default", False):
        return
    if getattr(args, "config", None) is None and not getattr(args, "state_dir", None):
        args.config = default_config()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _apply_default_config(args)
    try:
        code = int(args._run(args))
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): what is left to print has nowhere to go.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
