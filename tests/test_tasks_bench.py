"""The executor benchmark runs end to end with tiny counts and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "executor.py"


@pytest.mark.slow
def test_bench_smoke_prints_a_row_per_engine() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in (
        "bare ProcessPoolExecutor",
        "mep ProcessPoolEngine",
        "mep ThreadPoolEngine",
        "mep GlobusComputeEngine",
        "Parsl HTEX (direct)",
        "Dask LocalCluster",
    ):
        row = next((line for line in lines if line.startswith(name)), None)
        assert row is not None, f"{name} missing from:\n{done.stdout}"
        if not name.startswith("Dask"):
            assert row.rstrip().endswith("x"), row  # a ratio against the bare pool
    reference = next(line for line in lines if line.startswith("bare"))
    assert reference.rstrip().endswith("1.00x")
