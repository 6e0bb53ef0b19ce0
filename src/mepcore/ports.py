"""Ports: the small protocols through which effects reach the pure components.

Components receive these as arguments; tests pass the in-memory fakes from
``mepcore.testing``. The ``System*`` classes here are the real implementations on top
of the standard library; they hold no state of their own and do no work at import.
"""

from __future__ import annotations

import grp
import os
import pwd
import time
from typing import Protocol, runtime_checkable

from mepcore.types import Account, ShadowEntry

__all__ = [
    "SHADOW_FILE",
    "AccountDatabase",
    "Clock",
    "ShadowDatabase",
    "SystemAccountDatabase",
    "SystemClock",
    "SystemShadowDatabase",
    "shadow_entry",
]

SHADOW_FILE = "/etc/shadow"


@runtime_checkable
class AccountDatabase(Protocol):
    """The password and group databases."""

    def by_name(self, name: str) -> Account | None:
        """The account with exactly this ``pw_name``, with all its groups; None if absent."""

    def by_uid(self, uid: int) -> Account | None:
        """The account with this uid, or None."""


@runtime_checkable
@runtime_checkable
class ShadowDatabase(Protocol):
    """Whether accounts are locked or expired (shadow(5)); None when not known."""

    def by_name(self, name: str) -> ShadowEntry | None:
        """The entry of ``name``, or None (no local entry, or not readable)."""
        ...


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""


class SystemAccountDatabase:
    """``pwd``/``grp`` of this machine (NSS, so LDAP and SSSD accounts too)."""

    def by_name(self, name: str) -> Account | None:
        try:
            entry = pwd.getpwnam(name)
        except (KeyError, UnicodeError, ValueError):
            return None
        return _account_from_pwd(entry)

    def by_uid(self, uid: int) -> Account | None:
        try:
            entry = pwd.getpwuid(uid)
        except (KeyError, OverflowError, ValueError):
            return None
        return _account_from_pwd(entry)


class SystemShadowDatabase:
    """``/etc/shadow`` of this machine, read at every look-up (root only: an
    unprivileged caller, or an account without a local entry — LDAP, SSSD — gets None;
    PAM's account management covers those, see mepd's ``pam`` setting)."""

    def __init__(self, path: str = SHADOW_FILE) -> None:
        self._path = path

    def by_name(self, name: str) -> ShadowEntry | None:
        try:
            with open(self._path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) >= 8 and fields[0] == name:
                        return shadow_entry(fields)
        except OSError:
            return None
        return None


def shadow_entry(fields: list[str]) -> ShadowEntry:
    """A shadow(5) line's fields as an entry; a malformed number counts as empty."""

    def day(text: str) -> int | None:
        return int(text) if text.strip().lstrip("-").isdigit() else None

    return ShadowEntry(
        name=fields[0],
        locked=fields[1].startswith(("!", "*")),
        last_change=day(fields[2]),
        max_days=day(fields[4]),
        inactive_days=day(fields[6]),
        expires=day(fields[7]),
    )


def _account_from_pwd(entry: pwd.struct_passwd) -> Account:
    gids = sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    names: list[str] = []
    for gid in gids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return Account(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=entry.pw_dir,
        shell=entry.pw_shell,
        group_ids=tuple(gids),
        group_names=tuple(names),
        gecos=entry.pw_gecos,
    )


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
