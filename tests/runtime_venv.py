"""A world-readable runtime virtualenv for root tests that act as other accounts.

The project's own .venv may live where other accounts cannot read it (a checkout under
/root, mode 700), and ``python3`` on PATH may be a build under /root too. Everything a
test runs as another account — user endpoints, scripts run with ``user=`` — must run an
interpreter and packages that account can read, so root tests build one under /var/lib
(not /var/tmp: mepd refuses a runtime under a shared sticky directory, rule 8):
made with ``/usr/bin/python3 -m venv``, every directory mode 755, the project installed
*not* editable, with the optional extras in ``EXTRAS`` (Parsl: the ``GlobusComputeEngine``
of a user endpoint runs its interchange and workers with this interpreter) and coverage.

Shared between runs, safely:
- it is keyed by content: dependencies by a hash of pyproject.toml, ``EXTRAS`` and the
  coverage version (``deps-<hash>``), the runtime by that and a hash of src/
  (``rt-<hash>-<hash>``), so two clones of one commit share one runtime and a run never
  sees another commit's code;
- it is built under an exclusive ``flock`` on ``BASE/.lock``, into a temporary directory
  renamed into place, so a runtime is complete or absent, never half-built;
- a process that uses a runtime holds a shared ``flock`` on its ``.in-use`` file for as
  long as it lives; pruning (under the exclusive lock) removes only runtimes nobody holds
  and nobody touched for ``PRUNE_AFTER`` seconds, so a run never loses its runtime.

Coverage of what runs as other accounts: when the tests run under coverage with
subprocess measurement (``make unit``: ``COVERAGE_PROCESS_CONFIG`` is set and
``COVERAGE_FILE`` lies in a world-writable sticky directory), ``runtime_python()`` returns
instead a per-run *overlay* next to that data file: a venv of a few files whose
site-packages adds the shared runtime's and starts coverage with this run's
configuration. A user endpoint gets an environment built from an allowlist (no
``COVERAGE_*`` variables) and runs ``python -I``, so the start has to come from the
interpreter's own site-packages; the overlay is per run so concurrent runs each measure
into their own directory. ``[tool.coverage.paths]`` maps the runtime's site-packages back
to src/ when the data are combined.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mepcore.spawn import SpawnSettings

ROOT = Path(__file__).resolve().parent.parent
BASE = Path("/var/lib/mep-test/runtime")
# Coverage overlays (below): root-owned too, one per run, removed once its run is gone.
OVERLAYS = BASE / "overlays"
SYSTEM_PYTHON = "/usr/bin/python3"
# Optional dependency groups of pyproject.toml installed into the runtime as well.
EXTRAS = ("parsl",)
# A runtime no process holds is removed once untouched this long (seconds).
PRUNE_AFTER = 1800
# Dependency sets are only read while building a runtime: kept longer, so two runs of
# different pyproject.toml files do not rebuild each other's all the time.
PRUNE_DEPS_AFTER = 86_400
OVERLAY_HOOK = "_mep_test_runtime"

# Shared locks on the runtimes this process uses, held until it exits.
_held: dict[Path, IO[str]] = {}


def _coverage_requirement() -> list[str]:
    """The test interpreter's coverage, so data from the runtime combine with ours."""
    try:
        from importlib.metadata import version

        return [f"coverage=={version('coverage')}"]
    except Exception:
        return []


def _digest_pyproject() -> str:
    # The extras and coverage are part of the key: a runtime without them is never reused.
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(repr((EXTRAS, _coverage_requirement())).encode())
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
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o111 else 0o644)


def _base_dependencies() -> list[str]:
    """The project's dependencies, those of its ``EXTRAS``, and coverage."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [
        *project["dependencies"],
        *(req for name in EXTRAS for req in extras[name]),
        *_coverage_requirement(),
    ]


def _hold(runtime: Path) -> None:
    """Mark ``runtime`` in use by this process until it exits (a shared flock)."""
    if runtime not in _held:
        handle = open(runtime / ".in-use", "a")  # noqa: SIM115 - kept open on purpose
        fcntl.flock(handle, fcntl.LOCK_SH)
        _held[runtime] = handle


def _in_use(runtime: Path) -> bool:
    try:
        handle = open(runtime / ".in-use")  # noqa: SIM115
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _prune(keep: Path) -> None:
    """Under the exclusive lock: remove what no run uses (see the module docstring)."""
    now = time.time()
    for path in BASE.glob(".building-*"):
        # Builds happen under the lock we hold: any left is a crashed run's.
        shutil.rmtree(path, ignore_errors=True)
    for path in OVERLAYS.glob("*"):
        # An overlay is needed while its run's coverage directory exists.
        run_dir = path / "coverage-dir"
        gone = not run_dir.exists() or not Path(run_dir.read_text().strip()).exists()
        if gone and now - path.stat().st_mtime > PRUNE_AFTER / 6:
            shutil.rmtree(path, ignore_errors=True)
    for path in BASE.glob("rt-*"):
        if path == keep or not path.is_dir() or now - path.stat().st_mtime < PRUNE_AFTER:
            continue
        if not _in_use(path):
            shutil.rmtree(path, ignore_errors=True)
    for path in BASE.glob("deps-*"):
        if path.name != f"deps-{_digest_pyproject()}" and (
            now - path.stat().st_mtime > PRUNE_DEPS_AFTER
        ):
            shutil.rmtree(path, ignore_errors=True)


def shared_runtime_python() -> str:
    """The python of the shared runtime venv for the current sources, built if needed."""
    BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(BASE.parent, 0o755)
    os.chmod(BASE, 0o755)
    deps = BASE / f"deps-{_digest_pyproject()}"
    runtime = BASE / f"rt-{_digest_pyproject()}-{_digest_src()}"
    with open(BASE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not runtime.exists():
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
            os.utime(deps)
            # `mepd runtime build`, seeded with a copy of the dependencies' venv: mep
            # installed not editable, modes made world-readable, renamed into place
            # complete (from a .building-* folder, pruned above if a run crashed), then
            # file-trust checked as the daemon checks its runtime.
            from mepd.commands.runtime import RuntimeSpec, build_runtime

            spec = RuntimeSpec(python=SYSTEM_PYTHON, source=str(ROOT), seed=deps)
            built = build_runtime(runtime, spec)
            if built.problems:
                raise RuntimeError("; ".join(built.problems))
        os.utime(runtime)
        _hold(runtime)
        _prune(runtime)
    return str(runtime / "bin" / "python")


# -- the per-run coverage overlay --------------------------------------------------------

_HOOK_SOURCE = '''"""Test runs only: the shared runtime's packages, and coverage with this run's config.

The configuration is put into the environment only for coverage's start and taken out
again: a user endpoint's environment must stay the allowlisted one its tasks see.
Processes this interpreter starts get measured through this same hook. A user endpoint
leaves with os._exit, so that saves the data first — in this process only, not in the
pool workers it forks (saving there could block on a lock another thread held).
"""
import os
import site

site.addsitedir({site_packages!r})
try:
    import coverage
except ImportError:
    coverage = None
if coverage is not None:
    _inherited = os.environ.get("COVERAGE_PROCESS_CONFIG")
    os.environ["COVERAGE_PROCESS_CONFIG"] = {config!r}
    try:
        _measuring = coverage.process_startup()
    finally:
        if _inherited is None:
            os.environ.pop("COVERAGE_PROCESS_CONFIG", None)
        else:
            os.environ["COVERAGE_PROCESS_CONFIG"] = _inherited
    if _measuring is not None:
        _pid, _exit = os.getpid(), os._exit

        def _save_then_exit(status, _measuring=_measuring):
            if os.getpid() == _pid:
                try:
                    _measuring.save()
                except Exception:
                    pass
            _exit(status)

        os._exit = _save_then_exit
'''


def _coverage_directory() -> Path | None:
    """Where this run's coverage data go, if processes of other accounts can write there."""
    if not os.environ.get("COVERAGE_PROCESS_CONFIG") or not os.environ.get("COVERAGE_FILE"):
        return None
    directory = Path(os.environ["COVERAGE_FILE"]).resolve().parent
    try:
        mode = directory.stat().st_mode
    except OSError:
        return None
    sticky_and_open = stat.S_ISVTX | stat.S_IWOTH | stat.S_IXOTH
    return directory if mode & sticky_and_open == sticky_and_open else None


def _site_packages(prefix: Path) -> Path:
    """The site-packages of a venv made by ``SYSTEM_PYTHON`` (lib/pythonX.Y/...)."""
    (found,) = (prefix / "lib").glob("python3*/site-packages")
    return found


def _overlay_python(shared_python: str, directory: Path) -> str:
    """A venv whose site-packages adds the shared runtime's and starts coverage writing
    into ``directory`` (see the module docstring); built once per run and shared
    runtime, in root's ``OVERLAYS`` (not in the world-writable ``directory``: mepd
    refuses a runtime there)."""
    shared = Path(shared_python).parent.parent
    run = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    OVERLAYS.mkdir(mode=0o755, exist_ok=True)
    overlay = OVERLAYS / f"{run}-{shared.name}"
    with open(directory / ".runtime.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not overlay.exists():
            building = OVERLAYS / f".building-{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            subprocess.run(
                [SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(building)],
                check=True,
                capture_output=True,
            )
            site_packages = _site_packages(building)
            hook = _HOOK_SOURCE.format(
                site_packages=str(_site_packages(shared)),
                config=os.environ["COVERAGE_PROCESS_CONFIG"],
            )
            (site_packages / f"{OVERLAY_HOOK}.py").write_text(hook)
            (site_packages / f"{OVERLAY_HOOK}.pth").write_text(f"import {OVERLAY_HOOK}\n")
            (building / "coverage-dir").write_text(f"{directory}\n")
            _make_world_readable(building)
            os.rename(building, overlay)
    return str(overlay / "bin" / "python")


def runtime_python() -> str:
    """The python every account can run, with the project and its dependencies installed
    from the current sources: the shared runtime, or this run's coverage overlay of it."""
    shared = shared_runtime_python()
    directory = _coverage_directory()
    return shared if directory is None else _overlay_python(shared, directory)


def package_paths(python: str) -> tuple[str, ...]:
    """The site-packages directories of ``python`` (what the launcher checks), including
    those an overlay adds."""
    script = (
        "import site, sys\n"
        "found = [*site.getsitepackages(), *(p for p in sys.path if p.endswith('site-packages'))]\n"
        "print('\\n'.join(dict.fromkeys(found)))\n"
    )
    out = subprocess.run(
        [python, "-I", "-c", script],
        check=True,
        capture_output=True,
        text=True,
    )
    return tuple(line for line in out.stdout.splitlines() if line)


def runtime_spawn_settings(**overrides: Any) -> SpawnSettings:
    """Spawn settings for root tests that launch user endpoints as test accounts: the
    runtime's interpreter and site-packages, small resource limits, stderr inherited (a
    failing endpoint explains itself in the test's output); ``overrides`` replace any of
    these. Skips the test when not root."""
    import pytest

    from mepcore.spawn import ResourceLimits, SpawnSettings

    if os.geteuid() != 0:
        pytest.skip("needs root")
    python = runtime_python()
    fields: dict[str, Any] = {
        "python": python,
        "package_paths": tuple(p for p in package_paths(python) if os.path.isdir(p)),
        "limits": ResourceLimits(nproc=64, nofile=128),
        "inherit_stderr": True,
    }
    return SpawnSettings(**{**fields, **overrides})
