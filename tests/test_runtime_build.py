"""``mepd runtime build PATH`` (issue 21, item 3): the runtime every user endpoint runs.

Built from the system interpreter with this checkout installed **not** editable, every
file readable by all and writable by its owner only, and accepted by the daemon's own
file trust check (``mepd.trust.check_settings``) — in a directory under a root-owned
0755 base outside /tmp (``tests/trusted_dir.py``). Building again with the same request
is "up to date"; a different request needs ``--replace``. The documentation and the
packaging files come with it (``share/doc/mep``, the unit's ``Documentation=``).
tests/runtime_venv.py and examples/demo/demo.py build their runtimes with it too.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mepd.commands.runtime import (
    DEFAULT_PYTHON,
    STAMP,
    RuntimeBuildError,
    RuntimeSpec,
    build_runtime,
    check_runtime,
    default_source,
)
from tests.trusted_dir import trusted_directory

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(DEFAULT_PYTHON, os.X_OK), reason=f"no {DEFAULT_PYTHON}"),
]


def snapshot(top: Path) -> str:
    """This checkout's package sources, copied: a source whose digest cannot change
    while the tests run (the checkout may be edited meanwhile)."""
    source = top / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("src", "conformance", "docs", "packaging"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    return str(source)


@pytest.fixture(scope="module")
def source() -> Iterator[str]:
    with trusted_directory("mept-runtime-src-") as top:
        yield snapshot(top)


@pytest.fixture(scope="module")
def built(source: str) -> Iterator[Path]:
    with trusted_directory("mept-runtime-") as top:
        result = build_runtime(top / "runtime", RuntimeSpec(source=source))
        assert result.built and result.problems == (), result.problems
        yield result.path


def test_this_checkout_is_the_default_source() -> None:
    # The project's .venv installs it editable from this checkout.
    assert Path(default_source()).resolve() == REPO


def test_mep_is_installed_not_editable_from_the_system_interpreter(
    built: Path, source: str
) -> None:
    python = built / "bin" / "python"
    done = subprocess.run(
        [str(python), "-I", "-c", "import mepd, sys; print(mepd.__file__); print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    module, base = done.stdout.splitlines()
    assert module.startswith(str(built / "lib")), module
    assert Path(DEFAULT_PYTHON).resolve().is_relative_to(Path(base))
    site = next((built / "lib").glob("python3*/site-packages"))
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    stamp = json.loads((built / STAMP).read_text())
    assert stamp["source"] == source and stamp["python"] == DEFAULT_PYTHON
    assert stamp["mep_version"]


def test_every_file_is_readable_by_all_and_writable_by_its_owner_only(built: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(built):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            assert not info.st_mode & 0o022, path
            assert info.st_mode & 0o004, path
    # The scripts name the runtime's final place, not the folder it was built in.
    assert (built / "bin" / "mepd").read_text().splitlines()[0] == f"#!{built}/bin/python"


def test_the_daemons_trust_check_accepts_it(built: Path, source: str) -> None:
    assert check_runtime(str(built / "bin" / "python")) == []
    command = ["runtime", "build", str(built), "--source", source, "--json"]
    checked = subprocess.run(
        [sys.executable, "-m", "mepd", *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    answer = json.loads(checked.stdout)
    assert checked.returncode == 0 and answer["built"] is False and answer["problems"] == []


def test_docs_and_packaging_files_come_with_it(built: Path) -> None:
    docs = built / "share" / "doc" / "mep"
    assert (docs / "admin-guide.md").is_file()
    for name in ("mepd.service", "README.md", "grafana-dashboard.json", "prometheus-alerts.yaml"):
        assert (docs / "packaging" / name).is_file(), name


def test_a_different_request_needs_replace(built: Path, source: str) -> None:
    with pytest.raises(RuntimeBuildError, match="--replace"):
        build_runtime(built, RuntimeSpec(source=source, packages=("attrs",)))
    done = subprocess.run(
        [sys.executable, "-m", "mepd", "runtime", "build", str(built), "--package", "attrs"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and str(built) in done.stderr


def test_a_file_others_may_change_is_refused(source: str) -> None:
    with trusted_directory("mept-runtime-bad-") as top:
        result = build_runtime(top / "rt", RuntimeSpec(source=source))
        assert result.problems == ()
        site = next((top / "rt" / "lib").glob("python3*/site-packages"))
        (site / "mepd" / "__init__.py").chmod(0o666)
        problems = check_runtime(str(top / "rt" / "bin" / "python"))
        assert problems and "mepd/__init__.py" in problems[0], problems


def test_an_interpreter_that_is_not_there_builds_nothing() -> None:
    with trusted_directory("mept-runtime-none-") as top:
        with pytest.raises(RuntimeBuildError, match="/nonexistent/python3"):
            build_runtime(top / "rt", RuntimeSpec(python="/nonexistent/python3"))
        assert not (top / "rt").exists()
