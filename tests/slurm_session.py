"""One system Slurm shared by every test session and benchmark run on the machine.

``session()`` runs ``.ci/slurm-up`` (which installs and starts a single-node Slurm when
none answers) and yields its last line; ``.ci/slurm-down`` stops it when the last user
is done, and only a Slurm slurm-up started. Users hold a shared ``flock`` on
``SESSIONS`` from before they start Slurm until they are done; the last one takes it
exclusively while it stops Slurm, so a run starting meanwhile waits and then starts
Slurm again, never finds it half stopped, and no run stops it under another.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

CI = Path(__file__).resolve().parent.parent / ".ci"
SESSIONS = Path("/run/mep-slurm-sessions.lock")


@contextlib.contextmanager
def session() -> Iterator[tuple[int, str]]:
    """(slurm-up's exit status, its last line): 0 running, 2 unavailable here, 1 failed
    (with the output). Slurm stays up until the block ends."""
    with open(SESSIONS, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield _up()
        finally:
            _down_if_last(lock)


def _up() -> tuple[int, str]:
    done = subprocess.run(
        [str(CI / "slurm-up")], capture_output=True, text=True, timeout=900, check=False
    )
    last = (done.stdout.strip().splitlines() or ["slurm-up: no output"])[-1]
    if done.returncode == 1:
        last = f"{last}\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    return done.returncode, last


def _down_if_last(lock: IO[str]) -> None:
    fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another run still uses it: the last one stops it
    try:
        subprocess.run([str(CI / "slurm-down")], capture_output=True, timeout=120, check=False)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
