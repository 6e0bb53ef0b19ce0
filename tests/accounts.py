"""Real POSIX accounts for root tests: created with useradd, removed with userdel.

Names are ``mept<random>`` so parallel runs and leftovers of a crashed run never
collide with real users; ``remove_leftovers()`` clears accounts of earlier runs.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

PREFIX = "mept"


def _run(argv: Sequence[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def create_group(name: str | None = None) -> str:
    name = name or f"{PREFIX}g{secrets.token_hex(3)}"
    _run(["groupadd", name])
    return name


def delete_group(name: str) -> None:
    subprocess.run(["groupdel", name], capture_output=True, check=False)


def create_account(
    *, groups: Sequence[str] = (), home_mode: int = 0o700, name: str | None = None
) -> pwd.struct_passwd:
    """Create an account with a home directory and return its password entry."""
    name = name or f"{PREFIX}{secrets.token_hex(4)}"
    argv = ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group"]
    if groups:
        argv += ["--groups", ",".join(groups)]
    _run([*argv, name])
    entry = pwd.getpwnam(name)
    os.chmod(entry.pw_dir, home_mode)
    return entry


def delete_account(name: str) -> None:
    # Kill anything left running as the account first, so userdel does not refuse.
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
    subprocess.run(["userdel", "--remove", "--force", name], capture_output=True, check=False)


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
