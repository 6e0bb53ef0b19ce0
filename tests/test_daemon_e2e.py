"""End to end, as root: a real ``mepd serve`` on 127.0.0.1, real accounts, real user
endpoints running the caller's functions under the mapped uid."""

from __future__ import annotations

import base64
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.tasks import pack_args, pack_function, unpack_value
from tests.daemon_harness import (
    RunningDaemon,
    remote_function,
    running_daemon,
    wait_all,
    write_deployment,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

WHOAMI = remote_function(
    "def whoami(tag):\n    import os\n    return (os.getuid(), os.getgid(), tag)\n", "whoami"
)
FORBIDDEN = remote_function("def forbidden():\n    return 'should never run'\n", "forbidden")
BOOM = remote_function("def boom():\n    raise KeyError('remote failure')\n", "boom")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def runtime() -> tuple[str, tuple[str, ...]]:
    from tests.runtime_venv import package_paths, runtime_python

    python = runtime_python()
    return python, tuple(p for p in package_paths(python) if os.path.isdir(p))


@pytest.fixture
def deployment(
    tmp_path: Path, make_account: Any, runtime: tuple[str, tuple[str, ...]]
) -> Iterator[tuple[RunningDaemon, list[pwd.struct_passwd]]]:
    accounts = [make_account(), make_account()]
    forbidden_id, _ = pack_function(FORBIDDEN)
    config = write_deployment(
        tmp_path / "site",
        python=runtime[0],
        package_paths=runtime[1],
        policy_extra=[f"p, **, hpc, function:{forbidden_id}, submit_task, -, deny"],
        limits={"max_body_bytes": 1024 * 1024},
    )
    with running_daemon(config, tmp_path / "site" / "state") as daemon:
        yield daemon, accounts


def register(client: Any, fn: Any) -> str:
    fid, body = pack_function(fn)
    r = client.post("/v1/functions", json={"function": b64(body), "name": fn.__name__})
    assert r.status_code == 200, r.text
    assert r.json()["function_id"] == fid
    return fid


def submit(
    client: Any, fid: str, args_list: list[tuple[Any, ...]], variables: dict[str, Any] | None = None
) -> Any:
    return client.post(
        "/v1/endpoints/hpc/submit",
        json={
            "user_endpoint_config": variables if variables is not None else {"max_workers": 2},
            "tasks": [{"function_id": fid, "args": b64(pack_args(a, {}))} for a in args_list],
        },
    )


def test_two_identities_run_under_their_own_uids_and_refusals_are_honest(
    deployment: tuple[RunningDaemon, list[pwd.struct_passwd]],
) -> None:
    daemon, (one, two) = deployment
    clients = {
        acct.pw_name: daemon.client(daemon.token(f"{acct.pw_name}@example.org"))
        for acct in (one, two)
    }
    ids: dict[str, list[str]] = {}
    for acct in (one, two):
        client = clients[acct.pw_name]
        fid = register(client, WHOAMI)
        r = submit(client, fid, [(f"{acct.pw_name}-{i}",) for i in range(5)])
        assert r.status_code == 200, r.text
        ids[acct.pw_name] = r.json()["task_ids"]
    for acct in (one, two):
        done = wait_all(clients[acct.pw_name], ids[acct.pw_name])
        assert len(done) == 5, daemon.stderr()[-3000:]
        for i, task_id in enumerate(ids[acct.pw_name]):
            view = done[task_id]
            assert view["state"] == "success", view
            uid, gid, tag = unpack_value(base64.b64decode(view["result"]))
            assert (uid, gid, tag) == (acct.pw_uid, acct.pw_gid, f"{acct.pw_name}-{i}")
    # One caller cannot see the other's tasks.
    other = clients[two.pw_name].get(f"/v1/tasks/{ids[one.pw_name][0]}")
    assert other.status_code == 404

    # A remote exception comes back with its type and traceback.
    client = clients[one.pw_name]
    boom = register(client, BOOM)
    (boom_task,) = submit(client, boom, [()]).json()["task_ids"]
    view = wait_all(client, [boom_task])[boom_task]
    assert view["state"] == "failed"
    assert view["error"]["type_name"] == "KeyError"
    assert "remote failure" in (view["error"]["traceback"] or view["error"]["message"])

    # Status shows the caller's own user endpoint only.
    status = client.get("/v1/endpoints/hpc/status").json()
    assert len(status["user_endpoints"]) == 1
    assert status["user_endpoints"][0]["state"] == "ready"

    # A third identity that does not map.
    stranger = daemon.client(daemon.token("someone@example.org"))
    fid = register(stranger, WHOAMI)
    r = submit(stranger, fid, [("x",)])
    assert r.status_code == 403
    assert r.json()["error"]["reason"] == "identity.no_mapping"

    # A bad token.
    r = daemon.client("not.a.token").post("/v1/functions", json={"function": b64(b"x")})
    assert r.status_code == 401
    assert r.json()["error"]["reason"] == "auth.invalid_token"

    # A function the policy denies.
    forbidden = register(client, FORBIDDEN)
    r = submit(client, forbidden, [()])
    assert r.status_code == 403
    assert r.json()["error"]["reason"] in ("authz.denied", "authz.explicit_deny")

    # Invalid variables: every violation listed.
    r = submit(client, fid, [("x",)], {"max_workers": 99, "engine": "Nope", "extra": 1})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["reason"] == "config.invalid_variables"
    assert len(error["violations"]) == 3, error

    # A body over the limit.
    r = client.post(
        "/v1/endpoints/hpc/submit",
        content=b"x" * (2 * 1024 * 1024),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["reason"] == "api.body_too_large"

    # Introspection: the caller's own user endpoint process, as it reports itself.
    seen = client.get("/v1/endpoints/hpc/introspect").json()["user_endpoints"]
    assert len(seen) == 1
    process = seen[0]["process"]
    assert process["uid"] == process["euid"] == one.pw_uid
    assert process["gid"] == one.pw_gid
    assert 0 not in process["groups"]
    assert process["umask"] == 0o077
    assert process["cwd"] == one.pw_dir
    assert process["inherited_fds"] == [0, 1, 2, process["channel_fd"]]
    assert process["sid"] == process["pid"] == seen[0]["pid"]
    assert process["setuid_refused"] is True

    # Stop: the caller's own user endpoints.
    assert client.post("/v1/endpoints/hpc/stop").json() == {"stopped": 1}

    # The audit log has the story, root-only.
    audit = daemon.state_dir / "audit.jsonl"
    assert audit.stat().st_mode & 0o777 == 0o600
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {
        "auth.failed",
        "identity.mapping_resolved",
        "identity.mapping_failed",
        "authz.decided",
        "uep.started",
        "task.received",
        "task.finished",
    } <= kinds
    started = [e for e in events if e["event"] == "uep.started"]
    assert {e["uid"] for e in started} == {one.pw_uid, two.pw_uid}
    assert all(isinstance(e["pid"], int) and len(e["config_key"]) == 64 for e in started)
    stopped = [e for e in events if e["event"] == "uep.stopped"]
    assert [(e["account"], e["reason"]) for e in stopped] == [(one.pw_name, "stopped by caller")]
    exited = [e for e in events if e["event"] == "uep.exited"]
    assert [(e["account"], e["uid"], e["state"]) for e in exited] == [
        (one.pw_name, one.pw_uid, "stopped")
    ]

    # mepd status over the admin socket.
    out = subprocess.run(
        [sys.executable, "-m", "mepd", "status", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["pid"] == daemon.process.pid
    sock = daemon.state_dir / "admin.sock"
    assert sock.stat().st_mode & 0o777 == 0o600

    # Metrics.
    text = daemon.client().get("/metrics").text
    assert 'mepd_tasks_total{state="success"}' in text
    assert daemon.stop() == 0
