"""Real POSIX accounts for root tests: created with useradd, removed with userdel.

Names are ``mept<random>`` so parallel runs and leftovers of a crashed run never
collide with real users; ``remove_leftovers()`` clears accounts of earlier runs.
Test runs on one machine change the account database one command at a time (an flock
on ``LOCK``): useradd and userdel give up with "cannot lock /etc/passwd" when another
one holds it, so a concurrent run would otherwise fail now and then. A command that
still finds the database locked (by something else) is retried.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import secrets
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

PREFIX = "mept"
# A password hash of a random password nobody knows: the accounts are usable (not
# locked, as useradd's default "!" would make them, which mepd refuses) but no one can
# log in with a password.
UNKNOWN_PASSWORD_HASH = "$6$/eOpF59kf.UV4xjA$a8eaoo31TfZqZc8JX2Gi.K.7T8wEhZITiOTp0qLmyl98JWFtxtv8gBv9WRHwRqutQMfpKZmt2D.ZIQvL46QlJ/"


LOCK = "/var/tmp/mep-test-accounts.lock"
# useradd/userdel/groupadd/groupdel exit status: the database is locked by someone else.
_DATABASE_BUSY = 10
_ATTEMPTS = 20


@contextmanager
def _account_database() -> Iterator[None]:
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _command(argv: Sequence[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    pause = threading.Event()
    for attempt in range(_ATTEMPTS):
        with _account_database():
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != _DATABASE_BUSY or attempt == _ATTEMPTS - 1:
            break
        pause.wait(0.5)  # someone outside the test runs holds the database
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    return done


def _run(argv: Sequence[str]) -> None:
    _command(argv, check=True)


def create_group(name: str | None = None) -> str:
    name = name or f"{PREFIX}g{secrets.token_hex(3)}"
    _run(["groupadd", name])
    return name


def delete_group(name: str) -> None:
    _command(["groupdel", name], check=False)


def create_account(
    *, groups: Sequence[str] = (), home_mode: int = 0o700, name: str | None = None
) -> pwd.struct_passwd:
    """Create an account with a home directory and return its password entry."""
    name = name or f"{PREFIX}{secrets.token_hex(4)}"
    argv = ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group"]
    argv += ["--uid", str(_fresh_uid())]
    argv += ["--password", UNKNOWN_PASSWORD_HASH]
    if groups:
        argv += ["--groups", ",".join(groups)]
    _run([*argv, name])
    entry = pwd.getpwnam(name)
    os.chmod(entry.pw_dir, home_mode)
    return entry


# Test accounts take a random uid from this range that no account, group and process has:
# useradd's default (the highest uid in use, plus one) hands a deleted account's uid to the
# next one, and a process of the old account still exiting (or a zombie nobody reaped)
# would then count as the new account's.
_UIDS = (30_000, 59_999)


def _fresh_uid() -> int:
    in_use = {entry.pw_uid for entry in pwd.getpwall()}
    in_use |= {entry.gr_gid for entry in grp.getgrall()}
    running = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                running.add(os.stat(f"/proc/{entry}").st_uid)
            except FileNotFoundError:
                continue
    while True:
        uid = _UIDS[0] + secrets.randbelow(_UIDS[1] - _UIDS[0])
        if uid not in in_use and uid not in running:
            return uid


def delete_account(name: str) -> None:
    # Kill anything left running as the account first, so userdel does not refuse.
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
    _command(["userdel", "--remove", "--force", name], check=False)


@contextmanager
def temporary_accounts(
    count: int, *, groups: Sequence[str] = ()
) -> Iterator[list[pwd.struct_passwd]]:
    made: list[pwd.struct_passwd] = []
    try:
        for _ in range(count):
            made.append(create_account(groups=groups))
        yield made
    finally:
        for entry in made:
            delete_account(entry.pw_name)


def remove_leftovers() -> None:
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(PREFIX) and len(entry.pw_name) == len(PREFIX) + 8:
            delete_account(entry.pw_name)


def processes_of(uid: int) -> list[int]:
    """The pids of the processes running as ``uid`` now."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                continue
    return pids


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
