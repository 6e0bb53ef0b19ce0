"""bench/authz.py runs (``--smoke``) and prints its table with no mismatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "authz.py"), "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["lines", "decide", "p50"]
    rows = [line.split() for line in lines[2:] if line.strip() and line.strip()[0].isdigit()]
    assert [row[0] for row in rows] == ["10", "200"]
    assert all(row[-1] == "0" for row in rows)  # no decision differed from casbin
