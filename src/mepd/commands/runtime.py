"""``mepd runtime build PATH``: build the runtime every user endpoint runs.

A user endpoint runs as the mapped account, with the interpreter of the ``python``
setting: every account must be able to read it, and only root may change it (a file one
account could change would run as all the others: security rule 8). The runtime this
builds is such a virtualenv:

1. made from a system interpreter (``--python``, default ``/usr/bin/python3``; not a
   build under ``/root`` or a home, which other accounts cannot read), in a temporary
   folder next to ``PATH``;
2. mep installed into it **not** editable (``--source``: a checkout, wheel or sdist, or a
   requirement; default: this mep — its checkout when it runs from one, else
   ``mep==<version>``), with the optional extras (``--extra parsl``) and any other
   packages the users' functions import (``--package numpy``, repeatable) — pip, run by
   mepd's own interpreter (``pip --python``), so the runtime carries no pip of its own;
3. every directory mode 0755 and every file 0644 (0755 if executable), then moved to
   ``PATH`` in one rename (a runtime is complete or absent);
4. checked: it imports mep (``mepd.runtime.probe_package_paths``), and it passes the file
   trust check of the daemon — the same function, ``mepd.trust.check_settings``, for a
   daemon whose ``python`` is this runtime — so ``mepd check`` will accept it.

``PATH/mep-runtime.json`` records what was built (interpreter, source and a digest of it,
extras, packages). Building again with the same request and an unchanged source does
nothing ("up to date"); a different one needs ``--replace`` (built anew, then swapped
in). Then set ``python: PATH/bin/python`` in the settings.

Also a library for the demo and the tests: ``build_runtime(PATH, RuntimeSpec(...))``;
``RuntimeSpec.seed`` starts from a copy of a virtualenv that already holds the
dependencies (the tests' cache), mep then installed without them.

Exit status: 0 built (or up to date) and checked; 1 built, but the check found problems
(listed); 2 nothing built (bad arguments, ``PATH`` exists, pip failed).
Deliberately not here: conda environments, upgrading a runtime in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

STAMP = "mep-runtime.json"
DEFAULT_PYTHON = "/usr/bin/python3"


class RuntimeBuildError(Exception):
    """Nothing was built (the message says why)."""


@attrs.frozen
class RuntimeSpec:
    """What a runtime holds. ``source`` None: this mep (``default_source()``)."""

    python: str = DEFAULT_PYTHON
    source: str | None = None
    extras: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    seed: Path | None = None


@attrs.frozen
class BuildResult:
    path: Path
    built: bool  # False: it was up to date
    problems: tuple[str, ...] = ()

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")


def default_source() -> str:
    """This mep: the checkout it is installed from (editable or from a folder), else
    ``mep==<version>`` from the package index."""
    from importlib.metadata import PackageNotFoundError, distribution

    from mepd import __version__

    try:
        text = distribution("mep").read_text("direct_url.json")
    except PackageNotFoundError:
        text = None
    if text:
        url = str(json.loads(text).get("url", ""))
        if url.startswith("file://") and Path(url[7:]).is_dir():
            return url[7:]
    return f"mep=={__version__}"


def source_digest(source: str) -> str:
    """What identifies the source's content: a checkout's pyproject.toml and src/, a
    file's bytes, or a requirement's text."""
    digest = hashlib.sha256()
    path = Path(source)
    if path.is_dir():
        for item in sorted([path / "pyproject.toml", *(path / "src").rglob("*")]):
            if item.is_file() and "__pycache__" not in item.parts:
                digest.update(str(item.relative_to(path)).encode())
                digest.update(item.read_bytes())
    elif path.is_file():
        digest.update(path.read_bytes())
    else:
        digest.update(source.encode())
    return digest.hexdigest()


def _stamp(spec: RuntimeSpec, source: str) -> dict[str, Any]:
    return {
        "python": spec.python,
        "source": source,
        "source_digest": source_digest(source),
        "extras": sorted(spec.extras),
        "packages": list(spec.packages),
    }


def _up_to_date(target: Path, wanted: dict[str, Any]) -> bool:
    try:
        found = json.loads((target / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and {k: found.get(k) for k in wanted} == wanted


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise RuntimeBuildError(f"{what} failed (exit {done.returncode}):\n" + "\n".join(tail))


def _requirement(source: str, extras: tuple[str, ...]) -> str:
    if not extras:
        return source
    if Path(source).exists():
        return f"{Path(source).absolute()}[{','.join(sorted(extras))}]"
    name, sep, rest = source.partition("==")
    return f"{name}[{','.join(sorted(extras))}]{sep}{rest}"


def _make_world_readable(top: Path) -> None:
    """Directories 0755, files 0644 or 0755: readable by all, writable by the owner only."""
    for dirpath, _dirs, files in os.walk(top):
        os.chmod(dirpath, 0o755)  # noqa: S103 - a runtime every account must read
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = 0o755 if os.stat(path).st_mode & 0o111 else 0o644
                os.chmod(path, mode)


def _relocate_scripts(top: Path, old: Path) -> None:
    """Scripts in ``bin/`` name the folder they were installed into (``#!`` lines,
    ``activate``): make them name the runtime's final place."""
    old_text, new_text = str(old).encode(), str(top).encode()
    for item in (top / "bin").iterdir():
        if item.is_symlink() or not item.is_file():
            continue
        data = item.read_bytes()
        if old_text in data and b"\0" not in data[:1024]:
            item.write_bytes(data.replace(old_text, new_text))


def _create(building: Path, spec: RuntimeSpec, source: str) -> None:
    if spec.seed is not None:
        # A copy of a venv works in place: its python is a symlink to the system
        # interpreter and site-packages is found relative to it.
        shutil.copytree(spec.seed, building, symlinks=True)
        _relocate_scripts(building, spec.seed)
    else:
        prompt = building.name.split("-", 2)[-1]  # the final name, not the temporary one
        _run(
            [spec.python, "-m", "venv", "--without-pip", "--prompt", prompt, str(building)], "venv"
        )
    python = str(building / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-input"]
    if spec.seed is not None:
        _run([*pip, "--no-deps", "--force-reinstall", _requirement(source, spec.extras)], source)
    else:
        _run([*pip, _requirement(source, spec.extras)], f"installing {source}")
    if spec.packages:
        _run([*pip, *spec.packages], "installing " + " ".join(spec.packages))


def check_runtime(python: str) -> list[str]:
    """What the daemon would say about ``python`` as its user endpoints' interpreter:
    the file trust check (rule 8, ``mepd.trust.check_settings``) and the import probe."""
    from mepcore.errors import MepError
    from mepd.runtime import probe_package_paths
    from mepd.settings import Settings
    from mepd.trust import check_settings

    runtime_dir = Path(python).parent.parent
    settings = Settings(state_dir=runtime_dir, endpoints=(), python=python, issuers=())
    problems = [str(u) for u in check_settings(settings).problems if u.need.area == "runtime"]
    if not problems:
        try:
            probe_package_paths(python)
        except MepError as exc:
            problems.append(exc.detail or str(exc))
    return list(dict.fromkeys(problems))


def build_runtime(
    target: Path,
    spec: RuntimeSpec,
    *,
    replace: bool = False,
    say: Callable[[str], None] = lambda _line: None,
) -> BuildResult:
    """Build (or find up to date) the runtime at ``target``; ``RuntimeBuildError`` if
    nothing could be built. Problems of the finished runtime are in the result."""
    target = target.absolute()
    source = spec.source or default_source()
    wanted = _stamp(spec, source)
    if target.exists() or target.is_symlink():
        if _up_to_date(target, wanted):
            say(f"{target} is up to date")
            return BuildResult(target, False, tuple(check_runtime(str(target / "bin" / "python"))))
        if not replace:
            raise RuntimeBuildError(f"{target} exists (a different runtime): --replace rebuilds it")
    if not os.access(spec.python, os.X_OK):
        raise RuntimeBuildError(f"{spec.python}: not an executable interpreter")
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    building = target.parent / f".building-{os.getpid()}-{target.name}"
    shutil.rmtree(building, ignore_errors=True)
    say(f"building {target} from {spec.python} with {source}")
    try:
        _create(building, spec, source)
        from mepd.logs import rfc3339

        built = rfc3339(time.time())
        stamp = {**wanted, "mep_version": _installed_version(building), "built": built}
        (building / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        _make_world_readable(building)
        _swap_in(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    _relocate_scripts(target, building)
    return BuildResult(target, True, tuple(check_runtime(str(target / "bin" / "python"))))


def _installed_version(venv: Path) -> str | None:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", "import mepd; print(mepd.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or None


def _swap_in(building: Path, target: Path) -> None:
    """``building`` becomes ``target``; an old ``target`` is removed after the rename."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".old-{os.getpid()}-{target.name}"
        os.rename(target, old)
    os.rename(building, target)
    if old is not None:
        if old.is_symlink() or old.is_file():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


# -- the command ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="runtime_command", metavar="ACTION")
    build = sub.add_parser("build", help="build a world-readable runtime virtualenv at PATH")
    build.add_argument("path", metavar="PATH", help="where (e.g. /opt/mep/runtime)")
    build.add_argument(
        "--python",
        default=DEFAULT_PYTHON,
        metavar="FILE",
        help=f"the system interpreter to build from (default: {DEFAULT_PYTHON})",
    )
    build.add_argument(
        "--source",
        metavar="SPEC",
        help="mep to install: a checkout, wheel or sdist, or a requirement (default: this "
        "mep's checkout, else mep==<version>)",
    )
    build.add_argument(
        "--extra", action="append", default=[], metavar="NAME", help="mep extra (e.g. parsl)"
    )
    build.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="SPEC",
        help="another package for users' functions (repeatable)",
    )
    build.add_argument("--replace", action="store_true", help="rebuild an existing runtime")
    build.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "runtime_command", None) != "build":
        sys.stderr.write("mepd runtime: choose an action: build\n")
        return EXIT_USAGE
    spec = RuntimeSpec(
        python=args.python,
        source=args.source,
        extras=tuple(args.extra),
        packages=tuple(args.package),
    )

    def say(line: str) -> None:
        if not args.json:
            sys.stdout.write(f"mepd runtime: {line}\n")
            sys.stdout.flush()

    try:
        result = build_runtime(Path(args.path), spec, replace=args.replace, say=say)
    except (RuntimeBuildError, OSError) as exc:
        if isinstance(exc, OSError):
            why = f"{exc.filename or args.path}: {exc.strerror or exc}"
        else:
            why = str(exc)
        sys.stderr.write(f"mepd runtime: {why}\n")
        if args.json:
            sys.stdout.write(json.dumps({"path": args.path, "built": False, "error": why}) + "\n")
        return EXIT_USAGE
    for problem in result.problems:
        sys.stderr.write(f"mepd runtime: {problem}\n")
    if args.json:
        answer = {
            "path": str(result.path),
            "python": result.python,
            "built": result.built,
            "problems": list(result.problems),
        }
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    elif not result.problems:
        say(f"ready: set  python: {result.python}  in the settings")
    return EXIT_PROBLEMS if result.problems else EXIT_OK
