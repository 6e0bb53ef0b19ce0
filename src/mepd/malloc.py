"""glibc's malloc thresholds pinned where megabyte payloads land (mepd, user endpoints).

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with a fresh ``mmap``
and gives the top of its heap back to the kernel once more than ``M_TRIM_THRESHOLD``
bytes there are free. Both start at 128 KiB and rise (to at most 32 and 64 MiB) only
after a process frees a larger mapped block, and even then an allocation of exactly the
size freed is mapped again. A process that moves a 1 MiB task argument or result from
one buffer to the next therefore takes a fresh mapping, and a page fault on each of its
256 pages, for nearly every copy: on this project's reference machine a process-pool
worker took 374 page faults per 1 MiB round trip, and pinning the thresholds took its
CPU for that round trip from ~2.7 to ~1.3-1.5 ms (docs/performance.md).

``pin_thresholds`` sets the two thresholds once at start, to values glibc's own dynamic
scheme reaches after one 16 MiB allocation: allocations below 16 MiB (every payload and
result within the default 10 MiB limits) come from the heap, and up to 32 MiB of freed
heap stay with the process for the next one. The cost is memory kept rather than
returned: at most 32 MiB per process beyond what it uses, only in a process that did
handle large payloads. The daemon calls it in ``mepd serve``; a user endpoint calls it
before it starts its engine, so forked process-pool workers inherit it. Processes that
do not come from mep (clients, Parsl workers) keep their own settings.

An administrator who set any ``MALLOC_*`` threshold in the daemon's environment keeps
that choice: then nothing is changed. (User endpoints cannot be given ``MALLOC_*``
variables: ``user_environment`` refuses them, DESIGN.md §3 rule 3.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 32 << 20
# The variables through which glibc takes these settings from the environment.
ADMIN_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "GLIBC_TUNABLES",
)


def pin_thresholds(environ: Mapping[str, str] = os.environ) -> bool:
    """Pin glibc's mmap and trim thresholds (see the module docstring). Returns whether
    both were set: False without glibc's ``mallopt`` or when ``environ`` names one of
    ``ADMIN_VARIABLES`` (the administrator's choice wins)."""
    if any(name in environ for name in ADMIN_VARIABLES):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success, 0 on failure (musl's stub always fails).
    mapped = int(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    trimmed = int(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return mapped == 1 and trimmed == 1
