"""Re-adoption end to end, as root: a real ``mepd serve``, real accounts, real user endpoints.

- ``kill -9`` of mepd in the middle of a stream of 2,000+ tasks (some lasting seconds),
  then a restart on the same state directory: every acknowledged task ends with its
  real result, none is lost, and the user endpoint is the same process;
- the in-place upgrade drain (``mepd serve --keep-endpoints``, SIGTERM, start again):
  the same;
- forged endpoints are not adopted: a process of another account, a wrong secret, a
  record whose start time differs (a pid reused); a verified endpoint that never
  connects is stopped when the grace period ends and its tasks are lost.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from mepcore.tasks import pack_args, pack_function, unpack_value
from mepd.adoption import MAX_HANDSHAKES_PER_UID, read_process, secret_hash
from mepd.store import EndpointRecord, NewTask, TaskStore
from tests.accounts import processes_of
from tests.daemon_harness import (
    RunningDaemon,
    remote_function,
    start_daemon,
    wait_all,
    write_runtime_deployment,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

ECHO = remote_function("def echo(x):\n    return x\n", "echo")
SLOW = remote_function(
    "def slow(x, s):\n    import time\n    time.sleep(s)\n    return x\n", "slow"
)
VARIABLES = {"max_workers": 8}
STREAM = 2400
BATCH = 100


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_no_processes(uid: int) -> None:
    end = time.monotonic() + 30
    while processes_of(uid) and time.monotonic() < end:
        time.sleep(0.05)  # polling interval of a deadline loop
    assert processes_of(uid) == []


@pytest.fixture(scope="module")
def site() -> Iterator[dict[str, Any]]:
    """Two accounts and a deployment with adoption on, in a directory users can traverse
    (the adoption socket lives in the state directory)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates accounts, runs mepd as root")
    from tests.accounts import create_account, delete_account
    from tests.runtime_venv import runtime_python

    python = runtime_python()
    top = Path(tempfile.mkdtemp(prefix="adopt-", dir="/var/lib/mep-test/tmp"))
    top.chmod(0o711)
    first, second = create_account(), create_account()
    try:
        config = write_runtime_deployment(
            top / "site",
            settings_extra={"restart": {"adopt_endpoints": True, "grace_period": 60}},
        )
        (top / "site").chmod(0o711)
        yield {
            "top": top,
            "config": config,
            "state": top / "site" / "state",
            "python": python,
            "accounts": (first, second),
        }
    finally:
        for account in (first, second):
            for pid in processes_of(account.pw_uid):
                with_suppressed_kill(pid)
            if not os.environ.get("MEP_TEST_KEEP"):
                delete_account(account.pw_name)
        if not os.environ.get("MEP_TEST_KEEP"):
            shutil.rmtree(top, ignore_errors=True)


def with_suppressed_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def register(client: httpx.Client) -> dict[str, str]:
    fids = {}
    for fn in (ECHO, SLOW):
        fid, body = pack_function(fn)
        client.post("/v1/functions", json={"function": b64(body)}).raise_for_status()
        fids[fn.__name__] = fid
    return fids


def batch_of(fids: dict[str, str], start: int, count: int) -> list[dict[str, Any]]:
    """Echo tasks, with one task in 25 sleeping 2 s (so some run across the restart)."""
    tasks = []
    for i in range(start, start + count):
        if i % 25 == 0:
            tasks.append({"function_id": fids["slow"], "args": b64(pack_args((i, 2.0), {}))})
        else:
            tasks.append({"function_id": fids["echo"], "args": b64(pack_args((i,), {}))})
    return tasks


def submit(client: httpx.Client, fids: dict[str, str], start: int, count: int) -> list[str]:
    r = client.post(
        "/v1/endpoints/hpc/submit",
        json={"user_endpoint_config": VARIABLES, "tasks": batch_of(fids, start, count)},
    )
    r.raise_for_status()
    ids: list[str] = r.json()["task_ids"]
    return ids


def endpoint_pids(client: httpx.Client) -> list[int]:
    eps = client.get("/v1/endpoints/hpc/status").json()["user_endpoints"]
    return sorted(e["pid"] for e in eps if e["state"] == "ready")


def wait_adopted(daemon: RunningDaemon, client: httpx.Client, pids: list[int]) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if endpoint_pids(client) == pids:
            return
        time.sleep(0.05)  # polling interval of a deadline loop
    raise AssertionError(f"not re-adopted: {endpoint_pids(client)}\n{daemon.stderr()[-3000:]}")


def check_results(views: dict[str, dict[str, Any]], expected: dict[str, int]) -> None:
    assert set(views) == set(expected), f"{len(set(expected) - set(views))} without an answer"
    bad = {t: v for t, v in views.items() if v["state"] != "success"}
    assert not bad, (len(bad), [v.get("error") for v in bad.values()][:5])
    for task_id, value in expected.items():
        assert unpack_value(base64.b64decode(views[task_id]["result"])) == value


def audit_events(state: Path, event: str) -> list[dict[str, Any]]:
    lines = (state / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == event]


def test_kill_9_mid_stream_then_restart_loses_nothing(site: dict[str, Any]) -> None:
    account = site["accounts"][0]
    daemon = start_daemon(site["config"], site["state"], log_name="kill9-1.log")
    expected: dict[str, int] = {}
    try:
        token = daemon.token(f"{account.pw_name}@example.org")
        client = daemon.client(token)
        fids = register(client)
        for i, task_id in enumerate(submit(client, fids, 0, BATCH)):
            expected[task_id] = i
        before = endpoint_pids(client)
        assert len(before) == 1

        def stream() -> None:
            # Submits until the daemon dies under it; what was acknowledged counts.
            start = BATCH
            with daemon.client(token) as streaming:
                while start < STREAM // 2 + 4 * BATCH:
                    try:
                        ids = submit(streaming, fids, start, BATCH)
                    except (httpx.HTTPError, OSError):
                        return
                    for i, task_id in enumerate(ids):
                        expected[task_id] = start + i
                    start += BATCH

        streamer = threading.Thread(target=stream)
        streamer.start()
        end = time.monotonic() + 60
        while len(expected) < STREAM // 2 and time.monotonic() < end:
            time.sleep(0.01)  # polling interval of a deadline loop
    finally:
        daemon.kill()
    streamer.join(60)
    acknowledged_before = len(expected)
    assert acknowledged_before >= STREAM // 2
    # The user endpoint outlives its daemon (no parent-death signal).
    assert all(os.path.exists(f"/proc/{pid}") for pid in before)

    daemon = start_daemon(site["config"], site["state"], log_name="kill9-2.log")
    try:
        client = daemon.client(token)  # the local issuer's key outlives the restart
        # At once, before the endpoint is back: the start waits for the adoption instead
        # of starting a second endpoint for the same account and configuration.
        start = max(expected.values()) + 1
        for i, task_id in enumerate(submit(client, fids, start, BATCH)):
            expected[task_id] = start + i
        start += BATCH
        wait_adopted(daemon, client, before)
        while len(expected) < STREAM:
            for i, task_id in enumerate(submit(client, fids, start, BATCH)):
                expected[task_id] = start + i
            start += BATCH
        views = wait_all(client, list(expected), deadline=120)
        check_results(views, expected)
        assert endpoint_pids(client) == before
    finally:
        assert daemon.stop() == 0
    assert not [
        e
        for e in audit_events(site["state"], "task.finished")
        if e.get("reason") == "task.endpoint_lost"
    ]
    adopted = audit_events(site["state"], "endpoint.adopted")
    assert [e["pid"] for e in adopted][-1:] == before
    wait_no_processes(account.pw_uid)


def test_upgrade_drain_keeps_the_endpoints_and_their_tasks(site: dict[str, Any]) -> None:
    account = site["accounts"][0]
    keep = ["--keep-endpoints"]
    daemon = start_daemon(site["config"], site["state"], log_name="upgrade-1.log", extra_args=keep)
    expected: dict[str, int] = {}
    try:
        token = daemon.token(f"{account.pw_name}@example.org")
        client = daemon.client(token)
        fids = register(client)
        for start in range(0, STREAM, 4 * BATCH):
            for i, task_id in enumerate(submit(client, fids, start, 4 * BATCH)):
                expected[task_id] = start + i
        before = endpoint_pids(client)
        assert len(before) == 1
    finally:
        assert daemon.stop() == 0  # SIGTERM with --keep-endpoints: no drain of tasks
    assert all(os.path.exists(f"/proc/{pid}") for pid in before)
    kept = audit_events(site["state"], "daemon.endpoints_kept")
    assert kept and [e["pid"] for e in kept[-1]["endpoints"]] == before

    # A second upgrade right after the first: an adopted endpoint is kept and adopted again.
    daemon = start_daemon(site["config"], site["state"], log_name="upgrade-2.log", extra_args=keep)
    try:
        client = daemon.client(token)
        wait_adopted(daemon, client, before)
        for i, task_id in enumerate(submit(client, fids, STREAM, BATCH)):
            expected[task_id] = STREAM + i
    finally:
        assert daemon.stop() == 0
    assert all(os.path.exists(f"/proc/{pid}") for pid in before)

    daemon = start_daemon(site["config"], site["state"], log_name="upgrade-3.log")
    try:
        client = daemon.client(token)
        wait_adopted(daemon, client, before)
        views = wait_all(client, list(expected), deadline=120)
        check_results(views, expected)
        assert endpoint_pids(client) == before
    finally:
        assert daemon.stop() == 0
    assert not [
        e
        for e in audit_events(site["state"], "task.finished")
        if e.get("reason") == "task.endpoint_lost"
    ]
    assert [e["pid"] for e in audit_events(site["state"], "endpoint.adopted")][-2:] == before * 2
    wait_no_processes(account.pw_uid)


# -- forged endpoints ------------------------------------------------------------------

CLAIMANT = r"""
import json, socket, struct, sys, time
path, endpoint_id, secret = sys.argv[1:4]
print("ready", flush=True)
sys.stdin.readline()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(path)
header = json.dumps({"v": 1, "kind": "adopt", "endpoint_id": endpoint_id,
                     "secret": secret, "held": []}).encode()
sock.sendall(struct.pack(">II", 4 + len(header), len(header)) + header)
data = b""
while len(data) < 8:
    chunk = sock.recv(65536)
    if not chunk:
        break
    data += chunk
print("adopted" if len(data) >= 8 else "closed", flush=True)
while True:
    time.sleep(3600)
"""


HOARDER = r"""
import socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    held.append(sock)
extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
extra.connect(path)
extra.settimeout(5)
try:
    print("closed" if extra.recv(1) == b"" else "data", flush=True)
except socket.timeout:
    print("open", flush=True)
while True:
    time.sleep(3600)
"""


def claimant(python: str, account: pwd.struct_passwd, path: Path, eid: str, secret: str) -> Any:
    proc = subprocess.Popen(
        [python, "-c", CLAIMANT, str(path), eid, secret],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        cwd="/",
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def record_for(proc: Any, account: pwd.struct_passwd, eid: str, secret: str) -> EndpointRecord:
    facts = read_process(proc.pid)
    assert facts is not None
    return EndpointRecord(
        endpoint_id=eid,
        account=account.pw_name,
        uid=account.pw_uid,
        gid=account.pw_gid,
        pid=proc.pid,
        start_time=facts.start_time,
        exe=facts.exe,
        secret_sha256=secret_hash(secret),
        config_key="k" * 64,
        endpoint="hpc",
        account_json=json.dumps({"home": account.pw_dir, "shell": account.pw_shell}),
        created=time.time(),
    )


def answer(proc: Any) -> str:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return str(proc.stdout.readline().strip())


GRACE = 4


def short_grace(config: Path) -> Path:
    """The same deployment with a grace period of a few seconds."""
    import yaml

    settings = yaml.safe_load(config.read_text())
    settings["restart"]["grace_period"] = GRACE
    path = config.with_name("mepd-short-grace.yaml")
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def test_forged_endpoints_are_not_adopted(site: dict[str, Any]) -> None:
    first, second = site["accounts"]
    python, state = site["python"], site["state"]
    socket_path = state / "adopt" / "adopt.sock"
    genuine = claimant(python, first, socket_path, f"{first.pw_name}/k/901", "s" * 64)
    wrong_secret = claimant(python, first, socket_path, f"{first.pw_name}/k/902", "x" * 64)
    reused = claimant(python, first, socket_path, f"{first.pw_name}/k/903", "s" * 64)
    intruder = claimant(python, second, socket_path, f"{first.pw_name}/k/901", "s" * 64)
    procs = [genuine, wrong_secret, reused, intruder]
    try:
        store = TaskStore.open(state / "tasks.sqlite3")
        store.put_endpoint(record_for(genuine, first, f"{first.pw_name}/k/901", "s" * 64))
        store.put_endpoint(record_for(wrong_secret, first, f"{first.pw_name}/k/902", "s" * 64))
        shifted = record_for(reused, first, f"{first.pw_name}/k/903", "s" * 64)
        store.put_endpoint(attrs.evolve(shifted, start_time=shifted.start_time + 1))
        held = [
            NewTask(f"forged-{n}", "o", "hpc", first.pw_name, "s", "f" * 64, b"x", None, uep_id=eid)
            for n, eid in ((1, f"{first.pw_name}/k/902"), (2, f"{first.pw_name}/k/903"))
        ]
        store.add_tasks(held, state="dispatched", now=time.time())
        store.close()
        daemon = start_daemon(short_grace(site["config"]), state, log_name="forged.log")
        try:
            assert answer(intruder) == "closed"  # another account's process
            # One account holding connections open cannot keep the others out: past
            # MAX_HANDSHAKES_PER_UID its next connection is closed at once.
            hoarder = subprocess.Popen(
                [python, "-c", HOARDER, str(socket_path), str(MAX_HANDSHAKES_PER_UID)],
                stdout=subprocess.PIPE,
                text=True,
                user=second.pw_uid,
                group=second.pw_gid,
                extra_groups=[],
                cwd="/",
                start_new_session=True,
            )
            procs.append(hoarder)
            assert hoarder.stdout is not None
            assert hoarder.stdout.readline().strip() == "closed"
            assert answer(wrong_secret) == "closed"
            assert answer(reused) == "closed"  # its record was dropped at start
            assert answer(genuine) == "adopted"  # the same socket adopts the real one
            # Verified alive but never adopted: stopped when the grace period ends.
            assert wrong_secret.wait(GRACE + 30) == -signal.SIGTERM
            assert genuine.poll() is None
        finally:
            assert daemon.stop() == 0
    finally:
        for proc in procs:
            with_suppressed_kill(proc.pid)
            proc.wait(10)
    refusals = [e["reason"] for e in audit_events(state, "endpoint.adoption_refused")]
    assert any("start time differs" in r for r in refusals), refusals
    assert any("peer uid/gid" in r for r in refusals), refusals
    assert "wrong secret" in refusals
    store = TaskStore.open(state / "tasks.sqlite3")
    try:
        for task_id in ("forged-1", "forged-2"):  # its endpoint stopped / its pid reused
            lost = store.get(task_id)
            assert lost is not None and lost.error == {"reason": "task.endpoint_lost"}
    finally:
        store.close()


def test_without_adoption_the_previous_daemons_endpoints_are_stopped(
    site: dict[str, Any],
) -> None:
    """Adoption turned off between two runs: a live endpoint the previous daemon left is
    stopped at start (through its pidfd), and its tasks end task.endpoint_lost."""
    import yaml

    first = site["accounts"][0]
    state = site["state"]
    settings = yaml.safe_load(site["config"].read_text())
    settings["restart"]["adopt_endpoints"] = False
    config = site["config"].with_name("mepd-no-adoption.yaml")
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    eid = f"{first.pw_name}/k/911"
    left = claimant(site["python"], first, state / "adopt" / "adopt.sock", eid, "s" * 64)
    try:
        store = TaskStore.open(state / "tasks.sqlite3")
        store.put_endpoint(record_for(left, first, eid, "s" * 64))
        task = NewTask("left-1", "o", "hpc", first.pw_name, "s", "f" * 64, b"x", None, uep_id=eid)
        store.add_tasks([task], state="dispatched", now=time.time())
        store.close()
        daemon = start_daemon(config, state, log_name="no-adoption.log")
        try:
            assert left.wait(30) == -signal.SIGTERM
        finally:
            assert daemon.stop() == 0
    finally:
        with_suppressed_kill(left.pid)
        left.wait(10)
    store = TaskStore.open(state / "tasks.sqlite3")
    try:
        lost = store.get("left-1")
        assert lost is not None and lost.error == {"reason": "task.endpoint_lost"}
        assert eid not in {r.endpoint_id for r in store.endpoint_records()}
    finally:
        store.close()
