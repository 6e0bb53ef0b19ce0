"""Shared pytest set-up: the ``root`` marker and helpers for tests with real accounts."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _private_tmp() -> Path | None:
    """mepd refuses files under a shared sticky directory such as /tmp (security rule 8)
    and tests write deployments into ``tmp_path`` and ``tempfile`` directories (so do
    the demo and bench scripts they start): all of these go to a directory only root
    (or, not as root, this account) can write — root's is world-searchable, for the
    files tests make readable to other accounts."""
    root = os.geteuid() == 0
    top = Path("/var/lib/mep-test/tmp") if root else Path.home() / ".cache" / "mep-test" / "tmp"
    try:
        top.mkdir(parents=True, exist_ok=True)
        for folder in (top.parent, top) if root else (top,):
            folder.chmod(0o755 if root else 0o700)
    except OSError:
        return None
    return top


_TMP = _private_tmp()
if _TMP is not None:
    os.environ["TMPDIR"] = str(_TMP)
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(_TMP)
    tempfile.tempdir = str(_TMP)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: creates real accounts with useradd (run as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


@pytest.fixture(autouse=True)
def _subreaper_stays_in_its_test() -> Iterator[None]:
    """A test that runs a user endpoint registry in this process makes the process a
    subreaper (``become_subreaper``), and nothing here reaps adopted orphans after that
    test: the children of a later test's ``mepd serve`` killed with -9 would then stay
    zombies of this process for the rest of the run, seen as processes left running.
    So each test ends with the flag it started with."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    before = ctypes.c_int(0)
    known = libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0) == 0
    yield
    if known:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, before.value, 0, 0, 0)


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
