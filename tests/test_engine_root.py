"""Engines run tasks as the account the endpoint runs as (root only: a real account)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

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
        [sys.executable, "-c", SCRIPT],
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
