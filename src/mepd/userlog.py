"""Reading a user's endpoint log for them: as the user, never as root.

The log lives in the user's home (``mepd.uep.log``), a directory the user controls: a
symbolic link there could point root at any file. So the daemon does not open it: it
runs ``tail`` **as the account** (its uid, gid and groups; no shell, an empty
environment, ``/`` as working directory, killed after ``TIMEOUT`` seconds, its output
bounded), which reads exactly what the user could read anyway (DESIGN.md §3 rule 4). A
daemon that is not root can only do this for its own account.

Deliberately not here: who may read which log (the pipeline authorizes the caller for
their own account first), writing the log (the user endpoint does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil

import attrs

from mepcore.errors import SpawnError
from mepcore.types import Account
from mepd.uep.log import log_path

TIMEOUT = 10.0
MAX_LINES = 5000
MAX_OUTPUT = 4 * 1024 * 1024


@attrs.frozen
class LogTail:
    path: str
    lines: list[str]
    exists: bool


def _tail_program() -> str:
    for candidate in ("/usr/bin/tail", "/bin/tail"):
        if os.path.isfile(candidate):
            return candidate
    found = shutil.which("tail", path="/usr/bin:/bin")
    if found is None:
        raise SpawnError("spawn.log_unavailable", "no tail program in /usr/bin or /bin")
    return found


def _identity(account: Account) -> dict[str, object]:
    if os.geteuid() == 0:
        return {"user": account.uid, "group": account.gid, "extra_groups": list(account.group_ids)}
    if os.geteuid() == account.uid:
        return {}
    raise SpawnError(
        "spawn.log_unavailable",
        f"a daemon running as uid {os.geteuid()} cannot read the log of uid {account.uid}",
    )


async def read_log(account: Account, endpoint: str, lines: int) -> LogTail:
    """The last ``lines`` lines of the account's endpoint log, read as the account."""
    path = log_path(account.home, endpoint)
    lines = max(1, min(int(lines), MAX_LINES))
    proc = await asyncio.create_subprocess_exec(
        _tail_program(),
        "-n",
        str(lines),
        "--",
        path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"LC_ALL": "C"},
        cwd="/",
        close_fds=True,
        # In the daemon's session, so that the daemon (a subreaper) leaves its exit
        # status to asyncio (mepcore.spawn.reap_adopted_orphans).
        **_identity(account),  # type: ignore[arg-type]
    )
    try:
        out, err = await asyncio.wait_for(_bounded_output(proc), TIMEOUT)
    except TimeoutError as exc:
        raise SpawnError("spawn.log_unavailable", f"tail of {path} timed out") from exc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    # Judged by what tail wrote on stderr, not by its exit status: the daemon, a
    # subreaper, may reap a child of another uid before asyncio sees its status.
    if err.strip():
        message = err.decode("utf-8", "replace").strip()[:500]
        if "No such file" in message:
            return LogTail(path, [], False)
        raise SpawnError("spawn.log_unavailable", f"tail {path}: {message}")
    text = out[-MAX_OUTPUT:].decode("utf-8", "replace")
    return LogTail(path, text.splitlines()[-lines:], True)


async def _bounded_output(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """Its stdout up to ``MAX_OUTPUT`` bytes (then it is killed), its stderr's start."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = bytearray()
    while len(out) < MAX_OUTPUT:
        chunk = await proc.stdout.read(1 << 16)
        if not chunk:
            break
        out += chunk
    if len(out) >= MAX_OUTPUT:
        proc.kill()
    err = await proc.stderr.read(4096)
    await proc.wait()
    return bytes(out[:MAX_OUTPUT]), err
