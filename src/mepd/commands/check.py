"""``mepd check --config FILE``: load everything a start would load; list every problem.

Like ``nginx -t``: the settings (JSON Schema, every violation with its key), then for
each endpoint its identity mapping, its policy model and policy files, the policy's
decision tables when ``policy_tests`` is set, its template with schema and user
environment, its ``allowed_functions``; the issuers' key files; TLS certificate and key;
the user endpoint interpreter and spawn settings. Nothing is started and nothing is
written (except that the state directory must be creatable).

Decision tables (``policy_tests``) are tables of ``mepd policy test``, read by that
command's module only (``mepd.commands.policy.endpoint_table_problems``), decided with
the endpoint's own model and merged policy list.

First of all, file trust (security rule 8, ``mepd.trust.check_settings``, the same check
start and reload apply): every file root would read, load or execute, along its whole
path. A file that fails is not even read: its endpoint (or issuers, TLS) is reported
and not loaded further.

With ``--store``, the task store in the state directory as well, read-only
(``mepd.store.inspect_store``): a file the daemon would refuse, ``PRAGMA
integrity_check`` findings and each damaged task record are problems; the tasks per
state are printed.

Exit status: 0 everything loads, 2 at least one problem (each on its own stderr line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mepd.settings import Settings
    from mepd.sites import LoadedSite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the settings YAML")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"config", "valid", "problems"} as JSON (the problems also on stderr)',
    )
    parser.add_argument(
        "--store",
        action="store_true",
        help="also check the task store (read-only): integrity and damaged records",
    )


def collect_problems(config: str) -> list[str]:
    """Every problem a start with ``config`` would hit (empty: it would start)."""
    from mepcore.errors import MepError
    from mepd.settings import Settings
    from mepd.sites import load_sites
    from mepd.trust import check_settings

    try:
        settings = Settings.from_file(config)
    except MepError as exc:
        if exc.violations:
            return [f"{config}: {v.path}: {v.message}" for v in exc.violations]
        return [str(exc)]
    trust = check_settings(settings)
    untrusted = trust.areas()
    report = load_sites(trust.trusted_settings(settings))
    return [
        *trust.lines(),
        *report.problems,
        *_endpoint_problems(settings, report.sites),
        *([] if "issuers" in untrusted else _issuer_problems(settings)),
        *([] if "tls" in untrusted else _tls_problems(settings)),
        *_runtime_problems(settings),
        *_cgroup_problems(settings),
        *_state_dir_problems(settings),
    ]


def _endpoint_problems(settings: Settings, sites: Mapping[str, LoadedSite]) -> list[str]:
    """Each loaded endpoint's user environment and decision tables (``load_sites`` has
    already reported the endpoints that did not load)."""
    from mepcore.spawn import environment_violations
    from mepd.commands.policy import endpoint_table_problems

    problems: list[str] = []
    for ep in settings.endpoints:
        site = sites.get(ep.name)
        if site is None:
            continue
        problems += [
            f"endpoint {ep.name}: environment: {v.path}: {v.message}"
            for v in environment_violations(site.files.environment)
        ]
        problems += endpoint_table_problems(ep)
        _warn_about_site(site)
    return problems


def _warn_about_site(site: LoadedSite) -> None:
    """What loads but is likely a mistake or is ignored, as warnings on stderr (not
    problems): the mapping's unknown keys and suspicious patterns, and the keys the
    template sets that mep accepts and ignores."""
    from mepcore.config import site_warnings
    from mepcore.types import Account

    where = f"endpoint {site.name}"
    for v in site.mapper.warnings:
        sys.stderr.write(
            f"mepd check: warning: {where}: mapping {site.settings.mapping}: {v.path}:"
            f" {v.message}\n"
        )
    probe = Account("nobody-placeholder", 65534, 65534, "/nonexistent", "/usr/sbin/nologin")
    for v in site_warnings(site.files, probe):
        sys.stderr.write(
            f"mepd check: warning: {where}: template {site.settings.template}: {v.path}:"
            f" {v.message}\n"
        )


def _issuer_problems(settings: Settings) -> list[str]:
    from mepcore.errors import MepError
    from mepd.auth import Authenticator

    problems: list[str] = []
    for issuer in settings.issuers:
        if issuer.type == "local":
            continue  # its key is created on first start
        probe = Authenticator((issuer,), settings.state_dir)
        try:
            probe.load()
        except MepError as exc:
            problems.append(f"issuer {issuer.issuer or issuer.url}: {exc.detail or exc}")
    return problems


def _tls_problems(settings: Settings) -> list[str]:
    from mepd.daemon import tls_problem

    problem = tls_problem(settings)
    return [] if problem is None else [problem]


def _runtime_problems(settings: Settings) -> list[str]:
    """The user endpoint interpreter and the spawn settings."""
    from mepcore.errors import MepError
    from mepd.daemon import spawn_settings

    problems: list[str] = []
    if not os.access(settings.python, os.X_OK):
        problems.append(f"python: {settings.python} is not an executable interpreter")
    try:
        spawn_settings(settings)
    except (MepError, ValueError, TypeError) as exc:
        problems.append(f"spawn: {exc}")
    return problems


def _cgroup_problems(settings: Settings) -> list[str]:
    """No writable cgroup for user endpoints: a problem with ``spawn.cgroup.enable: true``,
    otherwise a warning on stderr (they still start, without a cgroup)."""
    from mepcore.errors import MepError
    from mepcore.spawn import SystemCgroupPort, probe_cgroups
    from mepd.daemon import spawn_settings

    try:
        cgroup = spawn_settings(settings).cgroup
    except (MepError, ValueError, TypeError):
        return []  # reported by _runtime_problems
    probe = probe_cgroups(cgroup, SystemCgroupPort())
    if probe.usable or cgroup.enable == "false":
        return []
    if cgroup.enable == "true":
        return [f"spawn.cgroup: {probe.detail}"]
    sys.stderr.write(f"mepd check: warning: spawn.cgroup: {probe.detail}\n")
    return []


def _state_dir_problems(settings: Settings) -> list[str]:
    # The daemon creates a missing state directory, so what must be writable is its
    # nearest existing ancestor.
    parent = settings.state_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        return [f"state_dir: {settings.state_dir} cannot be created or written"]
    return []


def _store_problems(config: str) -> list[str]:
    """The task store of ``config``'s state directory, read-only; its notes and the
    tasks per state go to stdout."""
    from mepcore.errors import MepError
    from mepd.daemon import STORE_FILE
    from mepd.settings import Settings
    from mepd.store import inspect_store

    try:
        settings = Settings.from_file(config)
    except MepError:
        return []  # reported with the settings
    report = inspect_store(settings.state_dir / STORE_FILE)
    for note in report.notes:
        sys.stdout.write(f"mepd check: store: {note}\n")
    if report.counts:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(report.counts.items()))
        sys.stdout.write(f"mepd check: store: {report.path}: tasks: {counts}\n")
    return [f"store: {problem}" for problem in report.problems]


def run(args: argparse.Namespace) -> int:
    problems = collect_problems(args.config)
    if args.store:
        problems += _store_problems(args.config)
    for problem in problems:
        sys.stderr.write(f"mepd check: {problem}\n")
    if args.json:
        answer = {"config": args.config, "valid": not problems, "problems": problems}
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    if problems:
        sys.stderr.write(f"mepd check: {len(problems)} problem(s); the daemon would not start\n")
        return 2
    if not args.json:
        sys.stdout.write(f"mepd check: {args.config} is valid\n")
    return 0
