"""``make demo`` (examples/demo/demo.py) runs end to end and leaves nothing running.

The demo uses fixed account names and checks that nothing of them is left running, so
two test runs on one machine take turns (an flock on ``DEMO_LOCK``). It runs from a
world-readable copy of this checkout (which may be private to root): its user endpoints
read the source lines of run.py for the tracebacks it prints; run as another account it
uses the runtime of tests/runtime_venv.py, never this checkout's virtualenv.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runtime_venv import runtime_python

REPO = Path(__file__).resolve().parents[1]
DEMO_LOCK = Path("/var/tmp/mep-test-demo.lock")

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(autouse=True)
def one_demo_at_a_time() -> Iterator[None]:
    with open(DEMO_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


_NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".*_cache", "build", ".coverage*", "*.egg-info"
)


@pytest.fixture
def readable_demo() -> Iterator[Path]:
    """demo.py in a copy of this checkout every account can read (the demo builds its
    runtime from the sources next to it)."""
    top = Path(tempfile.mkdtemp(prefix="mept-demo-files-"))
    try:
        shutil.copytree(REPO, top / "mep", symlinks=True, ignore=_NOT_COPIED)
        for path in [top, *top.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        yield top / "mep" / "examples" / "demo" / "demo.py"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run_demo_as_root(demo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(demo)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(demo.parents[2]),
    )


def test_demo_shows_each_point_and_leaves_nothing_running(readable_demo: Path) -> None:
    done = run_demo_as_root(readable_demo)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    uids = {name: pwd.getpwnam(name).pw_uid for name in ("mepdemo1", "mepdemo2")}
    assert f"alice@example.org    ran as mepdemo1 (uid {uids['mepdemo1']})" in out
    assert f"bob@example.org      ran as mepdemo2 (uid {uids['mepdemo2']})" in out
    pids = re.findall(r'"label": "(?:small|wider)"\} -> user endpoint pid (\d+)', out)
    assert len(set(pids)) == 2
    assert "HTTP 403 identity.no_mapping" in out
    assert "'curated' runs shout(): ALLOWED!" in out
    assert "refuses average(): HTTP 403 task.function_not_allowed" in out
    assert "ZeroDivisionError: division by zero" in out and "in average" in out
    assert "nothing left running" in out
    for name in uids:
        left = subprocess.run(["pgrep", "-u", name], capture_output=True, text=True).stdout
        assert left.strip() == "", f"processes of {name} left: {left}"
    assert not list(Path("/tmp").glob("mep-demo-*/state")), "the state directory was left"
    assert os.geteuid() == 0


def test_demo_as_a_non_root_account_uses_single_account_mode(
    make_account: Any, readable_demo: Path
) -> None:
    """The same demo run by an ordinary account: everything maps to that account."""
    entry = make_account(home_mode=0o755)
    as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    env = {"HOME": entry.pw_dir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    done = subprocess.run(
        [runtime_python(), "-I", str(readable_demo)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=entry.pw_dir,
        env=env,
        check=False,
        **as_user,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    name, uid = entry.pw_name, entry.pw_uid
    assert f"alice@example.org    ran as {name} (uid {uid})" in out
    assert f"bob@example.org      ran as {name} (uid {uid})" in out
    assert "HTTP 403 identity.no_mapping" in out
    assert "nothing left running" in out
    left = subprocess.run(["pgrep", "-u", name], capture_output=True, text=True).stdout
    assert left.strip() == "", f"processes of {name} left: {left}"


# -- the README's demo output is a real run's (issue 21) ---------------------------------

# What differs from run to run or machine to machine, and what it is shown as.
_UNSTABLE = [
    (r"http://127\.0\.0\.1:\d+", "http://127.0.0.1:<port>"),
    (r"state in \S+", "state in <dir>"),
    (r"\b(pid|uid) \d+", r"\1 <n>"),
    (r"config [0-9a-f]{12}…", "config <key>…"),
    (r'File "[^"]*?/((?:examples|mepcore)/[^"]*)", line \d+', r'File "…/\1", line <n>'),
    (r"[\d,]+ futures/s", "<n> futures/s"),
    (r"finished in [\d.]+s", "finished in <t>s"),
]


def stable_demo_lines(text: str) -> list[str]:
    """The demo's output without what changes between runs: pids, uids, port, paths,
    config keys, line numbers of library frames, the rate and the time; the accounts it
    creates on a first run; Python's caret lines (they vary with the Python version)."""
    lines = []
    for line in text.splitlines():
        if "created the demo account" in line or re.fullmatch(r"\s*\|?\s*[~^]+\s*", line):
            continue
        for pattern, shown in _UNSTABLE:
            line = re.sub(pattern, shown, line)
        lines.append(line.rstrip())
    return lines


def readme_demo_block() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("```\n", text.index("As root it prints")) + len("```\n")
    return text[start : text.index("```\n", start)]


def test_the_readme_shows_the_real_demo_output(readable_demo: Path) -> None:
    done = run_demo_as_root(readable_demo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stable_demo_lines(done.stdout) == stable_demo_lines(readme_demo_block())
