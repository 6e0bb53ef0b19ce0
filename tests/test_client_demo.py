"""``make demo`` (examples/demo/demo.py) runs end to end and leaves nothing running."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_demo_shows_each_point_and_leaves_nothing_running() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
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


def test_demo_as_a_non_root_account_uses_single_account_mode(make_account) -> None:  # type: ignore[no-untyped-def]
    """The same demo run by an ordinary account: everything maps to that account."""
    entry = make_account(home_mode=0o755)
    as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    env = {"HOME": entry.pw_dir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    probe = subprocess.run(
        [sys.executable, "-c", "import mepd, mepcore.client"],
        capture_output=True,
        text=True,
        cwd=entry.pw_dir,
        env=env,
        timeout=60,
        check=False,
        **as_user,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"this checkout's virtualenv is not readable by other accounts: {probe.stderr[-200:]}"
        )
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo" / "demo.py")],
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
