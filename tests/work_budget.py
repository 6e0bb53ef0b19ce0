"""Bounded work without a clock: count the calls and the memory a piece of code uses.

"Refused quickly" used to be asserted as elapsed seconds, which flakes on a loaded
machine and says nothing on a fast one. What such a test means is that hostile input is
refused after a *bounded amount of work*, so that is what ``work_budget`` checks: every
Python and C function call made by the current thread inside the block is counted (a
profile hook), and the peak of memory allocated inside it is measured (tracemalloc).
Past ``max_calls``, or with more than ``max_bytes`` held at a call, the block is aborted
at once with ``WorkBudgetExceeded`` (a ``BaseException``, so the code under test cannot
swallow it), which also keeps a runaway (``2**64`` macro calls, a string doubling 64
times) from hanging the test or exhausting memory; a peak above ``max_bytes`` reached
inside one C call fails the block at its end.

The counts are deterministic for a given interpreter and library versions; budgets are
set an order of magnitude above what the bounded code needs and orders below what the
unbounded work would take. The timings themselves are measured in bench/limits.py.

Deliberately not here: other threads (the hook is per thread) and wall-clock time.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any


class WorkBudgetExceeded(BaseException):
    """More calls than the budget allows (raised inside the code under test)."""


@dataclass
class Work:
    """What the block did: function calls and the peak of memory allocated in it."""

    calls: int = 0
    peak_bytes: int = 0


@contextmanager
def work_budget(*, max_calls: int, max_bytes: int) -> Iterator[Work]:
    """Run the block counting its calls and allocations; fail if it exceeds either bound."""
    work = Work()

    def count(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            work.calls += 1
            if work.calls > max_calls:
                sys.setprofile(None)
                raise WorkBudgetExceeded(f"more than {max_calls:,} calls")
            if tracemalloc.get_traced_memory()[0] - base > max_bytes:
                sys.setprofile(None)
                raise WorkBudgetExceeded(f"more than {max_bytes:,} bytes allocated")

    was_tracing = tracemalloc.is_tracing()
    if was_tracing:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    else:
        tracemalloc.start()
        base = 0
    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        yield work
    finally:
        sys.setprofile(previous)
        work.peak_bytes = max(0, tracemalloc.get_traced_memory()[1] - base)
        if not was_tracing:
            tracemalloc.stop()
    assert work.peak_bytes <= max_bytes, (
        f"allocated up to {work.peak_bytes:,} bytes, more than the {max_bytes:,} allowed"
    )
