"""Frames through a real ``mepd serve`` on 127.0.0.1 with a real user endpoint.

One daemon serves a frames caller (``mepcore.client.Client``) and a plain-JSON caller
(httpx) side by side, with exact bytes both ways; then a frames submit answered 200 is
followed at once by ``kill -9``, and the task with its exact argument bytes is in the
store the next daemon opens (an accepted submit is committed before its answer).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import time
from pathlib import Path
from typing import Any

import pytest

from mepcore.client import Client, TaskRequest
from mepcore.tasks import pack_args, unpack_value
from mepd import frames
from mepd.store import TaskStore
from tests.accounts import processes_of
from tests.daemon_harness import remote_function, start_daemon, write_runtime_deployment

pytestmark = [pytest.mark.root, pytest.mark.slow]

ECHO = remote_function("def echo(x):\n    return x\n", "echo")
HOLD = remote_function(
    "def hold(s, pad=b''):\n    import time\n    time.sleep(s)\n    return len(pad)\n", "hold"
)
MIB = 1 << 20


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_frames_and_json_callers_then_kill_9_keeps_the_accepted_bytes(
    tmp_path: Path, make_account: Any
) -> None:
    acct: pwd.struct_passwd = make_account()
    config = write_runtime_deployment(tmp_path / "site")
    state = tmp_path / "site" / "state"
    daemon = start_daemon(config, state)
    variables = {"max_workers": 1}
    try:
        token = daemon.token(f"{acct.pw_name}@example.org")
        payload = bytes(range(256)) * (MIB // 256)
        with Client(daemon.url, token) as sdk:
            echo_id = sdk.register_function(ECHO)
            assert sdk.sends_frames
            new = sdk.submit("hpc", echo_id, (payload,), user_endpoint_config=variables)
            empty = sdk.submit("hpc", echo_id, (b"",), user_endpoint_config=variables)
            assert sdk.get_result(new, timeout=120) == payload
            assert sdk.get_result(empty, timeout=120) == b""
        http = daemon.client(token)
        old = http.post(
            "/v1/endpoints/hpc/submit",
            json={
                "user_endpoint_config": variables,
                "tasks": [{"function_id": echo_id, "args": b64(pack_args((payload,), {}))}],
            },
        )
        assert old.status_code == 200, old.text
        (old_id,) = old.json()["task_ids"]
        view = http.post("/v1/tasks/wait", json={"task_ids": [old_id], "timeout": 60}).json()
        assert unpack_value(base64.b64decode(view["tasks"][0]["result"])) == payload
        framed = http.get(f"/v1/tasks/{old_id}", headers={"Accept": frames.MEDIA_TYPE})
        assert framed.headers["content-type"] == frames.MEDIA_TYPE
        header, parts = frames.decode(framed.content)
        assert unpack_value(parts[json.loads(header)["result_frame"]]) == payload

        # A frames submit of two tasks that will not finish, then kill -9 at once.
        with Client(daemon.url, token) as sdk:
            hold_id = sdk.register_function(HOLD)
            args = [pack_args((60,), {"pad": payload}), pack_args((60,), {})]
            ids = sdk.submit_batch(
                "hpc", [TaskRequest(hold_id, a) for a in args], user_endpoint_config=variables
            )
    finally:
        daemon.kill()
    end = time.monotonic() + 30
    while processes_of(acct.pw_uid) and time.monotonic() < end:
        time.sleep(0.05)
    store = TaskStore.open(state / "tasks.sqlite3")
    try:
        kept = {p.task_id: p.payload for p in store.pending_payloads(ids)}
        assert kept == dict(zip(ids, args, strict=True))
        # The megabytes were in files beside the store (mepd.blobs), and so is the
        # result of the first echo: both survive the kill.
        assert f"{ids[0]}.payload" in os.listdir(state / "tasks.sqlite3.blobs")
        (echoed,) = store.get_many([new])
        assert unpack_value(echoed.result or b"") == payload
    finally:
        store.close()
