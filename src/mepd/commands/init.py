"""``mepd init DIR``: write a commented, working starting configuration into ``DIR``.

Like ``jupyterhub --generate-config``, but the result is complete: ``mepd check`` passes
on it as it is, and ``mepd serve`` starts on it. ``DIR`` (``/etc/mep`` for the
systemd unit in packaging/) gets:

- ``mepd.yaml`` — the settings, every key commented (state directory, audit log,
  listen address, account rules, issuers, one endpoint);
- ``mapping.json`` — identities ``<name>@<domain>`` map to the local account ``<name>``;
- ``model.conf`` — the Casbin model (mep evaluates only this one);
- ``base.csv`` — the shipped safe defaults (``policies/base.csv``), first in the list;
- ``site.csv`` — this site's lines after it: identities of ``<domain>`` may run functions;
- ``policy_tests.yaml`` — decision tables ``mepd check`` runs against that policy list;
- ``user_config_template.yaml.j2``, ``user_config_schema.json``,
  ``user_environment.yaml`` — a user endpoint running a thread or process pool here.

Files are created, never followed through a symbolic link, owned by the running account
with mode 0644 (``DIR`` 0755 when created): the modes ``mepd check``'s file-trust check
asks for. Nothing secret is written (the local issuer's key is made at first start).
Afterwards the same check as ``mepd check`` runs and its problems are listed: a ``DIR``
under a directory others may write (``/tmp``) or an interpreter they may change is
refused there, not at the first start.

Exit status: 0 written and ``mepd check`` passes; 1 written, but ``mepd check`` finds
problems (listed on stderr); 2 nothing written (a file exists and ``--force`` was not
given, or ``DIR`` cannot be written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

# policies/base.csv, shipped inside the package (the wheel carries no policies/ folder);
# tests/test_init.py keeps the two identical.
BASE_POLICY = """\
# base.csv — safe defaults. Anything not allowed here is denied (default deny).
# Use it first in an endpoint's policy list, your own lines after it:
#   policy: [/etc/mep/policies/base.csv, /etc/mep/site.csv]
# Endpoint pattern '*' is any endpoint whose name is one ':'-free segment.

# The superuser never gets through, whatever another file allows (deny beats allow).
p, user:root, **, **, *, -, deny

# A mapped identity with a regular account (uid >= 1000) may be mapped to its account,
# start a user endpoint from the endpoint's template when the administrator has not
# named it (template_name unset is "default"), and see and stop its own user
# endpoints. mepd asks about user:<the caller's own account> for these, so user:*
# is "one's own account", never anyone else's (that is the 'admin' action).
p, **, *, user:*, map_identity, uid_ge:1000, allow
p, **, *, template:default, start_endpoint, uid_ge:1000, allow
p, **, *, user:*, read_status, uid_ge:1000, allow
p, **, *, user:*, stop_endpoint, uid_ge:1000, allow

# Submitting functions is NOT allowed by default: add a line of your own, e.g.
#   p, **, *, function:*, submit_task, uid_ge:1000, allow        (any function)
# or a function allow-list (examples/function-allowlist.csv).
# Stopping another account's user endpoints ('admin' on 'endpoint') is allowed to no one
# (examples/endpoint-admins.csv). Results are not a policy matter: a task is shown only
# to the identity that submitted it (checked by mepd in code).
"""

_SETTINGS = """\
# mepd settings, written by `mepd init` (mep {version}). Check them with `mepd check`,
# which loads everything a start would load and lists every problem.
# Relative paths are resolved against this file's folder. Reference: docs/admin-guide.md.

# Where mepd listens. Without TLS keep 127.0.0.1 (bearer tokens must never cross a
# network in clear text), or put a TLS-terminating proxy on this machine in front.
listen:
  host: {host}
  port: {port}          # 0: any free port (the port is written to <state_dir>/port)
# tls: {{cert: /etc/mep/tls/cert.pem, key: /etc/mep/tls/key.pem}}   # key: mode 0600

# Task store, the local issuer's key and the admin socket (mode 0700, root's). The
# systemd unit in packaging/ creates /var/lib/mepd (StateDirectory=mepd).
state_dir: {state_dir}
# One JSON line per security event (JSON lines, RFC 3339 timestamps; mode 0600).
audit_log: {audit_log}
log_level: info         # debug | info | warning | error (JSON lines on stderr)

# Which local accounts a mapping may produce: uid 0 and the daemon's own are always
# refused; so are uids below min_uid, the accounts listed here, locked or expired ones,
# and (unless allowed) those whose shell is nologin/false.
min_uid: 1000
deny_accounts: [nobody]
allow_nologin_shell: false

# The interpreter of the user endpoints: every mapped account runs it, so it must be
# readable by all of them and writable by root only. Build one with
#   mepd runtime build /opt/mep/runtime
# Default: the interpreter mepd itself runs on.
{python_line}

# Who may issue tokens. "local": mepd's own issuer (`mepd token issue --identity
# alice@{domain}`), for trying mep out and sites without an identity provider.
issuers:
  - type: local
  # - type: jwt          # an OpenID Connect provider (Keycloak, Entra ID, ...)
  #   issuer: https://keycloak.{domain}/realms/hpc
  #   audience: mepd     # keys and endpoints come from the issuer's discovery document
  #   token_types: [JWT] # Keycloak's access-token typ (the default is RFC 9068's at+jwt)
  #   claims: {{id: sub, username: preferred_username, mfa: amr}}

# Endpoints: each maps identities, decides by its policy list and starts user endpoints
# from its template. Clients address it as /v1/endpoints/<name>/...
endpoints:
  - name: {endpoint}
    mapping: mapping.json
    policy_model: model.conf
    # Merged in order: the shipped defaults, then this site's lines (a deny line in any
    # file beats every allow line). `mepd policy explain --config` shows why.
    policy: [base.csv, site.csv]
    # Decision tables run against that policy list by `mepd check`.
    policy_tests: policy_tests.yaml
    template: user_config_template.yaml.j2
    schema: user_config_schema.json
    environment: user_environment.yaml
    # allowed_functions: [<sha256 hex>, ...]   # only these functions (mepd functions list)
"""


def _mapping(domain: str) -> str:
    """mapping.json: ``<name>@<domain>`` is the local account ``<name>``."""
    pattern = "([a-z_][a-z0-9_-]{0,31})@" + domain.replace(".", "\\.")
    document = {
        # Globus Connect Server's loader ignores unknown keys, and so does mep's.
        "comment": [
            "Written by mepd init. <name>@" + domain + " is the local account <name>",
            "(lower-case letters, digits, '_' and '-'); the account must also pass the",
            "account rules of mepd.yaml. 'match' is matched against the whole string, in",
            "Python's syntax here (mep_match_syntax; without it, Globus Connect Server's",
            "reduced one, where [a-z] is text): docs/identity-mapping.md.",
            'Try: echo \'{"id": "1", "username": "alice@' + domain + "\"}'"
            " | mepd map --config mepd.yaml",
        ],
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mep_match_syntax": "python",
        "mappings": [{"source": "{username}", "match": pattern, "output": "{0}"}],
    }
    return json.dumps([document], indent=2) + "\n"


_SITE_POLICY = """\
# This site's lines, after base.csv (mepd.yaml: policy: [base.csv, site.csv]).
# Fields: p, <subject>, <endpoint>, <object>, <action>, <cond>, <allow|deny>
# (model.conf; policies/README.md in mep's documentation).

# Identities of {domain} with a regular account may run any function on any endpoint.
# Narrow it to the functions you approve with a set (g2 lines, `mepd functions list`
# shows the ids):
#   g2, function:<sha256 hex>, fset:approved
#   p, domain:{domain}, *, fset:approved, submit_task, uid_ge:1000, allow
p, domain:{domain}, *, function:*, submit_task, uid_ge:1000, allow

# Operators who may stop anyone's user endpoints ('admin' on 'endpoint'), with MFA:
# p, username:operator@{domain}, *, endpoint, admin, mfa, allow
"""

_POLICY_TESTS = """\
# Decision tables of the endpoint "{endpoint}" (`mepd policy test` format). `mepd check`
# decides them with the endpoint's model and policy list (base.csv, then site.csv);
# a request without `endpoint` is about this endpoint. Add a case for every line you add.
description: the starting policy written by mepd init
cases:
  - name: a regular account is mapped to itself
    request: {{obj: "user:alice", action: map_identity, uid: 1001,
              principals: ["username:alice@{domain}", "domain:{domain}", "user:alice"]}}
    expect: allow
  - name: it starts a user endpoint from the template
    request: {{obj: "template:default", action: start_endpoint, uid: 1001,
              principals: ["domain:{domain}", "user:alice"]}}
    expect: allow
  - name: it runs a function
    request: {{obj: "function:{function}", action: submit_task, uid: 1001,
              principals: ["domain:{domain}", "user:alice"]}}
    expect: allow
  - name: another domain runs no function
    request: {{obj: "function:{function}", action: submit_task, uid: 1002,
              principals: ["domain:elsewhere.example", "user:eve"]}}
    expect: deny
  - name: a system account (uid below 1000) runs no function
    request: {{obj: "function:{function}", action: submit_task, uid: 999,
              principals: ["domain:{domain}", "user:daemon"]}}
    expect: deny
  - name: root is refused whatever site.csv says
    request: {{obj: "function:{function}", action: submit_task, uid: 0,
              principals: ["domain:{domain}", "user:root"]}}
    expect: deny
    reason: authz.explicit_deny
  - name: nobody stops someone else's user endpoints
    request: {{obj: endpoint, action: admin, uid: 1001, mfa: true,
              principals: ["domain:{domain}", "user:alice"]}}
    expect: deny
"""

_TEMPLATE = """\
{#- The configuration of each user endpoint, rendered as the user after the identity
    switch (sandboxed Jinja2; variables validated by user_config_schema.json first and
    JSON-quoted). This one: a pool of threads or processes on this machine, as the
    user. Batch systems (Slurm, PBS...): see docs/config-templates.md. -#}
engine:
  type: {{ engine | default('"ThreadPoolEngine"') }}
  max_workers: {{ max_workers | default(2) }}
# Heartbeats without tasks before a user endpoint stops by itself (soft: when idle).
idle_heartbeats_soft: {{ idle_heartbeats_soft | default(10) }}
idle_heartbeats_hard: 5760
"""

_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$comment": (
        "Written by mepd init: the variables a user may send with a submission "
        "(user_endpoint_config); anything else is refused before the template renders."
    ),
    "title": "user endpoint variables",
    "type": "object",
    "properties": {
        "engine": {"enum": ["ThreadPoolEngine", "ProcessPoolEngine"]},
        "max_workers": {"type": "integer", "minimum": 1, "maximum": 8},
        "idle_heartbeats_soft": {"type": "integer", "minimum": 1, "maximum": 120},
    },
    "additionalProperties": False,
}

_ENVIRONMENT = """\
# Environment of every user endpoint started from this template (besides the variables
# mepd sets: HOME, USER, PATH, LANG...). Variables that change how programs load
# (PYTHON*, LD_*...) are refused by mepd.
OMP_NUM_THREADS: "1"
MKL_NUM_THREADS: "1"
"""

# Any function id, for the decision tables (the policy names no particular function).
_SOME_FUNCTION = "0" * 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DOMAIN = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="where to write (e.g. /etc/mep)")
    parser.add_argument(
        "--domain",
        default="example.org",
        help="identities <name>@DOMAIN map to local accounts <name> (default: example.org)",
    )
    parser.add_argument("--endpoint", default="local", help="the endpoint's name (default: local)")
    parser.add_argument(
        "--state-dir", default="/var/lib/mepd", metavar="DIR", help="default: /var/lib/mepd"
    )
    parser.add_argument(
        "--audit-log",
        metavar="FILE",
        help="default: /var/log/mepd/audit.jsonl (<state-dir>/audit.jsonl with --state-dir)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8470, help="listen port (default 8470)")
    parser.add_argument(
        "--python",
        metavar="FILE",
        help="the user endpoints' interpreter (e.g. /opt/mep/runtime/bin/python from "
        "`mepd runtime build`; default: mepd's own)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")


def _files(args: argparse.Namespace) -> dict[str, str]:
    from mepcore.authz import MODEL_TEXT
    from mepd import __version__

    state_dir = Path(args.state_dir).absolute()
    if args.audit_log:
        audit_log = str(Path(args.audit_log).absolute())
    elif args.state_dir != "/var/lib/mepd":
        audit_log = str(state_dir / "audit.jsonl")
    else:
        audit_log = "/var/log/mepd/audit.jsonl"
    python_line = (
        f"python: {json.dumps(str(Path(args.python).absolute()))}"
        if args.python
        else "# python: /opt/mep/runtime/bin/python"
    )
    values = {
        "version": __version__,
        "host": json.dumps(args.host),
        "port": args.port,
        "state_dir": json.dumps(str(state_dir)),
        "audit_log": json.dumps(audit_log),
        "python_line": python_line,
        "domain": args.domain,
        "endpoint": args.endpoint,
        "function": _SOME_FUNCTION,
    }
    return {
        "mepd.yaml": _SETTINGS.format(**values),
        "mapping.json": _mapping(args.domain),
        "model.conf": "# The Casbin model mep evaluates (written by mepd init). mepd refuses "
        "any other model.\n" + MODEL_TEXT,
        "base.csv": BASE_POLICY,
        "site.csv": _SITE_POLICY.format(**values),
        "policy_tests.yaml": _POLICY_TESTS.format(**values),
        "user_config_template.yaml.j2": _TEMPLATE,
        "user_config_schema.json": json.dumps(_SCHEMA, indent=2) + "\n",
        "user_environment.yaml": _ENVIRONMENT,
    }


def _usage_problem(args: argparse.Namespace) -> str | None:
    if not _DOMAIN.match(args.domain):
        return f"--domain {args.domain!r} is not a domain name"
    if not _NAME.match(args.endpoint):
        return f"--endpoint {args.endpoint!r}: letters, digits, '_', '.', '-' (64 at most)"
    if not 0 <= args.port <= 65535:
        return f"--port {args.port} is not a port"
    return None


def _write(path: Path, text: str, force: bool) -> None:
    """Create ``path`` (mode 0644), never through a symbolic link; replace it only with
    ``force`` (a new file renamed over the old one)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    target = path.with_name(f".{path.name}.new") if force else path
    if force:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o644)  # whatever the umask
        handle.write(text)
    if force:
        os.replace(target, path)


def run(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        sys.stderr.write(f"mepd init: {problem}\n")
        return EXIT_USAGE
    folder = Path(args.directory).absolute()
    files = _files(args)
    existing = [name for name in files if (folder / name).exists() or (folder / name).is_symlink()]
    if existing and not args.force:
        sys.stderr.write(
            f"mepd init: {folder} already has {', '.join(existing)}; nothing written "
            "(--force overwrites)\n"
        )
        return EXIT_USAGE
    try:
        if not folder.is_dir():
            folder.mkdir(mode=0o755, parents=True)
            folder.chmod(0o755)
        for name, text in files.items():
            _write(folder / name, text, args.force)
    except OSError as exc:
        where = exc.filename or folder
        sys.stderr.write(f"mepd init: {where}: {exc.strerror or exc}\n")
        return EXIT_USAGE
    config = folder / "mepd.yaml"
    sys.stdout.write(f"mepd init: wrote {len(files)} files to {folder}\n")
    return _check(config)


def _check(config: Path) -> int:
    """What ``mepd check`` says about the new files (the same function)."""
    from mepd.commands.check import collect_problems

    problems = collect_problems(str(config))
    for problem in problems:
        sys.stderr.write(f"mepd init: {problem}\n")
    if problems:
        sys.stderr.write(
            f"mepd init: {len(problems)} problem(s) to fix before mepd starts on {config}\n"
        )
        return EXIT_PROBLEMS
    sys.stdout.write(
        f"mepd init: mepd check passes. Next: read {config}, then\n"
        f"  mepd serve --config {config}\n"
        "or install the systemd unit (docs/admin-guide.md).\n"
    )
    return EXIT_OK
