"""Directories that mepd's file-trust check accepts, for tests that run ``mepd check``
or start a daemon on files of their own.

pytest's ``tmp_path`` lives under ``/tmp``, a shared sticky directory that the check
refuses (anyone may create a name there first). ``trusted_directory`` makes a fresh
directory owned by the running account, mode 0755, under ``/var/lib/mep-tests`` (root)
or ``~/.cache/mep-tests`` (another account), and removes it afterwards;
``make_trusted`` gives a copied tree the modes the check wants (0755 directories,
0644 files).
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
