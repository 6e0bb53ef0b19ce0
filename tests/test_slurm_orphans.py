"""mepd's sweep of orphaned batch jobs (``mepd.orphans``) without a Slurm: the queue as
``squeue`` prints it, which jobs are orphans, ``scancel`` run as the job's owner, and the
audit events. The real thing runs in tests/test_slurm_e2e.py."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
from typing import Any

import attrs

from mepcore.tasks.parsl_owner import OwnerTag, machine_keys
from mepd.orphans import (
    BatchJob,
    cancel_as_owner,
    orphaned,
    parse_squeue,
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
class FakeRunner:
    """``subprocess.run`` of squeue and scancel: what was asked, with which identity."""

    queue: str
    fail: set[str] = attrs.field(factory=set)
    calls: list[tuple[list[str], dict[str, Any]]] = attrs.field(factory=list)

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, kwargs))
        if argv[0].endswith("squeue"):
            return subprocess.CompletedProcess(argv, 0, self.queue, "")
        if argv[-1] in self.fail:
            return subprocess.CompletedProcess(argv, 1, "", "scancel: error: Access denied\n")
        return subprocess.CompletedProcess(argv, 0, "", "")


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
    runner = FakeRunner("")
    assert cancel_as_owner("/usr/bin/scancel", job, runner).ok
    (argv, kwargs) = runner.calls[0]
    assert argv == ["/usr/bin/scancel", "7"]
    assert kwargs["env"] == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C"}
    assert kwargs["cwd"] == "/" and "shell" not in kwargs
    if os.geteuid() == 0:
        drop = (kwargs["user"], kwargs["group"], kwargs["extra_groups"])
        assert drop == (account.pw_uid, account.pw_gid, [])
    # A name that does not match the uid, and root's own jobs, are never acted on.
    lying = attrs.evolve(job, user=account.pw_name + "x")
    roots = attrs.evolve(job, uid=0, user="root")
    assert not cancel_as_owner("/usr/bin/scancel", lying, runner).ok
    assert cancel_as_owner("/usr/bin/scancel", roots, runner).detail == "the job belongs to root"
    assert len(runner.calls) == 1


def test_each_cancellation_is_an_audit_event() -> None:
    account = someone()
    gone = dead_tag()
    queue = (
        f"21|{account.pw_uid}|{account.pw_name}|parsl.{gone}.block-0.1\n"
        f"22|{account.pw_uid}|{account.pw_name}|parsl.{gone}.block-1.1\n"
        f"23|{account.pw_uid}|{account.pw_name}|parsl.{OwnerTag.of_process(os.getpid())}.block-0.1\n"
    )
    runner = FakeRunner(queue, fail={"22"})
    audit = FakeAudit()
    done = asyncio.run(sweep_orphan_jobs(audit, runner, lambda name: f"/usr/bin/{name}"))
    assert [(c.job.job_id, c.ok) for c in done] == [("21", True), ("22", False)]
    assert [(event, fields["job_id"]) for event, fields in audit.events] == [
        ("orphan.job_cancelled", "21"),
        ("orphan.cancel_failed", "22"),
    ]
    assert audit.events[1][1]["detail"] == "scancel: error: Access denied"
    assert audit.events[0][1]["endpoint_pid"] == gone.pid


def test_no_slurm_no_sweep() -> None:
    runner = FakeRunner("")
    assert asyncio.run(sweep_orphan_jobs(FakeAudit(), runner, lambda name: None)) == []
    assert runner.calls == []
