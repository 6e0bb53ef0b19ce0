"""Batch jobs left by user endpoints that no longer exist: found and cancelled at start.

A user endpoint's Parsl engine names every batch job after the endpoint's own process
(``OwnerTag`` of ``mepcore.tasks.parsl_owner``: ``parsl.mep-<host>-<boot>-<pid>-<start>
.block-<n>.<time>``). When a user endpoint is killed (``kill -9`` of it, or of the daemon:
the endpoint dies with its daemon) nothing cancels its jobs; their worker pools stop on
their own once the interchange has been silent for ``heartbeat_threshold``, but a
pending job would still start later and an allocation is held until then. So the
daemon, when it starts serving, asks Slurm for every queued or running job
(``squeue``, as root: reading the queue touches no user's file), keeps those whose tag
names a process of *this* machine that no longer exists (same host, and either another
boot or no process with that pid and start time), and cancels each one **as the job's
owner**: ``scancel`` runs with the owner's uid and gid (``subprocess`` drops them, no
shell, no PAM session), so Slurm itself checks that the job is theirs. Root's authority
is never used against the scheduler: a job name forged or misread can at most make a
user cancel one of their own jobs. A job counts as cancelled when the queue, read again,
no longer has it pending or running. Every cancellation (or failure) is an audit event
``orphan.job_cancelled`` / ``orphan.cancel_failed``. The commands run as asyncio
subprocesses, killed after 30 s or when the daemon stops first: a Slurm that does not
answer (``squeue`` waits 10 s for a controller that is down) never delays a stop.

Deliberately not here: jobs of endpoints on other hosts (this machine cannot tell whether
they live; their own daemon sweeps them), schedulers other than Slurm (their jobs end
with their worker pools), and run directories (they are the user's files: the next
engine of that user removes its dead predecessors', as the user).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import structlog

from mepcore.tasks.parsl_owner import OwnerTag, machine_keys
from mepd.audit import AuditUnavailable
from mepd.trust import Checker, Need

log = structlog.get_logger("mepd.orphans")

# Root runs the scheduler's commands from the system's directories only, never from a
# PATH it inherited, and only after the trust check (security rule 8).
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
COMMAND_TIMEOUT = 30.0
# Jobs that still hold or wait for an allocation.
_LIVE_STATES = "PENDING,RUNNING,SUSPENDED,CONFIGURING"
_FORMAT = "%i|%U|%u|%j"
_JOB_PREFIX = "parsl.mep-"

_ENVIRONMENT = {"PATH": SYSTEM_PATH, "LANG": "C"}

# run(argv, **identity) -> (status, stdout, stderr); identity: user, group, extra_groups
Runner = Callable[..., Awaitable[tuple[int, str, str]]]


@attrs.frozen
class BatchJob:
    """One line of ``squeue``: a job, its owner and name."""

    job_id: str
    uid: int
    user: str
    name: str

    @property
    def owner(self) -> OwnerTag | None:
        """The user endpoint that submitted it, when it is one of mep's blocks."""
        if not self.name.startswith(_JOB_PREFIX) or ".block-" not in self.name:
            return None
        return OwnerTag.find(self.name)


@attrs.frozen
class Cancellation:
    """What happened to one orphaned job."""

    job: BatchJob
    ok: bool
    detail: str = ""


def parse_squeue(output: str) -> list[BatchJob]:
    """Lines ``id|uid|user|name`` (the name last: it may hold anything)."""
    jobs = []
    for line in output.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) != 4 or not parts[0] or not parts[1].isdigit():
            continue
        jobs.append(BatchJob(parts[0], int(parts[1]), parts[2], parts[3]))
    return jobs


def orphaned(jobs: Sequence[BatchJob], machine: tuple[str, str]) -> list[BatchJob]:
    """The jobs of mep's user endpoints on this machine that no longer exist."""
    return [j for j in jobs if j.owner is not None and j.owner.is_gone(machine) is True]


def _command(name: str) -> str | None:
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        return None
    refusals, _ = Checker.for_daemon().check_path(Need(path, f"{name} (scheduler)", "orphans"))
    if refusals:
        log.error("orphans.command_untrusted", command=path, problem=str(refusals[0]))
        return None
    return path


def _account_for(job: BatchJob) -> pwd.struct_passwd | str:
    """The job's owner as a local account we may act as, or why not."""
    try:
        entry = pwd.getpwuid(job.uid)
    except KeyError:
        return f"uid {job.uid} has no account"
    if entry.pw_name != job.user:
        return f"uid {job.uid} is {entry.pw_name}, not {job.user}"
    if job.uid == 0:
        return "the job belongs to root"
    if os.geteuid() != 0 and job.uid != os.geteuid():
        return "the daemon runs unprivileged and the job is another account's"
    return entry


async def run_command(
    argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, **drop: Any
) -> tuple[int, str, str]:
    """(status, stdout, stderr) of a command run without a shell from ``/`` with a minimal
    environment; killed at ``timeout``, or when the caller is cancelled (a daemon that
    stops does not wait for a scheduler that does not answer)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env=_ENVIRONMENT,
        **drop,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(asyncio.CancelledError):
            await process.wait()
        raise
    code = process.returncode
    return (
        (-1 if code is None else code),
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


async def cancel_as_owner(scancel: str, job: BatchJob, run: Runner = run_command) -> Cancellation:
    """``scancel <job>`` with the owner's uid and gid (no shell, a minimal environment)."""
    account = _account_for(job)
    if isinstance(account, str):
        return Cancellation(job, False, account)
    drop: dict[str, Any] = {}
    if os.geteuid() == 0:
        drop = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    try:
        code, out, err = await run([scancel, job.job_id], **drop)
    except (OSError, TimeoutError) as exc:
        return Cancellation(job, False, f"{type(exc).__name__}: {exc}")
    if code != 0:
        return Cancellation(job, False, (err or out).strip()[:1000] or f"scancel exited {code}")
    return Cancellation(job, True)


def _queue_command(squeue: str, job_ids: Sequence[str] = ()) -> list[str]:
    argv = [squeue, "--noheader", f"--states={_LIVE_STATES}", f"--format={_FORMAT}"]
    if job_ids:
        argv.append(f"--jobs={','.join(job_ids)}")
    return argv


async def find_and_cancel(
    run: Runner = run_command, which: Callable[[str], str | None] = _command
) -> list[Cancellation]:
    """List the queue, cancel the orphans, and check they are no longer queued."""
    squeue, scancel = which("squeue"), which("scancel")
    if squeue is None or scancel is None:
        return []  # no Slurm here (or not one root may run)
    try:
        code, out, err = await run(_queue_command(squeue))
    except (OSError, TimeoutError) as exc:
        log.warning("orphans.queue_unreadable", detail=f"{type(exc).__name__}: {exc}")
        return []
    if code != 0:
        log.warning("orphans.queue_unreadable", detail=err.strip()[:1000])
        return []
    jobs = parse_squeue(out)
    orphans = orphaned(jobs, machine_keys())
    log.info("orphans.queue_read", jobs=len(jobs), orphans=len(orphans))
    done = [await cancel_as_owner(scancel, job, run) for job in orphans]
    if not done:
        return done
    # What counts is the queue afterwards: a job no longer pending or running is gone,
    # whatever scancel's exit status said (the daemon, a subreaper, may collect the
    # status of a child of another uid before its waiter does).
    try:
        code, out, _ = await run(_queue_command(squeue, [c.job.job_id for c in done]))
    except (OSError, TimeoutError):
        return done
    if code != 0:
        return done
    still = {job.job_id for job in parse_squeue(out)}
    return [
        Cancellation(
            c.job,
            c.job.job_id not in still,
            "" if c.job.job_id not in still else (c.detail or "still queued after scancel"),
        )
        for c in done
    ]


async def sweep_orphan_jobs(
    audit: Any, run: Runner = run_command, which: Callable[[str], str | None] = _command
) -> list[Cancellation]:
    """Find and cancel orphaned batch jobs, then audit each one."""
    try:
        done = await find_and_cancel(run, which)
    except Exception:
        log.exception("orphans.sweep_failed")
        return []
    for item in done:
        job = item.job
        owner = job.owner
        fields = {
            "job_id": job.job_id,
            "account": job.user,
            "uid": job.uid,
            "job_name": job.name,
            "endpoint_pid": None if owner is None else owner.pid,
            "scheduler": "slurm",
        }
        event = "orphan.job_cancelled" if item.ok else "orphan.cancel_failed"
        if item.ok:
            log.info(event, **fields)
        else:
            log.warning(event, detail=item.detail, **fields)
        with contextlib.suppress(AuditUnavailable):
            audit.record(event, **fields, **({} if item.ok else {"detail": item.detail}))
    return done
