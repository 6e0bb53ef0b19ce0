"""``mepd check --config FILE``: load everything a start would load; list every problem.

Like ``nginx -t``: the settings (JSON Schema, every violation with its key), then for
each endpoint its identity mapping, its policy model and policy, the policy's decision
tables when ``policy_tests`` is set, its template with schema and user environment,
its ``allowed_functions``; the issuers' key files; TLS certificate and key; the user
endpoint interpreter and spawn settings. Nothing is started and nothing is written
(except that the state directory must be creatable).

Decision tables (``policy_tests``): either a table of ``mepd policy test`` (a mapping
that names its ``policy``; that tool runs it), or a YAML/JSON list (or ``{"cases":
[...]}``) of ``{"name"?, "request": {endpoint?, obj, action, principals, mfa?,
auth_age?, uid?}, "expect": "allow" | "deny", "reason"?}`` checked against the
endpoint's own policy (``endpoint`` defaults to the endpoint being checked).

Exit status: 0 everything loads, 2 at least one problem (each on its own stderr line).
"""

from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mepd.settings import Settings
    from mepd.sites import LoadedSite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the settings YAML")


def _policy_test(path: Path) -> list[str]:
    """A table in ``mepd policy test`` format (it names its own policy): run that tool."""
    out = subprocess.run(
        [sys.executable, "-m", "mepd", "policy", "test", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode == 0:
        return []
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if not ln.startswith("ok ")]
    return [f"{path}: {ln}" for ln in lines if ln.strip()] or [f"{path}: decision tables failed"]


def check_decision_tables(path: Path, authorizer: Any, endpoint: str) -> list[str]:
    from mepcore.authz import AuthzRequest
    from mepcore.errors import MepError
    from mepd.settings import load_yaml

    data = load_yaml(path)
    if isinstance(data, dict) and "policy" in data:
        return _policy_test(path)
    cases = data.get("cases") if isinstance(data, dict) else data
    if not isinstance(cases, list):
        return [f"{path}: expected a list of cases"]
    problems: list[str] = []
    for i, case in enumerate(cases):
        name = case.get("name") if isinstance(case, dict) else None
        where = f"{path}: case {name or i}"
        if not isinstance(case, dict) or case.get("expect") not in ("allow", "deny"):
            problems.append(f"{where}: needs request and expect: allow|deny")
            continue
        raw = dict(case.get("request") or {})
        raw.setdefault("endpoint", endpoint)
        try:
            decision = authorizer.decide(AuthzRequest.from_mapping(raw))
        except MepError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if decision.allowed != (case["expect"] == "allow"):
            got = "allow" if decision.allowed else "deny"
            lines = "; ".join(str(x) for x in decision.lines) or "no line matched"
            problems.append(f"{where}: expected {case['expect']}, got {got} ({lines})")
        elif "reason" in case and case["reason"] != decision.reason:
            problems.append(f"{where}: expected reason {case['reason']}, got {decision.reason}")
    return problems


def collect_problems(config: str) -> list[str]:
    """Every problem a start with ``config`` would hit (empty: it would start)."""
    from mepcore.errors import MepError
    from mepd.settings import Settings
    from mepd.sites import load_sites

    try:
        settings = Settings.from_file(config)
    except MepError as exc:
        if exc.violations:
            return [f"{config}: {v.path}: {v.message}" for v in exc.violations]
        return [str(exc)]
    report = load_sites(settings)
    return [
        *report.problems,
        *_endpoint_problems(settings, report.sites),
        *_issuer_problems(settings),
        *_tls_problems(settings),
        *_runtime_problems(settings),
        *_state_dir_problems(settings),
    ]


def _endpoint_problems(settings: Settings, sites: Mapping[str, LoadedSite]) -> list[str]:
    """Each loaded endpoint's user environment and decision tables (``load_sites`` has
    already reported the endpoints that did not load)."""
    from mepcore.errors import MepError
    from mepcore.spawn import environment_violations

    problems: list[str] = []
    for ep in settings.endpoints:
        site = sites.get(ep.name)
        if site is None:
            continue
        problems += [
            f"endpoint {ep.name}: environment: {v.path}: {v.message}"
            for v in environment_violations(site.files.environment)
        ]
        if ep.policy_tests is not None:
            try:
                problems += check_decision_tables(ep.policy_tests, site.authorizer, ep.name)
            except MepError as exc:
                problems.append(f"endpoint {ep.name}: policy_tests: {exc}")
    return problems


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
    if settings.tls_cert is None or settings.tls_key is None:
        return []
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.tls_cert, settings.tls_key
        )
    except (OSError, ssl.SSLError) as exc:
        return [f"tls: {exc}"]
    return []


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


def _state_dir_problems(settings: Settings) -> list[str]:
    # The daemon creates a missing state directory, so what must be writable is its
    # nearest existing ancestor.
    parent = settings.state_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        return [f"state_dir: {settings.state_dir} cannot be created or written"]
    return []


def run(args: argparse.Namespace) -> int:
    problems = collect_problems(args.config)
    for problem in problems:
        sys.stderr.write(f"mepd check: {problem}\n")
    if problems:
        sys.stderr.write(f"mepd check: {len(problems)} problem(s); the daemon would not start\n")
        return 2
    sys.stdout.write(f"mepd check: {args.config} is valid\n")
    return 0
