"""bench/uep_start.py runs and prints its table (smoke run: a few iterations)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_uep_start_benchmark_smoke() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "uep_start.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    for label in (
        "start → ready, ProcessPoolEngine",
        "idle RSS, user endpoint process",
        "no-op tasks/s through the channel, ProcessPoolEngine",
    ):
        assert label in out, out
    row = next(line for line in out.splitlines() if line.startswith("start → ready, Process"))
    assert "p50" in row and "p95" in row
