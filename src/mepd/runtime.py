"""Find out where a user endpoint runtime keeps its packages.

``probe_package_paths(python)`` runs the configured interpreter once (as the daemon, with
an empty environment, isolated mode, a timeout) and asks it where ``mepd``, ``mepcore``
and their dependencies live. The launcher then checks, before each spawn, that the mapped
account can reach those directories (``mepcore.spawn.check_runtime_readable``).

``probe_runtime_paths(python, with_site=…)`` asks it for its ``sys.path``, for the file
trust check (``mepd.trust``): first without site processing (``-S``, so no ``.pth``
file runs before its site directory was judged), then with it. As root the probe runs
as ``nobody``: the runtime is what every account runs, never root, and what it reports
is judged before anything relies on it.

The interpreter is administrator configuration, not user input. Deliberately not here:
building a runtime (``mepd runtime build``, ``mepd.commands.runtime``).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from typing import Any

import attrs

from mepcore.errors import SpawnError

# Imported by a user endpoint before or while it serves (rendering, tasks).
RUNTIME_MODULES = ("mepd", "mepcore", "attrs", "yaml", "jinja2", "markupsafe", "jsonschema", "dill")

_PROBE = """
import importlib, json, os, sys
out = {"missing": [], "paths": []}
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        out["missing"].append(name + ": " + type(exc).__name__)
        continue
    path = getattr(mod, "__file__", None)
    if path:
        out["paths"].append(os.path.dirname(os.path.realpath(path)))
out["paths"].append(os.path.dirname(os.path.realpath(os.__file__)))
print(json.dumps(out))
"""


def probe_package_paths(python: str, *, timeout: float = 30.0) -> tuple[str, ...]:
    """Directories of the runtime's packages; ``spawn.settings_invalid`` if it is unusable."""
    try:
        proc = subprocess.run(
            [python, "-I", "-c", _PROBE, *RUNTIME_MODULES],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpawnError("spawn.settings_invalid", f"cannot run {python}: {exc}") from exc
    try:
        data = json.loads(proc.stdout)
    except ValueError as exc:
        raise SpawnError(
            "spawn.settings_invalid", f"{python} did not answer the probe: {proc.stderr[-500:]}"
        ) from exc
    if data["missing"]:
        raise SpawnError(
            "spawn.settings_invalid",
            f"{python} cannot import {', '.join(data['missing'])}; install mep into it",
        )
    return tuple(dict.fromkeys(str(p) for p in data["paths"]))


@attrs.frozen
class RuntimePaths:
    """What a runtime's interpreter says about its module search path."""

    sys_path: tuple[str, ...]
    site_dirs: tuple[str, ...] = ()


# Run with -S: the site directories the interpreter would process, found as site.py
# finds them (a venv's pyvenv.cfg next to the executable or one level up; then
# sys.prefix is the venv, which is how distributions' getsitepackages tell a venv), in
# both layouts, none processed. Too many is harmless: only existing ones are judged.
_PATHS_PROBE = """
import json, os, site, sys
exe_dir = os.path.dirname(os.path.abspath(sys.executable))
venv = os.path.dirname(exe_dir)
prefixes = [sys.prefix, sys.exec_prefix]
sites = list(site.getsitepackages(prefixes))
for folder in (exe_dir, venv):
    config = os.path.join(folder, "pyvenv.cfg")
    if os.path.isfile(config):
        system_site = True
        with open(config, encoding="utf-8") as handle:
            for line in handle:
                key, sep, value = line.partition("=")
                if sep and key.strip().lower() == "include-system-site-packages":
                    system_site = value.strip().lower() == "true"
        if not system_site:
            sites = []
        sys.prefix = sys.exec_prefix = venv
        sites += site.getsitepackages([venv, *(prefixes if system_site else [])])
        break
print(json.dumps({"path": [p for p in sys.path if p], "site": list(dict.fromkeys(sites))}))
"""

_FULL_PATH_PROBE = "import json, sys; print(json.dumps({'path': [p for p in sys.path if p]}))"


def _unprivileged() -> dict[str, Any]:
    """As root: run as nobody, with no groups (what a probe runs is judged after)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid = gid = 65534
    return {"user": uid, "group": gid, "extra_groups": []}


def probe_runtime_paths(python: str, *, with_site: bool, timeout: float = 30.0) -> RuntimePaths:
    """``sys.path`` of ``python`` (``-I``, empty environment, cwd ``/``); without
    ``with_site`` also the site directories it would process. ``spawn.settings_invalid``
    if the interpreter cannot answer."""
    argv = (
        [python, "-I", "-c", _FULL_PATH_PROBE]
        if with_site
        else [python, "-I", "-S", "-c", _PATHS_PROBE]
    )
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd="/",
            check=False,
            **_unprivileged(),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SpawnError("spawn.settings_invalid", f"cannot run {python}: {exc}") from exc
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        return RuntimePaths(
            tuple(str(p) for p in data["path"]), tuple(str(p) for p in data.get("site", ()))
        )
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise SpawnError(
            "spawn.settings_invalid",
            f"{python} did not answer the path probe (exit {proc.returncode}): "
            f"{proc.stderr[-500:]}",
        ) from exc
