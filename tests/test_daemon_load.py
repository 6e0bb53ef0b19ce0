"""Bounded load on loopback: 50,000 no-op tasks in batches from several client threads;
every result arrives. Also runs ``bench/api.py --smoke``. Throughput is printed, never
asserted (DESIGN.md §4: performance lives in bench/)."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mepcore.tasks import pack_args, pack_function
from tests.daemon_harness import REPO, remote_function, running_daemon, write_runtime_deployment

pytestmark = [pytest.mark.root, pytest.mark.slow]

TOTAL = 50_000
THREADS = 5
BATCH = 1_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_fifty_thousand_noop_tasks_all_arrive(tmp_path: Path, make_account: Any) -> None:
    acct = make_account()
    config = write_runtime_deployment(
        tmp_path / "site",
        settings_extra={"log_level": "warning"},
    )
    noop = remote_function("def noop():\n    return None\n", "noop")
    with running_daemon(config, tmp_path / "site" / "state") as daemon:
        token = daemon.token(f"{acct.pw_name}@example.org")
        fid, body = pack_function(noop)
        with daemon.client(token) as client:
            client.post("/v1/functions", json={"function": b64(body)}).raise_for_status()
        args = b64(pack_args((), {}))
        variables = {"engine": "ThreadPoolEngine", "max_workers": 2}
        results: dict[int, tuple[int, int]] = {}
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                with daemon.client(token, timeout=120) as client:
                    ids: list[str] = []
                    for _ in range(TOTAL // THREADS // BATCH):
                        r = client.post(
                            "/v1/endpoints/hpc/submit",
                            json={
                                "user_endpoint_config": variables,
                                "tasks": [{"function_id": fid, "args": args}] * BATCH,
                            },
                        )
                        r.raise_for_status()
                        ids += r.json()["task_ids"]
                    pending = set(ids)
                    ok = 0
                    end = time.monotonic() + 300  # bounded: the test stops by itself
                    while pending and time.monotonic() < end:
                        w = client.post(
                            "/v1/tasks/wait",
                            json={"task_ids": list(pending)[:10_000], "timeout": 10},
                        )
                        w.raise_for_status()
                        for view in w.json()["tasks"]:
                            pending.discard(view["task_id"])
                            ok += view["state"] == "success"
                    results[n] = (len(ids), ok)
            except BaseException as exc:
                errors.append(exc)

        began = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.perf_counter() - began
        assert not errors, errors
        assert sum(n for n, _ in results.values()) == TOTAL
        assert sum(ok for _, ok in results.values()) == TOTAL, daemon.stderr()[-3000:]
        print(f"\n{TOTAL} no-op tasks in {elapsed:.2f} s: {TOTAL / elapsed:.0f} tasks/s")
        assert daemon.stop() == 0


def test_bench_api_smoke_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "api.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tasks/s" in out.stdout
    assert "p50" in out.stdout and "p99" in out.stdout
    print(out.stdout)
