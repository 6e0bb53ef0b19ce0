"""``bench/client.py --smoke`` runs and prints its table (a tiny N; no figure is asserted:
performance is measured by ``make bench``, never in unit tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The bench starts a real daemon; not as root it could only map to its own account,
# which the daemon refuses.
pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_bench_client_smoke() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "client.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(REPO),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(
        line.startswith("mep Executor") and line.split()[-1].replace(",", "").isdigit()
        for line in lines
    ), done.stdout
    assert any(line.startswith("Parsl python_app") for line in lines)
    assert any(line.startswith("Dask client.map") for line in lines)
