"""Find out where a user endpoint runtime keeps its packages (for the readability check).

``probe_package_paths(python)`` runs the configured interpreter once (as the daemon, with
an empty environment, isolated mode, a timeout) and asks it where ``mepd``, ``mepcore``
and their dependencies live. The launcher then checks, before each spawn, that the mapped
account can reach those directories (``mepcore.spawn.check_runtime_readable``).

The interpreter is administrator configuration, not user input. Deliberately not here:
building a runtime (see docs/user-endpoints.md for the recipe).
"""

from __future__ import annotations

import json
import subprocess

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
