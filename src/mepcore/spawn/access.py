"""Can an account read and run the user endpoint's interpreter and packages?

The check is done by root *before* spawning, from ownership and mode bits (root passes
every ``os.access`` check, so that function answers the wrong question here). Every
directory on the way to a path — following symbolic links hop by hop, as the kernel
does — needs search (x) permission for the account, and the path itself the requested
permission.

The classic mistake it catches: a virtual environment or a pyenv build under ``/root``
(mode 700), or an editable install pointing into a private checkout.

Deliberately conservative: POSIX ACLs that would grant more than the mode bits are not
consulted, so an ACL-only grant is reported as unreadable. Only directories and the
interpreter are checked, not every file below them.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Iterable

from mepcore.errors import SpawnError

R, W, X = 4, 2, 1
_MAX_HOPS = 40


def permits(st: os.stat_result, uid: int, gids: Iterable[int], want: int) -> bool:
    """Would ``uid`` with ``gids`` get ``want`` (R|W|X bits) on a file with this stat?"""
    mode = st.st_mode
    if st.st_uid == uid:
        bits = (mode >> 6) & 7
    elif st.st_gid in set(gids):
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def unreachable_reason(path: str, uid: int, gids: Iterable[int], want: int) -> str | None:
    """Why the account cannot use ``path`` with ``want`` permission, or None if it can."""
    gid_set = set(gids)
    if not path.startswith("/"):
        return f"{path} is not an absolute path"
    parts: deque[str] = deque(_components(path))
    current = "/"
    hops = 0
    while parts:
        name = parts.popleft()
        if name == "..":
            current = os.path.dirname(current) or "/"
            continue
        try:
            dir_stat = os.stat(current)
        except OSError as exc:
            return f"{current}: {exc.strerror}"
        if not permits(dir_stat, uid, gid_set, X):
            return (
                f"directory {current} (owner {dir_stat.st_uid}, mode "
                f"{stat.S_IMODE(dir_stat.st_mode):o}) is not searchable by uid {uid}"
            )
        candidate = os.path.join(current, name)
        try:
            link_stat = os.lstat(candidate)
        except OSError as exc:
            return f"{candidate}: {exc.strerror}"
        if stat.S_ISLNK(link_stat.st_mode):
            hops += 1
            if hops > _MAX_HOPS:
                return f"{path}: too many symbolic links"
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            parts.extendleft(reversed(_components(target)))
            continue
        current = candidate
    try:
        final = os.stat(current)
    except OSError as exc:
        return f"{current}: {exc.strerror}"
    if not permits(final, uid, gid_set, want):
        needed = "".join(c for c, b in (("r", R), ("w", W), ("x", X)) if want & b)
        return (
            f"{current} (owner {final.st_uid}, mode {stat.S_IMODE(final.st_mode):o}) "
            f"does not give uid {uid} {needed} permission"
        )
    return None


def check_runtime_readable(
    python: str, package_paths: Iterable[str], *, uid: int, gids: Iterable[int], account: str
) -> None:
    """Raise ``spawn.interpreter_unreadable`` unless the account can run the runtime."""
    gid_list = list(gids)
    problems: list[str] = []
    reason = unreachable_reason(python, uid, gid_list, X)
    if reason:
        problems.append(f"interpreter: {reason}")
    for directory in package_paths:
        reason = unreachable_reason(directory, uid, gid_list, R | X)
        if reason:
            problems.append(f"packages: {reason}")
    if problems:
        raise SpawnError(
            "spawn.interpreter_unreadable",
            f"account {account} (uid {uid}) cannot run the user endpoint runtime: "
            + "; ".join(problems)
            + ". Build a virtual environment from /usr/bin/python3 in a world-readable "
            "place (e.g. /opt/mep/venv, every directory mode 755), `pip install` mep into it "
            "(not an editable install from a private checkout), and set spawn.python to its "
            "bin/python.",
            context={"account": account, "uid": uid, "problems": problems},
        )
