"""mepd's sweep of orphaned batch jobs (``mepd.orphans``) without a Slurm: the queue as
``squeue`` prints it, which jobs are orphans, ``scancel`` run as the job's owner, and the
audit events. The real thing runs in tests/test_slurm_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import subprocess
from typing import Any

import attrs
import pytest

from mepcore.tasks.parsl_owner import OwnerTag, machine_keys
from mepd.orphans import (
    BatchJob,
    cancel_as_owner,
    orphaned,
    parse_squeue,
    run_command,
    sweep_orphan_jobs,
)


def dead_tag() -> OwnerTag:
    child = subprocess.Popen(["true"])
    tag = OwnerTag.of_process(child.pid)
    child.wait()
    return tag


def someone() -> pwd.struct_passwd:
    """An account whose jobs the sweep may cancel: this one, or as root ``nobody`` (the
    runner is a fake: nothing runs as anyone)."""
    return pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.getuid())


@attrs.define
class FakeSlurm:
    """squeue and scancel as ``mepd.orphans`` runs them: what was asked, as whom. A job
    scancel succeeds for leaves the queue; ``stuck`` jobs stay although scancel said yes."""

    jobs: list[str]
    fail: set[str] = attrs.field(factory=set)
    stuck: set[str] = attrs.field(factory=set)
    calls: list[tuple[list[str], dict[str, Any]]] = attrs.field(factory=list)

    async def __call__(self, argv: list[str], **identity: Any) -> tuple[int, str, str]:
        self.calls.append((argv, identity))
        if argv[0].endswith("squeue"):
            wanted = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("--jobs=")]
            lines = [j for j in self.jobs if not wanted or j.split("|", 1)[0] in wanted[0]]
            return 0, "".join(f"{line}\n" for line in lines), ""
        job_id = argv[-1]
        if job_id in self.fail:
            return 1, "", "scancel: error: Access denied\n"
        if job_id not in self.stuck:
            self.jobs = [j for j in self.jobs if not j.startswith(f"{job_id}|")]
        return 0, "", ""


@attrs.define
class FakeAudit:
    events: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def test_the_queue_is_read_with_the_name_last() -> None:
    jobs = parse_squeue("12|1001|alice|parsl.mep-a|b.block-0\n\nbad line\n13|x|bob|n\n")
    assert jobs == [BatchJob("12", 1001, "alice", "parsl.mep-a|b.block-0")]


def test_orphans_are_blocks_of_gone_endpoints_of_this_machine() -> None:
    alive = OwnerTag.of_process(os.getpid())
    gone = dead_tag()
    host, boot = machine_keys()
    elsewhere = attrs.evolve(gone, host="000000" if host != "000000" else "111111")
    earlier_boot = attrs.evolve(alive, boot="000000" if boot != "000000" else "111111")
    jobs = [
        BatchJob("1", 1001, "alice", f"parsl.{alive}.block-0.1.2"),
        BatchJob("2", 1001, "alice", f"parsl.{gone}.block-0.1.2"),
        BatchJob("3", 1002, "bob", f"parsl.{elsewhere}.block-1.1.2"),
        BatchJob("4", 1002, "bob", f"parsl.{earlier_boot}.block-3.1.2"),
        BatchJob("5", 1002, "bob", f"my-own-job-{gone}"),  # not a block of mep's
        BatchJob("6", 1002, "bob", "parsl.htex.block-0.1.2"),
    ]
    assert [j.job_id for j in orphaned(jobs, (host, boot))] == ["2", "4"]


def test_scancel_runs_as_the_jobs_owner_with_a_minimal_environment() -> None:
    account = someone()
    job = BatchJob("7", account.pw_uid, account.pw_name, f"parsl.{dead_tag()}.block-0.1")
    runner = FakeSlurm([])
    assert asyncio.run(cancel_as_owner("/usr/bin/scancel", job, runner)).ok
    (argv, identity) = runner.calls[0]
    assert argv == ["/usr/bin/scancel", "7"]
    if os.geteuid() == 0:
        drop = (identity["user"], identity["group"], identity["extra_groups"])
        assert drop == (account.pw_uid, account.pw_gid, [])
    else:
        assert identity == {}
    # A name that does not match the uid, and root's own jobs, are never acted on.
    lying = attrs.evolve(job, user=account.pw_name + "x")
    roots = attrs.evolve(job, uid=0, user="root")
    assert not asyncio.run(cancel_as_owner("/usr/bin/scancel", lying, runner)).ok
    refused = asyncio.run(cancel_as_owner("/usr/bin/scancel", roots, runner))
    assert refused.detail == "the job belongs to root"
    assert len(runner.calls) == 1


def test_each_cancellation_is_an_audit_event() -> None:
    account = someone()
    gone = dead_tag()
    queue = [
        f"21|{account.pw_uid}|{account.pw_name}|parsl.{gone}.block-0.1",
        f"22|{account.pw_uid}|{account.pw_name}|parsl.{gone}.block-1.1",
        f"24|{account.pw_uid}|{account.pw_name}|parsl.{gone}.block-2.1",
        f"23|{account.pw_uid}|{account.pw_name}|parsl.{OwnerTag.of_process(os.getpid())}.block-0.1",
    ]
    runner = FakeSlurm(queue, fail={"22"}, stuck={"24"})
    audit = FakeAudit()
    done = asyncio.run(sweep_orphan_jobs(audit, runner, lambda name: f"/usr/bin/{name}"))
    # The queue decides: 24's scancel said yes but the job is still there.
    assert [(c.job.job_id, c.ok) for c in done] == [("21", True), ("22", False), ("24", False)]
    assert [(event, fields["job_id"]) for event, fields in audit.events] == [
        ("orphan.job_cancelled", "21"),
        ("orphan.cancel_failed", "22"),
        ("orphan.cancel_failed", "24"),
    ]
    assert audit.events[1][1]["detail"] == "scancel: error: Access denied"
    assert audit.events[2][1]["detail"] == "still queued after scancel"
    assert audit.events[0][1]["endpoint_pid"] == gone.pid
    assert [argv[-1] for argv, _ in runner.calls if argv[0].endswith("scancel")] == [
        "21",
        "22",
        "24",
    ]


def test_no_slurm_no_sweep() -> None:
    runner = FakeSlurm([])
    assert asyncio.run(sweep_orphan_jobs(FakeAudit(), runner, lambda name: None)) == []
    assert runner.calls == []


def test_commands_run_without_a_shell_from_root_with_a_minimal_environment() -> None:
    code, out, _ = asyncio.run(run_command(["/bin/sh", "-c", 'echo "$PWD|$PATH|$HOME"']))
    assert (code, out) == (0, "/|/usr/local/bin:/usr/bin:/bin|\n")


def test_a_command_that_does_not_answer_is_killed() -> None:
    """At its timeout, or when the sweep is cancelled (the daemon stops): not waited for."""

    async def stopped_early() -> None:
        task = asyncio.create_task(run_command(["sleep", "600"]))
        await asyncio.sleep(0.2)  # let it start (no event to wait for: it is sleep(1))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(stopped_early())
    with pytest.raises(TimeoutError):
        asyncio.run(run_command(["sleep", "600"], timeout=0.2))
    assert sleeping_children() == []


def sleeping_children() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                parent = int(fh.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                command = fh.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and command == b"sleep\x00600\x00":
            found.append(int(entry))
    return found
