"""``mepd import-globus-compute DIR --out OUT``: a Globus Compute endpoint's files, for mep.

Reads a Globus Compute multi-user endpoint directory (``~/.globus_compute/<name>/`` of the
account that ran ``globus-compute-endpoint configure --multi-user``):

- ``config.yaml``: ``identity_mapping_config_path``, ``user_config_template_path``,
  ``user_config_schema_path``, ``audit_log_path``, ``pam``, ``display_name``,
  ``allowed_functions``, ``admins``, ``debug`` and the keys that have no mep meaning;
- the template (``user_config_template.yaml.j2``, else ``user_config_template.yaml``)
  and the ``*.j2`` files beside it, ``user_config_schema.json`` and
  ``user_environment.yaml`` when present, and the identity mapping file;

and writes into ``OUT`` a deployment that serves the same endpoint:

- ``mepd.yaml``: the settings (one endpoint named like the Globus Compute endpoint);
- ``identity_mapping.json`` (mode 0600, as there): the mapping file, unchanged but for a
  relative program path of an external mapper, made absolute;
- ``templates/``: the template, its ``*.j2`` neighbours, the schema and the environment
  (a value YAML reads as a boolean or a number is written as the text Globus Compute
  would have given the process);
- ``policy/model.conf``, ``policy/base.csv`` (the shipped ones) and ``policy/site.csv``:
  every mapped account may run functions, as there; with ``allowed_functions`` only the
  set ``fset:allowed`` may (Globus function UUIDs cannot be carried over: mep names a
  function by the sha256 of its body, so the set starts empty and the UUIDs are listed
  for the administrator); ``admins`` become administrators of the endpoint (they may stop
  anyone's user endpoints);
- ``import-report.txt``: what was carried over, what could not be and why, and notes.

Files are created with ``O_EXCL`` and ``O_NOFOLLOW``, owned by the running account, mode
0644 (0600 for the mapping), directories 0755: what ``mepd check``'s file-trust check
asks for. Then the same check as ``mepd check`` runs on the result.

Exit status: 0 written and ``mepd check`` passes; 1 written, but ``mepd check`` finds
problems (listed on stderr, and in the report); 2 nothing written (``DIR`` is not a
Globus Compute endpoint directory, a file cannot be read, or ``OUT`` is not empty and
``--force`` was not given).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
MAX_FILE_BYTES = 4 * 1024 * 1024
_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_INCLUDE = re.compile(r"""{%-?\s*(?:include|import|extends|from)\s+["']([^"']+)["']""")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Set by mep for every user endpoint; Globus Compute refuses them in the file too.
_ENVIRONMENT_RESERVED = frozenset({"HOME", "USER", "PWD", "LOGNAME"})

# config.yaml keys with no mep meaning: why each is not carried over.
_NOT_CARRIED = {
    "email": "mep keeps no contact address (put it in your site's documentation)",
    "public": "mep has no endpoint directory to be listed in",
    "high_assurance": "mep has no high-assurance mode; its audit log is always written",
    "authentication_policy": (
        "a Globus Auth policy: express its rules in site.csv (conditions mfa,"
        " auth_age_le:<s>, principals domain:<d>)"
    ),
    "subscription_id": "no Globus subscription is involved",
    "amqp_port": "mep has no AMQP connection: clients talk to mepd itself",
    "heartbeat_period": "mepd has no cloud service to send heartbeats to",
    "environment": "a Globus service environment; mep has none",
    "local_compute_services": "a Globus development setting",
    "mu_child_ep_grace_period_s": (
        "mep restarts a user endpoint from the stored request when needed (no grace cache)"
    ),
    "multi_user": "removed in Globus Compute 4.10.1",
    "force_mu_allow_same_user": "removed in Globus Compute 4.10.1",
    "detach_endpoint": "removed in Globus Compute 4.10.1",
}
# Keys this command uses.
_USED = frozenset(
    {
        "display_name",
        "identity_mapping_config_path",
        "user_config_template_path",
        "user_config_schema_path",
        "audit_log_path",
        "pam",
        "allowed_functions",
        "admins",
        "debug",
    }
)


class _Refused(Exception):
    """Nothing can be written; the message says why."""


@attrs.define
class Report:
    """What the import did, in three lists of lines (each one sentence)."""

    carried: list[str] = attrs.field(factory=list)
    not_carried: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def text(self, source: Path, out: Path) -> str:
        lines = [f"mepd import-globus-compute {source} -> {out}", ""]
        for title, items in (
            ("Carried over", self.carried),
            ("Not carried over", self.not_carried),
            ("Notes", self.notes),
        ):
            lines.append(f"{title}:")
            lines += [f"  - {item}" for item in items] or ["  (none)"]
            lines.append("")
        return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", metavar="DIR", help="the Globus Compute endpoint directory (with config.yaml)"
    )
    parser.add_argument(
        "--out", required=True, metavar="OUT", help="where to write (e.g. /etc/mep)"
    )
    parser.add_argument("--name", help="the endpoint's name in mep (default: the directory's name)")
    parser.add_argument(
        "--state-dir", default="/var/lib/mepd", metavar="DIR", help="default: /var/lib/mepd"
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8470, help="listen port (default 8470)")
    parser.add_argument(
        "--python",
        metavar="FILE",
        help="the user endpoints' interpreter (e.g. /opt/mep/runtime/bin/python from "
        "`mepd runtime build`; default: mepd's own)",
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT")


# -- reading --------------------------------------------------------------------------


def _read(path: Path, what: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _Refused(f"{what} {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise _Refused(f"{what} {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(f"{what} {path}: not UTF-8") from exc


def _yaml(text: str, where: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _Refused(f"{where}: not valid YAML: {exc}") from exc


def _path_setting(config: Mapping[str, Any], key: str, base: Path) -> Path | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _Refused(f"config.yaml: {key} must be a path")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


@attrs.define
class _Source:
    """The Globus Compute endpoint's files, read."""

    directory: Path
    config: dict[str, Any]
    template_path: Path
    template: str
    includes: dict[str, str]
    schema: str | None
    environment: str | None
    mapping_path: Path | None
    mapping: str | None

    @classmethod
    def read(cls, directory: Path) -> _Source:
        config_path = directory / "config.yaml"
        if not config_path.is_file():
            raise _Refused(f"{directory}: no config.yaml (not a Globus Compute endpoint)")
        config = _yaml(_read(config_path, "config"), config_path) or {}
        if not isinstance(config, dict):
            raise _Refused(f"{config_path}: must be a mapping")
        if "engine" in config:
            raise _Refused(
                f"{config_path}: has an engine: a single-user endpoint's config, not a"
                " multi-user one (its template is what mep needs)"
            )
        template_path = _path_setting(config, "user_config_template_path", directory)
        if template_path is None:
            template_path = directory / "user_config_template.yaml.j2"
            if not template_path.exists():
                template_path = directory / "user_config_template.yaml"
        template = _read(template_path, "template")
        includes = {
            p.name: _read(p, "template include")
            for p in sorted(template_path.parent.glob("*.j2"))
            if p.is_file() and p.name != template_path.name
        }
        schema_path = _path_setting(config, "user_config_schema_path", directory) or (
            directory / "user_config_schema.json"
        )
        schema = _read(schema_path, "schema") if schema_path.is_file() else None
        environment_path = directory / "user_environment.yaml"
        environment = _read(environment_path, "environment") if environment_path.is_file() else None
        mapping_path = _path_setting(config, "identity_mapping_config_path", directory)
        mapping = _read(mapping_path, "identity mapping") if mapping_path is not None else None
        return cls(
            directory,
            config,
            template_path,
            template,
            includes,
            schema,
            environment,
            mapping_path,
            mapping,
        )


# -- turning it into mep's files -------------------------------------------------------


def _environment(text: str | None, report: Report) -> str | None:
    """user_environment.yaml as mep reads it: flat, values as text."""
    if text is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        report.not_carried.append(
            f"user_environment.yaml is not valid YAML ({exc}); Globus Compute ignored it"
            " with a warning, so mep's is empty"
        )
        return "{}\n"
    if not data:
        report.carried.append("user_environment.yaml (no variables)")
        return text
    if not isinstance(data, dict):
        report.not_carried.append("user_environment.yaml is not a mapping; written empty")
        return "{}\n"
    out: dict[str, str] = {}
    for name, value in data.items():
        key = str(name)
        if key in _ENVIRONMENT_RESERVED or key == "CWD":
            why = (
                "selects the start directory in Globus Compute; a user endpoint starts in"
                " the user's home in mep"
                if key == "CWD"
                else "mep sets it from the account"
            )
            report.not_carried.append(f"user_environment.yaml: {key} ({why})")
            continue
        if isinstance(value, dict | list):
            report.not_carried.append(f"user_environment.yaml: {key} is not a scalar")
            continue
        out[key] = value if isinstance(value, str) else ("" if value is None else str(value))
        if not isinstance(value, str):
            report.notes.append(
                f"user_environment.yaml: {key}: {value!r} written as the text {out[key]!r}"
                " (the process sees text either way)"
            )
    report.carried.append(f"user_environment.yaml ({len(out)} variable(s))")
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in out.items())


def _mapping(source: _Source, report: Report) -> str:
    if source.mapping is None or source.mapping_path is None:
        raise _Refused(
            "config.yaml has no identity_mapping_config_path: a multi-user endpoint needs one"
        )
    try:
        documents = json.loads(source.mapping)
    except json.JSONDecodeError as exc:
        raise _Refused(f"{source.mapping_path}: not valid JSON: {exc}") from exc
    changed = False
    for index, doc in enumerate(documents if isinstance(documents, list) else []):
        command = doc.get("command") if isinstance(doc, dict) else None
        if isinstance(command, list) and command and isinstance(command[0], str):
            program = command[0]
            if "/" in program and not program.startswith("/"):
                absolute = os.path.normpath(source.mapping_path.parent / program)
                command[0] = absolute
                changed = True
                report.notes.append(
                    f"identity mapping $[{index}]: the program {program!r} (relative to the"
                    f" mapping file) is now {absolute!r}"
                )
    report.carried.append(f"identity mapping {source.mapping_path}")
    return json.dumps(documents, indent=2) + "\n" if changed else source.mapping


def _site_policy(name: str, config: Mapping[str, Any], report: Report) -> str:
    lines = [
        "# This endpoint's lines, after base.csv (written by mepd import-globus-compute).",
        "# Fields: p, <subject>, <endpoint>, <object>, <action>, <cond>, <allow|deny>",
        "",
    ]
    allowed = config.get("allowed_functions")
    if allowed is None:
        lines += [
            "# As in Globus Compute: every mapped identity with a regular account may run",
            "# any function on this endpoint.",
            f"p, **, {name}, function:*, submit_task, uid_ge:1000, allow",
        ]
        report.carried.append("no allowed_functions: every mapped account may run functions")
    else:
        uuids = [str(u) for u in allowed] if isinstance(allowed, list) else []
        lines += [
            "# Globus Compute allowed only some functions (allowed_functions). mep names a",
            "# function by the sha256 of its body, so their Globus UUIDs cannot be used:",
            "# register each function with mepd (POST /v1/functions, or submit it once),",
            "# find its id with `mepd functions list`, and add it to the set:",
            "#   g2, function:<sha256 hex>, fset:allowed",
            *(f"# Globus function {u}" for u in uuids),
            f"p, **, {name}, fset:allowed, submit_task, uid_ge:1000, allow",
        ]
        report.not_carried.append(
            f"allowed_functions ({len(uuids)} Globus function UUID(s)): mep function ids are"
            " sha256 digests; policy/site.csv allows the set fset:allowed, which starts"
            " empty (no function runs until you add g2 lines)"
        )
    admins = config.get("admins") or []
    if admins:
        lines += [
            "",
            "# Globus Compute's admins: they may stop anyone's user endpoints here.",
            f"p, role:admin, {name}, endpoint, admin, -, allow",
            *(f"g, id:{a}, role:admin, {name}" for a in admins),
        ]
        report.carried.append(
            f"admins ({len(admins)}): administrators of the endpoint in policy/site.csv"
            " (principal id:<Globus identity id>: your issuer must put that id in the"
            " token's subject)"
        )
        bad = [str(a) for a in admins if not _UUID.match(str(a))]
        if bad:
            report.not_carried.append(f"admins that are not identity ids: {', '.join(bad)}")
    return "\n".join(lines) + "\n"


def _endpoint_name(source: _Source, wanted: str | None) -> str:
    name = wanted or source.directory.name
    if not _ENDPOINT_NAME.match(name):
        raise _Refused(
            f"the endpoint name {name!r} is not a mep endpoint name (letters, digits, '_',"
            " '.', '-', at most 64): give one with --name"
        )
    return name


def _settings(
    args: argparse.Namespace, name: str, source: _Source, report: Report, files: Mapping[str, str]
) -> str:
    import yaml

    config = source.config
    state_dir = str(Path(args.state_dir).absolute())
    audit = config.get("audit_log_path")
    endpoint: dict[str, Any] = {
        "name": name,
        "mapping": "identity_mapping.json",
        "policy_model": "policy/model.conf",
        "policy": ["policy/base.csv", "policy/site.csv"],
        "template": f"templates/{source.template_path.name}",
    }
    if "templates/user_config_schema.json" in files:
        endpoint["schema"] = "templates/user_config_schema.json"
    if "templates/user_environment.yaml" in files:
        endpoint["environment"] = "templates/user_environment.yaml"
    display = config.get("display_name")
    if isinstance(display, str) and display and display != "None":
        endpoint["display_name"] = display
        report.carried.append(f"display_name {display!r}")
    settings: dict[str, Any] = {
        "listen": {"host": args.host, "port": args.port},
        "state_dir": state_dir,
        "audit_log": str(audit) if audit else os.path.join(state_dir, "audit.jsonl"),
        "log_level": "debug" if config.get("debug") is True else "info",
        "issuers": [{"type": "local"}],
        "endpoints": [endpoint],
    }
    if audit:
        report.carried.append(f"audit_log_path {audit} (mep's audit log, JSON lines)")
    if config.get("debug") is True:
        report.carried.append("debug: log_level debug")
    if args.python:
        settings["python"] = str(Path(args.python).absolute())
    pam = _pam(config.get("pam"), report)
    if pam is not None:
        settings["pam"] = pam
    header = (
        f"# mepd settings, written by `mepd import-globus-compute` from {source.directory}.\n"
        "# What could not be carried over is in import-report.txt. Check with `mepd check`.\n"
        "# Tokens: a local issuer, so the daemon starts; add your identity provider\n"
        "# (type jwt or introspection) for the identities Globus Auth used to vouch for.\n"
    )
    return header + yaml.safe_dump(settings, sort_keys=False)


def _pam(pam: Any, report: Report) -> dict[str, Any] | None:
    if pam is None:
        return None
    if not isinstance(pam, dict):
        report.not_carried.append(f"pam: {pam!r} is not a mapping")
        return None
    # As there: a pam mapping without enable is enabled (its default is true).
    enabled = pam.get("enable", True) is True
    service = pam.get("service_name", "globus-compute-endpoint")
    if not enabled:
        report.carried.append("pam: disabled")
        return {"enable": False}
    report.carried.append(f"pam: enabled, service {service!r}")
    report.notes.append(
        f"PAM: /etc/pam.d/{service} must exist (account and session stacks), as for Globus Compute"
    )
    return {"enable": True, "service": str(service)}


def _template_notes(source: _Source, report: Report) -> None:
    report.carried.append(
        f"template {source.template_path.name}"
        + (f" with {len(source.includes)} *.j2 neighbour(s)" if source.includes else "")
    )
    for name in sorted(set(_INCLUDE.findall(source.template))):
        if name not in source.includes:
            report.not_carried.append(
                f"the template includes {name!r}: mep includes only *.j2 files of the"
                " template's own folder, by plain name"
            )
    if "astral.sh/uv" in source.template or "uv pip install globus-compute-endpoint" in (
        source.template
    ):
        report.notes.append(
            "the template's worker_init builds a uv virtual environment and installs"
            " globus-compute-endpoint in it (Globus Compute's default template): mep's"
            " workers run mep's own interpreter and need neither; set"
            " _arbitrary_user_interaction to false, or remove that block, unless users"
            " rely on its requirements"
        )


def _config_notes(config: Mapping[str, Any], report: Report) -> None:
    for key in config:
        if key in _USED:
            continue
        why = _NOT_CARRIED.get(str(key), "not a key Globus Compute 4.19 documents")
        report.not_carried.append(f"config.yaml {key}: {why}")
    report.notes.append(
        "accounts with a uid below 1000 are refused (min_uid in mepd.yaml), and so are"
        " root and the daemon's own account, whatever the mapping says"
    )


def build(args: argparse.Namespace, report: Report) -> dict[str, str]:
    """Every file to write (path relative to OUT -> text)."""
    from mepcore.authz import MODEL_TEXT
    from mepd.commands.init import BASE_POLICY

    source = _Source.read(Path(args.directory).absolute())
    name = _endpoint_name(source, args.name)
    files: dict[str, str] = {
        "identity_mapping.json": _mapping(source, report),
        f"templates/{source.template_path.name}": source.template,
        **{f"templates/{n}": text for n, text in source.includes.items()},
        "policy/model.conf": "# The Casbin model mep evaluates.\n" + MODEL_TEXT,
        "policy/base.csv": BASE_POLICY,
        "policy/site.csv": _site_policy(name, source.config, report),
    }
    _template_notes(source, report)
    if source.schema is not None:
        files["templates/user_config_schema.json"] = source.schema
        report.carried.append("user_config_schema.json")
    environment = _environment(source.environment, report)
    if environment is not None:
        files["templates/user_environment.yaml"] = environment
    _config_notes(source.config, report)
    files["mepd.yaml"] = _settings(args, name, source, report, files)
    return files


# -- writing -----------------------------------------------------------------------------


def _write(out: Path, relative: str, text: str, force: bool) -> None:
    path = out / relative
    for parent in reversed(path.relative_to(out).parents):
        folder = out / parent
        if not folder.is_dir():
            folder.mkdir(mode=0o755)
            folder.chmod(0o755)
    mode = 0o600 if relative == "identity_mapping.json" else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    if force and (path.exists() or path.is_symlink()):
        path.unlink()
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(text)


def run(args: argparse.Namespace) -> int:
    report = Report()
    out = Path(args.out).absolute()
    try:
        files = build(args, report)
        if out.exists() and any(out.iterdir()) and not args.force:
            raise _Refused(f"{out} is not empty; nothing written (--force writes into it)")
    except _Refused as exc:
        sys.stderr.write(f"mepd import-globus-compute: {exc}\n")
        return EXIT_USAGE
    try:
        if not out.is_dir():
            out.mkdir(mode=0o755, parents=True)
            out.chmod(0o755)
        for relative, text in files.items():
            _write(out, relative, text, args.force)
    except OSError as exc:
        sys.stderr.write(f"mepd import-globus-compute: {exc.filename or out}: {exc.strerror}\n")
        return EXIT_USAGE
    return _finish(out, report, args)


def _finish(out: Path, report: Report, args: argparse.Namespace) -> int:
    from mepd.commands.check import collect_problems

    # mepd check's warnings (ignored keys, likely mistakes) go into the report.
    warnings = io.StringIO()
    with contextlib.redirect_stderr(warnings):
        problems = collect_problems(str(out / "mepd.yaml"))
    for line in warnings.getvalue().splitlines():
        report.notes.append(line.removeprefix("mepd check: warning: "))
    if problems:
        report.notes += [f"mepd check: {p}" for p in problems]
    text = report.text(Path(args.directory).absolute(), out)
    _write(out, "import-report.txt", text, True)
    sys.stdout.write(text)
    for problem in problems:
        sys.stderr.write(f"mepd import-globus-compute: {problem}\n")
    if problems:
        sys.stderr.write(
            f"mepd import-globus-compute: {len(problems)} problem(s) to fix before mepd"
            f" starts on {out / 'mepd.yaml'}\n"
        )
        return EXIT_PROBLEMS
    sys.stdout.write(f"mepd check passes on {out / 'mepd.yaml'}\n")
    return EXIT_OK
