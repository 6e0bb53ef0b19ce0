"""Shared pytest set-up: the ``root`` marker and helpers for tests with real accounts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import slurm_session
from tests.trusted_dir import use_private_tmp

# Deployments in tmp_path and tempfile directories (and those of the demo and bench
# scripts the tests start) go where mepd accepts them (tests/trusted_dir.py).
_TMP = use_private_tmp()
if _TMP is not None:
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(_TMP)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """A short base directory for ``tmp_path`` (``<tmp>/r<random>``, removed at the end):
    a daemon's sockets live in its state directory, and a Unix socket's path has at most
    107 bytes, which pytest's ``pytest-of-root/pytest-N`` plus xdist's ``popen-gwN``
    would use up. xdist workers take theirs below the controller's."""
    if _TMP is None or config.option.basetemp or hasattr(config, "workerinput"):
        return
    config.option.basetemp = tempfile.mkdtemp(prefix="r", dir=_TMP)
    config.stash[_BASETEMP] = config.option.basetemp


def pytest_unconfigure(config: pytest.Config) -> None:
    made = config.stash.get(_BASETEMP, None)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


_BASETEMP = pytest.StashKey[str]()


def _untrusted_ancestor(path: Path) -> Path | None:
    """The first directory from ``path`` up that someone other than us or root could
    write (mepd's rule 8 refuses every file below it), or None."""
    for folder in (path, *path.parents):
        info = folder.stat()
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
            return folder
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    checkout = Path(__file__).resolve().parents[1]
    culprit = _untrusted_ancestor(checkout)
    if culprit is not None:
        pytest.exit(
            f"the checkout {checkout} is below {culprit}, which others can write: mepd "
            "refuses the policies and examples the tests start daemons on (DESIGN.md §3.8). "
            "Clone it somewhere only you (or root) can write, e.g. under your home.",
            returncode=2,
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: creates real accounts with useradd (run as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def _subreaper_flag() -> int | None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    return (
        flag.value
        if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0
        else None
    )


def _set_subreaper_flag(value: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, value, 0, 0, 0)


_SESSION_SUBREAPER = _subreaper_flag()


@pytest.fixture(autouse=True)
def _subreaper_stays_in_its_test() -> Iterator[None]:
    """A test that runs a user endpoint registry in this process makes the process a
    subreaper (``become_subreaper``), and nothing here reaps adopted orphans after that
    test: the children of a later test's ``mepd serve`` killed with -9, or a Parsl block
    killed on purpose, would then stay zombies of this process, seen as processes left
    running or as a block still alive. So each test ends with the flag it started with."""
    before = _subreaper_flag()
    yield
    if before is not None:
        _set_subreaper_flag(before)


@pytest.fixture(autouse=True, scope="module")
def _subreaper_stays_in_its_module() -> Iterator[None]:
    """The same for a module whose fixture runs the registry (set up before any test's
    own flag is read): the module ends with the flag the session started with. Without
    it the flag leaked into every later file of the same process (xdist worker)."""
    yield
    if _SESSION_SUBREAPER is not None:
        _set_subreaper_flag(_SESSION_SUBREAPER)


@pytest.fixture
def make_account():  # type: ignore[no-untyped-def]
    """Factory fixture: ``make_account(groups=[...])`` creates a real account (root only);
    every account made is removed at teardown."""
    from tests.accounts import create_account, delete_account

    if os.geteuid() != 0:
        pytest.skip("needs root: creates real accounts with useradd")
    made: list[str] = []

    def factory(**kwargs):  # type: ignore[no-untyped-def]
        entry = create_account(**kwargs)
        made.append(entry.pw_name)
        return entry

    yield factory
    for name in made:
        delete_account(name)


# -- a real Slurm for the tests marked ``slurm`` -----------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """A single-node Slurm, started once per session (``tests/slurm_session.py``: installed
    if needed, shared with concurrent sessions, stopped by the last). Where Slurm cannot
    run the test is skipped with slurm-up's reason, never silently."""
    if os.geteuid() != 0:
        pytest.skip("needs root: installs and starts slurmctld, slurmd and munged (.ci/slurm-up)")
    with slurm_session.session() as (status, last):
        if status == 2:
            pytest.skip(last)
        if status != 0:
            pytest.fail(last)
        yield last


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line with the Slurm suite's counts (``.ci/run`` prints it again at the end)."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    seconds = 0.0
    reasons: set[str] = set()
    for outcome, reports in terminalreporter.stats.items():
        for report in reports:
            if "slurm" not in getattr(report, "keywords", {}) or not hasattr(report, "when"):
                continue
            seconds += report.duration
            if outcome == "skipped":
                counts["skipped"] += 1
                if isinstance(report.longrepr, tuple):
                    reasons.add(str(report.longrepr[2]))
            elif outcome in ("failed", "error") and report.when != "call":
                counts["error"] += 1
            elif outcome in counts and report.when == "call":
                counts[outcome] += 1
    if sum(counts.values()):
        line = ", ".join(f"{n} {k}" for k, n in counts.items())
        why = f" ({'; '.join(sorted(reasons))})" if reasons else ""
        terminalreporter.write_line(f"slurm suite: {line} in {seconds:.1f} s{why}")


# -- a real OpenID provider (tests/oidc/), started once per session when needed ---------

from tests.oidc.fixture import oidc_provider  # noqa: E402, F401
