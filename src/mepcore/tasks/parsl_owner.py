"""Who owns a Parsl block or run directory: the ``OwnerTag`` in job and directory names.

A tag (``mep-<host>-<boot>-<pid>-<start>``) names the engine's process, so that a daemon
can tell the batch jobs of a user endpoint that no longer exists without any state, and
an engine can remove the run directories of this machine's dead engines.

This module deliberately cancels nothing and talks to no scheduler (mepd's orphan sweep
does); it only reads /proc and removes this user's dead run directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket

import attrs

from mepcore.tasks.parsl_guard import process_start_time

__all__ = ["OwnerTag", "machine_keys"]

_TAG = re.compile(r"mep-([0-9a-f]{6})-([0-9a-f]{6})-([0-9]{1,10})-([0-9]{1,20})")


def _short_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def machine_keys() -> tuple[str, str]:
    """(this host, this boot) as the tag writes them."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return _short_digest(socket.gethostname()), _short_digest(boot)


@attrs.frozen
class OwnerTag:
    """The process that owns a block or a run directory: ``mep-<host>-<boot>-<pid>-<start>``.

    Job names carry it (``parsl.<tag>.block-<n>.<time>``), so that a daemon can tell the
    jobs of a user endpoint that no longer exists (``is_gone``) without any state."""

    host: str
    boot: str
    pid: int
    start: int

    def __str__(self) -> str:
        return f"mep-{self.host}-{self.boot}-{self.pid}-{self.start}"

    @classmethod
    def of_process(cls, pid: int) -> OwnerTag:
        host, boot = machine_keys()
        return cls(host, boot, pid, process_start_time(pid) or 0)

    @classmethod
    def find(cls, text: str) -> OwnerTag | None:
        """The tag inside a job or directory name, if it has one."""
        match = _TAG.search(text)
        if match is None:
            return None
        host, boot, pid, start = match.groups()
        return cls(host, boot, int(pid), int(start))

    def is_gone(self, machine: tuple[str, str] | None = None) -> bool | None:
        """Whether the owner no longer exists: True (gone), False (alive), None (it ran on
        another host: this machine cannot tell)."""
        host, boot = machine or machine_keys()
        if self.host != host:
            return None
        if self.boot != boot:
            return True  # this machine rebooted since
        return process_start_time(self.pid) != self.start


def _remove_dead_run_dirs(base: str, machine: tuple[str, str]) -> None:
    """Run directories under ``base`` of this machine's engines that are gone (killed
    before they could clean up), if they are ours."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    uid = os.geteuid()
    for entry in entries:
        tag = OwnerTag.find(entry.name)
        if tag is None or entry.name != str(tag):
            continue
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_uid != uid or not entry.is_dir(
                follow_symlinks=False
            ):
                continue
            if tag.is_gone(machine):
                shutil.rmtree(entry.path, ignore_errors=True)
