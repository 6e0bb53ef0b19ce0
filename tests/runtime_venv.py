"""A world-readable runtime virtualenv for root tests that spawn user endpoints.

The project's own .venv may live where other accounts cannot read it, and ``python3`` on
PATH may be a build under /root (mode 700). User endpoints must run an interpreter and
packages the mapped account can read, so root tests build one under /var/tmp: made with
``/usr/bin/python3 -m venv``, every directory mode 755, the project installed *not*
editable, with the optional extras in ``EXTRAS`` (Parsl: the ``GlobusComputeEngine`` of a
user endpoint runs its interchange and workers with this interpreter). Dependencies are
installed once per hash of pyproject.toml and ``EXTRAS``; the project is installed
(``--no-deps``) only when the content of src/ changes. A file lock makes
parallel test processes share one build; each source digest gets its own copy of the
venv (built aside, renamed into place), so a run never sees a half-reinstalled runtime.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = Path("/var/tmp/mep-test-runtime")
SYSTEM_PYTHON = "/usr/bin/python3"
# Optional dependency groups of pyproject.toml installed into the runtime as well.
EXTRAS = ("parsl",)


def _digest_pyproject() -> str:
    # The extras are part of the key: a runtime built without them is never reused.
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(repr(EXTRAS).encode())
    return digest.hexdigest()[:16]


def _digest_src() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    return digest.hexdigest()[:16]


def _pip(python: Path, *args: str) -> None:
    # The test interpreter's pip installs into the target venv (--python), so the
    # runtime venv itself needs no pip (smaller, faster to build).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
    )


def _make_world_readable(top: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o111 else 0o644)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue


def _base_dependencies() -> list[str]:
    """The project's dependencies and those of its ``EXTRAS``."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(req for name in EXTRAS for req in extras[name])]


def _prune(keep: Path) -> None:
    """Remove runtimes of older sources, unless recent (another run may still use one)."""
    horizon = time.time() - 1800
    for path in BASE.glob("rt-*"):
        if path != keep and path.is_dir() and path.stat().st_mtime < horizon:
            shutil.rmtree(path, ignore_errors=True)


def runtime_python() -> str:
    """The path of a runtime venv's python for the current sources, built if needed.

    Each source digest gets its own directory, built aside and renamed into place, so a
    test run never sees a runtime half-reinstalled by a concurrent run.
    """
    BASE.mkdir(mode=0o755, exist_ok=True)
    os.chmod(BASE, 0o755)
    deps = BASE / f"deps-{_digest_pyproject()}"
    with open(BASE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (deps / "deps.stamp").exists():
            shutil.rmtree(deps, ignore_errors=True)
            subprocess.run(
                [SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(deps)],
                check=True,
                capture_output=True,
            )
            _pip(deps / "bin" / "python", *_base_dependencies())
            _make_world_readable(deps)
            (deps / "deps.stamp").write_text("ok\n")
        runtime = BASE / f"rt-{_digest_pyproject()}-{_digest_src()}"
        if not runtime.exists():
            building = BASE / f".building-{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            # A copy of the dependencies' venv works in place: its python is a symlink
            # to the system interpreter and site-packages is found relative to it.
            shutil.copytree(deps, building, symlinks=True)
            _pip(building / "bin" / "python", "--no-deps", "--force-reinstall", str(ROOT))
            _make_world_readable(building)
            os.rename(building, runtime)
        os.utime(runtime)
        _prune(runtime)
    return str(runtime / "bin" / "python")


def package_paths(python: str) -> tuple[str, ...]:
    """The site-packages directories of ``python`` (what the launcher checks)."""
    out = subprocess.run(
        [python, "-I", "-c", "import sys,site; print('\\n'.join(site.getsitepackages()))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return tuple(line for line in out.stdout.splitlines() if line)
