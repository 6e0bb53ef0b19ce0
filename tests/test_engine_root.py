"""Engines run tasks as the account the endpoint runs as (root only: a real account).

The scripts run as that account with the world-readable runtime of tests/runtime_venv.py,
never this checkout's interpreter or sources (they may be private to root).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.runtime_venv import runtime_python

SCRIPT = """
import json, os
from mepcore.tasks import Executor, TaskEnvelope, pack_args, pack_function, unpack_result

def who():
    import os
    return [os.getuid(), os.geteuid(), os.getgid(), sorted(os.getgroups())]

out = {}
for engine in ({"type": "ProcessPoolEngine", "max_workers": 1},
               {"type": "ThreadPoolEngine", "max_workers": 1}):
    with Executor.from_engine_config(engine) as executor:
        fid, body = pack_function(who)
        executor.register_function(fid, body)
        result = executor.submit(TaskEnvelope("w", fid, pack_args((), {}))).result(30)
        out[engine["type"]] = unpack_result(result)
print(json.dumps(out))
"""


@pytest.mark.root
def test_tasks_report_the_uid_of_the_account_running_the_executor(make_account: Any) -> None:
    account = make_account()
    done = subprocess.run(
        [runtime_python(), "-I", "-c", SCRIPT],
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        umask=0o077,
        cwd=account.pw_dir,
        env={"HOME": account.pw_dir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    expected = [account.pw_uid, account.pw_uid, account.pw_gid, []]
    assert seen == {"ProcessPoolEngine": expected, "ThreadPoolEngine": expected}


RESPAWN_SCRIPT = """
import json, os, resource, threading, time
from mepcore.tasks import Executor, TaskEnvelope, pack_args, pack_function, unpack_result

def die():
    import os
    os._exit(1)

def add(a, b):
    return a + b

def tasks_of_uid():
    uid = os.getuid()
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    if os.stat(f"/proc/{pid}/task/{tid}").st_uid == uid:
                        count += 1
            except OSError:
                pass
    return count

out = {}
with Executor.from_engine_config({"type": "ProcessPoolEngine", "max_workers": 1}) as ex:
    ids = {}
    for fn in (die, add):
        fid, body = pack_function(fn)
        ex.register_function(fid, body)
        ids[fn.__name__] = fid
    call = lambda name, *a: ex.submit(TaskEnvelope("t", ids[name], pack_args(a, {}))).result(30)
    assert unpack_result(call("add", 1, 1)) == 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    # After the worker dies, this process's own tasks alone reach the limit.
    resource.setrlimit(resource.RLIMIT_NPROC, (tasks_of_uid() - 1, hard))
    out["lost"] = call("die").reason
    out["no_worker"] = call("add", 2, 2).reason
    resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
    deadline = time.monotonic() + 20
    while True:
        result = call("add", 3, 3)
        if result.ok or time.monotonic() > deadline:
            break
        threading.Event().wait(0.2)
    out["recovered"] = unpack_result(result)
print(json.dumps(out))
"""


@pytest.mark.root
def test_a_pool_that_cannot_fork_fails_tasks_clearly_and_recovers(make_account: Any) -> None:
    account = make_account()
    done = subprocess.run(
        [runtime_python(), "-I", "-c", RESPAWN_SCRIPT],
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        cwd=account.pw_dir,
        env={"HOME": account.pw_dir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # Earlier lines are the engine's (unconfigured) structlog events.
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "lost": "task.worker_lost",
        "no_worker": "task.engine_failed",
        "recovered": 6,
    }
