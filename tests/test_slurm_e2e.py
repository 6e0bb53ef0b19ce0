"""End to end on a real single-node Slurm (``.ci/slurm-up``): mepd, two real accounts, user
endpoints whose Parsl engine runs their functions in batch jobs owned by the account.

What a cluster does to blocks, and what the caller sees: a cancelled job fails its task
with ``task.worker_lost`` naming the job and ``CANCELLED`` within the heartbeat threshold
and a new block serves the next task; ``max_blocks: 2`` under load is two jobs, and idle
blocks are cancelled; an impossible request fails with ``task.provider_failed`` carrying
Slurm's own message (in mepd's log and the user's endpoint log too); ``kill -9`` of mepd
leaves, after a restart, no interchange and no job of those accounts; run directories are
under the user's home and go with their endpoints, leaving nothing in /tmp. One daemon
serves the module (each scenario its own user endpoint, by its variables; the last test
stops it); the ``kill -9`` scenario has its own. Slurm comes from the session fixture
``slurm_cluster`` (tests/conftest.py: ``.ci/slurm-up`` once per session, skipped with
its reason where Slurm cannot run). Every wait polls with a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from mepcore.tasks import pack_args, pack_function, unpack_value
from mepcore.tasks.parsl_owner import OwnerTag
from tests.daemon_harness import RunningDaemon, remote_function, start_daemon, write_deployment

pytestmark = [pytest.mark.root, pytest.mark.slurm, pytest.mark.parsl]

# The heartbeat threshold of these endpoints (seconds): a lost block's task fails within it.
THRESHOLD = 10
# Parsl's strategy runs every second here; a block is cancelled after 3 s without tasks.
TEMPLATE = """\
display_name: {{ tag | default('"slurm test"') }}
engine:
  type: GlobusComputeEngine
  max_workers_per_node: {{ workers | default(1) }}
  heartbeat_period: 2
  heartbeat_threshold: {{ threshold | default(THRESHOLD) }}
  max_idletime: 3
  job_status_kwargs:
    strategy_period: 1
  provider:
    type: SlurmProvider
    partition: "debug"
    exclusive: false
    walltime: "00:15:00"
    init_blocks: 0
    min_blocks: 0
    max_blocks: {{ max_blocks | default(1) }}
{%- if mem_gb is defined %}
    mem_per_node: {{ mem_gb }}
{%- endif %}
    launcher:
      type: SrunLauncher
heartbeat_period: 1
idle_heartbeats_soft: 100000
idle_heartbeats_hard: 100000
""".replace("THRESHOLD", str(THRESHOLD))
SCHEMA = {
    "type": "object",
    "properties": {
        "tag": {"type": "string", "maxLength": 64},
        "workers": {"type": "integer", "minimum": 1, "maximum": 4},
        "max_blocks": {"type": "integer", "minimum": 1, "maximum": 4},
        "mem_gb": {"type": "integer", "minimum": 1},
        "threshold": {"type": "integer", "minimum": 4, "maximum": 600},
    },
    "additionalProperties": False,
}

WHERE = remote_function(
    "def where(seconds, marker=None):\n"
    "    import os, time\n"
    "    if marker:\n"
    "        open(marker, 'w').close()\n"
    "    time.sleep(seconds)\n"
    "    return (os.getuid(), os.environ.get('SLURM_JOB_ID'))\n",
    "where",
)
LIVE = "PD,R,S,CF,CG"
TMP_BEFORE: dict[int, set[str]] = {}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_for(
    what: str,
    check: Callable[[], Any],
    deadline: float,
    pause: float = 0.2,
    seen: Callable[[], Any] = lambda: "",
) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` (and what was
    ``seen`` instead) after ``deadline``."""
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline} s: {what}; {seen()}")
        time.sleep(pause)  # the interval of a deadline poll, not a wait for an event


def jobs_of(user: str, states: str = LIVE) -> list[dict[str, str]]:
    out = subprocess.run(
        ["squeue", "--noheader", f"--user={user}", f"--states={states}", "--format=%i|%T|%j"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [
        dict(zip(("id", "state", "name"), line.split("|", 2), strict=True))
        for line in out.splitlines()
        if line.strip()
    ]


def job_owner(job_id: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return out.split("UserId=", 1)[1].split("(", 1)[0]


def tmp_entries(uid: int) -> list[str]:
    found = []
    for entry in os.scandir("/tmp"):
        try:
            if entry.stat(follow_symlinks=False).st_uid == uid:
                found.append(entry.path)
        except FileNotFoundError:
            continue
    return found


def owner_alive(run_dir: Path) -> bool:
    owner = OwnerTag.find(run_dir.name)
    return owner is not None and owner.is_gone() is False


def descendants(pid: int) -> dict[int, str]:
    """Living descendants of ``pid``: pid → command line."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    parent = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return {p: c for p, c in living(found).items()}


def living(pids: list[int]) -> dict[int, str]:
    """Those of ``pids`` that are alive (not zombies): pid → command line."""
    alive = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                alive[pid] = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return alive


@attrs.define
class User:
    account: pwd.struct_passwd
    client: httpx.Client
    function_id: str

    def submit(self, variables: dict[str, Any], *args: Any) -> str:
        r = self.client.post(
            "/v1/endpoints/hpc/submit",
            json={
                "user_endpoint_config": variables,
                "tasks": [{"function_id": self.function_id, "args": b64(pack_args(args, {}))}],
            },
        )
        assert r.status_code == 200, r.text
        (task_id,) = r.json()["task_ids"]
        return str(task_id)

    def view(self, task_id: str, deadline: float) -> dict[str, Any]:
        """The task's final view, long-polled until ``deadline`` seconds pass."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            r = self.client.post("/v1/tasks/wait", json={"task_ids": [task_id], "timeout": 2})
            r.raise_for_status()
            for view in r.json()["tasks"]:  # only tasks that are final
                if view["task_id"] == task_id and view["state"] in ("success", "failed"):
                    return dict(view)
        pytest.fail(f"task {task_id} not final within {deadline} s")

    def value(self, task_id: str, deadline: float = 120) -> Any:
        view = self.view(task_id, deadline)
        assert view["state"] == "success", view
        return unpack_value(base64.b64decode(view["result"]))

    def marker(self, name: str) -> Path:
        return Path(self.account.pw_dir) / f"started-{name}"


@attrs.define
class Site:
    config: Path
    state: Path
    runtime: tuple[str, tuple[str, ...]]


def write_site(top: Path, runtime: tuple[str, tuple[str, ...]]) -> Site:
    config = write_deployment(
        top,
        python=runtime[0],
        package_paths=runtime[1],
        limits={"drain_timeout": 20, "start_timeout": 60},
    )
    # Eight characters of any kind: read the same by Python's regex and by the reduced
    # dialect of expression mappings (where [0-9a-f] would be literal text).
    mapping = [
        {
            "DATA_TYPE": "expression_identity_mapping#1.0.0",
            "mappings": [
                {"source": "{username}", "match": "(mept........)@example\\.org", "output": "{0}"}
            ],
        }
    ]
    (top / "mapping.json").write_text(json.dumps(mapping))
    templates = top / "templates"
    (templates / "user_config_template.yaml.j2").write_text(TEMPLATE)
    (templates / "user_config_schema.json").write_text(json.dumps(SCHEMA))
    (templates / "user_environment.yaml").write_text("SLURM_EXPORT_ENV: ALL\n")
    return Site(config, top / "state", runtime)


def user_of(daemon: RunningDaemon, account: pwd.struct_passwd) -> User:
    client = daemon.client(daemon.token(f"{account.pw_name}@example.org"), timeout=60)
    fid, body = pack_function(WHERE)
    r = client.post("/v1/functions", json={"function": b64(body), "name": "where"})
    assert r.status_code == 200, r.text
    return User(account, client, fid)


@pytest.fixture(scope="module")
def runtime() -> tuple[str, tuple[str, ...]]:
    from tests.runtime_venv import package_paths, runtime_python

    python = runtime_python()
    return python, tuple(p for p in package_paths(python) if os.path.isdir(p))


@pytest.fixture(scope="module")
def accounts(slurm_cluster: str) -> Iterator[list[pwd.struct_passwd]]:
    from tests.accounts import create_account, delete_account

    made = [create_account(), create_account()]
    # uids come back after userdel: what an earlier owner left in /tmp is not ours.
    for account in made:
        TMP_BEFORE[account.pw_uid] = set(tmp_entries(account.pw_uid))
    try:
        yield made
    finally:
        for account in made:
            subprocess.run(["scancel", f"--user={account.pw_name}"], check=False, timeout=30)
            delete_account(account.pw_name)
            for path in set(tmp_entries(account.pw_uid)) - TMP_BEFORE.pop(account.pw_uid):
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    runtime: tuple[str, tuple[str, ...]],
    accounts: list[pwd.struct_passwd],
) -> Iterator[tuple[RunningDaemon, list[User]]]:
    top = tmp_path_factory.mktemp("slurm-site")
    where = write_site(top, runtime)
    daemon = start_daemon(where.config, where.state)
    try:
        yield daemon, [user_of(daemon, a) for a in accounts]
    finally:
        daemon.stop()


def test_functions_run_in_jobs_owned_by_the_mapped_account(
    site: tuple[RunningDaemon, list[User]],
) -> None:
    _, users = site
    tasks = [(user, user.submit({"tag": "owners"}, 0)) for user in users]
    for user, task_id in tasks:
        uid, job_id = user.value(task_id)
        assert uid == user.account.pw_uid
        assert job_id, "the task ran outside a Slurm job"
        assert job_owner(job_id) == user.account.pw_name
    names = {j["name"] for u in users for j in jobs_of(u.account.pw_name, "all")}
    assert names and all(n.startswith("parsl.mep-") and ".block-" in n for n in names), names


def test_a_cancelled_block_fails_its_task_with_the_job_state_and_is_replaced(
    site: tuple[RunningDaemon, list[User]],
) -> None:
    _, users = site
    user = users[0]
    variables = {"tag": "scancel"}
    marker = user.marker("scancel")
    long = user.submit(variables, 600, str(marker))
    wait_for("the long task to start", marker.exists, 90)
    (job,) = wait_for(
        "the block's job", lambda: [j for j in jobs_of(user.account.pw_name, "R")], 30
    )
    subprocess.run(["scancel", job["id"]], check=True, timeout=30)
    # Within the threshold, plus a strategy round and the status query: view() fails the
    # test if the task is not final by then (a deadline, not a measured duration).
    view = user.view(long, THRESHOLD + 10)
    error = view["error"]
    assert error["reason"] == "task.worker_lost", view
    assert f"job {job['id']}" in error["message"] and "CANCELLED" in error["message"], error
    # The next task gets a new block (a new job) and succeeds.
    _, replacement = user.value(user.submit(variables, 0))
    assert replacement != job["id"]


def test_max_blocks_two_under_load_is_two_jobs_and_idle_blocks_are_cancelled(
    site: tuple[RunningDaemon, list[User]],
) -> None:
    _, users = site
    user = users[1]
    name = user.account.pw_name
    variables = {"tag": "load", "max_blocks": 2}
    wait_for("no earlier job of the account", lambda: not jobs_of(name), 60)
    tasks = [user.submit(variables, 8) for _ in range(4)]
    two = wait_for("two jobs", lambda: len(jobs_of(name)) == 2 and jobs_of(name), 45)
    ran_in = {user.value(t)[1] for t in tasks}
    assert ran_in == {j["id"] for j in two}
    # Idle: both blocks are cancelled (max_idletime 3 s), not left to their walltime.
    wait_for("idle blocks cancelled", lambda: not jobs_of(name), 45)
    states = {j["id"]: j["state"] for j in jobs_of(name, "all")}
    assert all(states[j["id"]] == "CANCELLED" for j in two), states


def test_an_impossible_request_fails_with_slurms_message(
    site: tuple[RunningDaemon, list[User]],
) -> None:
    daemon, users = site
    user = users[0]
    view = user.view(user.submit({"tag": "impossible", "mem_gb": 500}, 0), 90)
    error = view["error"]
    assert error["reason"] == "task.provider_failed", view
    assert "sbatch: error:" in error["message"], error
    assert "Memory specification" in error["message"] or "not available" in error["message"]
    log = wait_for(
        "mepd's log to report it",
        lambda: [
            line
            for line in daemon.stderr().splitlines()
            if "task.provider_failed" in line and "sbatch: error" in line
        ],
        30,
    )
    assert log
    # And in the user's own endpoint log, written as the user.
    endpoint_log = Path(user.account.pw_dir) / ".mep" / "run" / "hpc" / "endpoint.log"
    assert endpoint_log.stat().st_uid == user.account.pw_uid
    events = [json.loads(line) for line in endpoint_log.read_text().splitlines()]
    assert any(
        e["event"] == "provider_failed" and "sbatch: error" in e["message"] for e in events
    ), events


def test_kill_9_of_mepd_then_restart_leaves_no_interchange_and_no_job(
    tmp_path: Path,
    runtime: tuple[str, tuple[str, ...]],
    accounts: list[pwd.struct_passwd],
) -> None:
    # A threshold longer than the test: the workers do not give up on their own, the
    # restarted daemon has to find and cancel the jobs.
    where = write_site(tmp_path / "site", runtime)
    variables = {"tag": "kill", "threshold": 300}
    for account in accounts:
        wait_for("no earlier job", lambda a=account: not jobs_of(a.pw_name), 60)
    daemon = start_daemon(where.config, where.state)
    try:
        users = [user_of(daemon, a) for a in accounts]
        for user in users:
            user.submit(variables, 600, str(user.marker("kill")))
        for user in users:
            wait_for("the tasks to start", user.marker("kill").exists, 90)
        before = {u.account.pw_name: jobs_of(u.account.pw_name, "R") for u in users}
        assert all(len(jobs) == 1 for jobs in before.values()), before
        # The daemon's user endpoints, their interchanges (and nothing else of theirs
        # runs on this machine outside the jobs).
        started = descendants(daemon.process.pid)
        interchanges = [p for p, c in started.items() if "interchange" in c]
        assert len(interchanges) == 2, started
    finally:
        daemon.kill()
    restarted = start_daemon(where.config, where.state, log_name="mepd-2.log")
    try:
        wait_for(
            "no user endpoint and no interchange left",
            lambda: not living(list(started)),
            30,
            seen=lambda: living(list(started)),
        )
        for user in users:
            name = user.account.pw_name
            wait_for(
                "no job left",
                lambda name=name: not jobs_of(name),
                30,
                seen=lambda name=name: jobs_of(name),
            )
        audit = [
            json.loads(line)
            for line in (where.state / "audit.jsonl").read_text().splitlines()
            if "orphan." in line
        ]
        cancelled = {
            (e["account"], e["job_id"]) for e in audit if e["event"] == "orphan.job_cancelled"
        }
        expected = {(name, j["id"]) for name, jobs in before.items() for j in jobs}
        # Cancelled, not ended on their own (the workers would wait 300 s). Any daemon
        # starting on this machine sweeps: one of a concurrent test run may come first;
        # alone (CI), this one records every job.
        for name, job_id in expected:
            state = {j["id"]: j["state"] for j in jobs_of(name, "all")}.get(job_id)
            assert state == "CANCELLED", (name, job_id, state)
        assert cancelled <= expected, audit
        if cancelled != expected:
            assert "orphans.queue_read" in restarted.stderr(), restarted.stderr()[-3000:]
    finally:
        restarted.stop()


def test_run_directories_are_in_the_home_and_go_with_the_endpoints(
    site: tuple[RunningDaemon, list[User]],
) -> None:
    """Runs last: stops the module's daemon. Submit scripts, job output and keys were in
    ~/.mep/run/hpc/<tag> (which compute nodes see), not in /tmp; stopping the daemon
    stops the user endpoints, which cancel their blocks and remove those directories,
    and the worker pools' private TMPDIRs are gone with them."""
    daemon, users = site
    user = users[0]
    user.value(user.submit({"tag": "rundir"}, 0))
    base = Path(user.account.pw_dir) / ".mep" / "run" / "hpc"
    runs = [p for p in base.iterdir() if p.name.startswith("mep-")]
    assert runs, list(base.iterdir())
    scripts = [
        f.read_text()
        for run in runs
        for f in (run / "submit_scripts").iterdir()
        if not f.name.endswith((".stdout", ".stderr"))
    ]
    assert any(f"#SBATCH --output={run}/" in text for run in runs for text in scripts), scripts
    # Directories of this account's endpoints killed earlier (the kill -9 scenario) went
    # when this endpoint started; those of the living ones stay until they stop.
    assert all(owner_alive(run) for run in runs), runs
    living_runs = [
        run
        for each in users
        for run in (Path(each.account.pw_dir) / ".mep" / "run" / "hpc").iterdir()
        if run.name.startswith("mep-") and owner_alive(run)
    ]
    daemon.stop()
    assert [run for run in living_runs if run.exists()] == []
    for each in users:
        name = each.account.pw_name
        wait_for("every block cancelled", lambda name=name: not jobs_of(name), 30)
        wait_for(
            "nothing of the account left in /tmp",
            lambda uid=each.account.pw_uid: not set(tmp_entries(uid)) - TMP_BEFORE[uid],
            15,
            seen=lambda uid=each.account.pw_uid: tmp_entries(uid),
        )
