"""Directories that mepd's file-trust check accepts, for tests that run ``mepd check``
or start a daemon on files of their own.

pytest's ``tmp_path`` lives under ``/tmp``, a shared sticky directory that the check
refuses (anyone may create a name there first). ``trusted_directory`` makes a fresh
directory owned by the running account, mode 0755, under ``/var/lib/mep-tests`` (root)
or ``~/.cache/mep-tests`` (another account), and removes it afterwards;
``make_trusted`` gives a copied tree the modes the check wants (0755 directories,
0644 files). ``use_private_tmp`` points ``TMPDIR`` and ``tempfile`` at such a directory
for the whole process: the test session and the bench scripts write deployments into
temporary directories.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _base() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/mep-tests")
    return Path.home() / ".cache" / "mep-tests"


@contextmanager
def trusted_directory(prefix: str = "mept-") -> Iterator[Path]:
    base = _base()
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    base.chmod(0o755)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_trusted(top: Path) -> None:
    """Directories 0755 and files 0644 under ``top`` (a copy owned by this account)."""
    for path in [top, *top.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def private_tmp() -> Path | None:
    """The temporary directory of the tests and benches (made if needed), or None where
    it cannot be made. Root's is world-searchable, for the files the tests make readable
    to other accounts."""
    root = os.geteuid() == 0
    top = Path("/var/lib/mep-test/tmp") if root else Path.home() / ".cache" / "mep-test" / "tmp"
    try:
        top.mkdir(parents=True, exist_ok=True)
        for folder in (top.parent, top) if root else (top,):
            folder.chmod(0o755 if root else 0o700)
    except OSError:
        return None
    return top


def use_private_tmp() -> Path | None:
    """Point ``TMPDIR`` (for child processes) and ``tempfile`` here at ``private_tmp()``."""
    top = private_tmp()
    if top is not None:
        os.environ["TMPDIR"] = str(top)
        tempfile.tempdir = str(top)
    return top
