"""A function written in a script (``__main__``) that uses the script's other globals runs
in a fresh interpreter — as it will in a user endpoint — whichever side packed it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mepcore.client import pack_args as client_pack_args
from mepcore.client import pack_function as client_pack_function
from mepcore.tasks import pack_args, pack_function
from tests.daemon_harness import remote_function

SCRIPT = """
import math
OFFSET = 41

def helper(x):
    return math.floor(x) + OFFSET

def compute(x):
    return helper(x) * 2
"""

RUNNER = """
import sys
from mepcore.tasks import unpack_value
fn_payload, args_payload = sys.stdin.buffer.read().split(b"\\0SPLIT\\0")
fn = unpack_value(fn_payload)
args, kwargs = unpack_value(args_payload)
print(fn(*args, **kwargs))
"""


@pytest.mark.parametrize("side", ["tasks", "client"])
def test_script_function_with_globals_runs_in_a_fresh_interpreter(side: str) -> None:
    fn = remote_function(SCRIPT, "compute")
    if side == "tasks":
        _fid, fn_payload = pack_function(fn)
        args_payload = pack_args((1.5,), {})
    else:
        _fid, fn_payload = client_pack_function(fn)
        args_payload = client_pack_args((1.5,), {})
    done = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER],
        input=fn_payload + b"\0SPLIT\0" + args_payload,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-500:]
    assert done.stdout.decode().strip() == "84"
