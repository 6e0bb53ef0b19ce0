"""Throughput and round-trip latency of mepd through its HTTP API, on loopback.

    sudo .venv/bin/python bench/api.py            # full run: 50,000 no-op tasks
    sudo .venv/bin/python bench/api.py --smoke    # a few seconds (used by a test)
    .venv/bin/python bench/api.py --url URL --token TOKEN   # against a running daemon

Without --url it needs root: it creates a temporary account (removed afterwards),
starts ``mepd serve`` on 127.0.0.1 with a temporary state directory and the
world-readable runtime venv of the tests, and stops everything at the end.

Prints a table: batched throughput (tasks/s, submitted in batches from several client
threads, results collected by long-polling), the p50/p99 of a single warm task's
round trip (submit one task, long-poll until its result is back), the same round trip
as one request (submit with ``?wait=``) with the CPU time the daemon process spent per
such request (all its threads; a figure the machine's other load disturbs less than
wall-clock latency; only for a daemon this script started), and the floor: a GET to a
bare Starlette app under uvicorn in another process, what one HTTP request costs on
this machine.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.trusted_dir import use_private_tmp  # noqa: E402 - found through the path above

use_private_tmp()  # mepd refuses deployments under /tmp (security rule 8)

NOOP_SOURCE = "def noop():\n    return None\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def register_noop(client: httpx.Client) -> tuple[str, str]:
    from tests.daemon_harness import remote_function

    from mepcore.tasks import pack_args, pack_function

    fid, body = pack_function(remote_function(NOOP_SOURCE, "noop"))
    client.post("/v1/functions", json={"function": b64(body)}).raise_for_status()
    return fid, b64(pack_args((), {}))


def wait_for(client: httpx.Client, ids: list[str], deadline: float) -> int:
    pending = set(ids)
    failed = 0
    end = time.monotonic() + deadline
    while pending and time.monotonic() < end:
        chunk = list(pending)[:10_000]
        r = client.post("/v1/tasks/wait", json={"task_ids": chunk, "timeout": 5})
        r.raise_for_status()
        for view in r.json()["tasks"]:
            pending.discard(view["task_id"])
            failed += view["state"] != "success"
    if pending:
        raise RuntimeError(f"{len(pending)} tasks without a result after {deadline}s")
    return failed


def throughput(
    url: str, token: str, total: int, batch: int, threads: int, variables: dict[str, Any]
) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        fid, args = register_noop(client)
        # Warm the user endpoint up (its start is not what this measures).
        r = client.post(
            "/v1/endpoints/hpc/submit",
            json={"user_endpoint_config": variables, "tasks": [{"function_id": fid, "args": args}]},
        )
        r.raise_for_status()
        wait_for(client, r.json()["task_ids"], 120)
    per_thread = total // threads
    errors: list[BaseException] = []
    failures: list[int] = []

    def worker() -> None:
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
                ids: list[str] = []
                for start in range(0, per_thread, batch):
                    n = min(batch, per_thread - start)
                    r = client.post(
                        "/v1/endpoints/hpc/submit",
                        json={
                            "user_endpoint_config": variables,
                            "tasks": [{"function_id": fid, "args": args}] * n,
                        },
                    )
                    r.raise_for_status()
                    ids += r.json()["task_ids"]
                failures.append(wait_for(client, ids, 600))
        except BaseException as exc:
            errors.append(exc)

    began = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(900)
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    done = per_thread * threads
    return {
        "tasks": float(done),
        "seconds": elapsed,
        "tasks_per_s": done / elapsed,
        "failed": float(sum(failures)),
    }


def latency(
    url: str, token: str, rounds: int, variables: dict[str, Any], *, one_request: bool = False
) -> dict[str, float]:
    """A single warm task's round trip: submit, then long-poll until its result is back;
    with ``one_request``, one submit with ``?wait=`` answered with the result."""
    headers = {"Authorization": f"Bearer {token}"}
    params = {"wait": 30} if one_request else None
    samples: list[float] = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        fid, args = register_noop(client)
        body = {"user_endpoint_config": variables, "tasks": [{"function_id": fid, "args": args}]}
        for i in range(rounds + 5):
            began = time.perf_counter()
            r = client.post("/v1/endpoints/hpc/submit", params=params, json=body)
            r.raise_for_status()
            if one_request and not r.json()["tasks"]:
                raise RuntimeError(f"?wait answered without the result: {r.text[:300]}")
            (task_id,) = r.json()["task_ids"]
            while not one_request:
                w = client.post("/v1/tasks/wait", json={"task_ids": [task_id], "timeout": 30})
                w.raise_for_status()
                if w.json()["tasks"]:
                    break
            if i >= 5:  # the first rounds warm up the user endpoint
                samples.append(time.perf_counter() - began)
    return _percentiles(samples)


_FLOOR_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def ok(request):
    return JSONResponse({"ok": True})

app = Starlette(routes=[Route("/", ok)])
config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
uvicorn.Server(config).run()
"""


def http_floor(rounds: int) -> dict[str, float]:
    """GET round trips to a bare Starlette app under uvicorn in another process, with the
    same httpx client: what one HTTP request costs on this machine before mepd does
    anything (a round trip through mepd takes one or two such requests)."""
    import subprocess

    with socket.socket() as probe:  # a free port (nothing else binds loopback ports here)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", _FLOOR_SERVER, str(port)])
    try:
        samples: list[float] = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 30
            while True:  # until it listens
                try:
                    client.get("/")
                    break
                except httpx.ConnectError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.05)  # polling interval of a deadline loop
            for i in range(rounds + 5):
                began = time.perf_counter()
                client.get("/").raise_for_status()
                if i >= 5:
                    samples.append(time.perf_counter() - began)
    finally:
        server.terminate()
        server.wait(30)
    return _percentiles(samples)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(samples),
        "p99_ms": 1000 * samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "rounds": float(len(samples)),
    }


def own_daemon(workdir: Path) -> tuple[Any, str, str, Any]:
    """Start a daemon with a temporary account; returns (daemon, url, token, cleanup)."""
    from tests.accounts import create_account, delete_account
    from tests.daemon_harness import start_daemon, write_runtime_deployment

    account = create_account()
    try:
        config = write_runtime_deployment(
            workdir / "site",
            # Capacity, not the per-identity rate limit (bench/ratelimit.py measures that).
            settings_extra={"log_level": "warning", "edge": {"rate": 1e9, "burst": 10**9}},
        )
        daemon = start_daemon(config, workdir / "site" / "state")
    except BaseException:
        delete_account(account.pw_name)
        raise

    def cleanup() -> None:
        try:
            daemon.stop()
        finally:
            delete_account(account.pw_name)

    return daemon, daemon.url, daemon.token(f"{account.pw_name}@example.org"), cleanup


def _rows(
    tp: dict[str, float],
    lat: dict[str, float],
    one: dict[str, float],
    floor: dict[str, float],
    cpu_per_request: float | None,
) -> list[tuple[str, str, str, str]]:
    """The printed table's rows."""
    rows: list[tuple[str, str, str, str]] = [
        (
            "batched no-op tasks",
            f"{int(tp['tasks'])}",
            f"{tp['seconds']:.2f} s",
            f"{tp['tasks_per_s']:.0f} tasks/s",
        ),
        (
            "single warm round trip",
            f"{int(lat['rounds'])}",
            f"p50 {lat['p50_ms']:.2f} ms",
            f"p99 {lat['p99_ms']:.2f} ms",
        ),
    ]
    for name, figures in (("  as one request (?wait)", one), ("bare Starlette GET (floor)", floor)):
        rows.append(
            (
                name,
                f"{int(figures['rounds'])}",
                f"p50 {figures['p50_ms']:.2f} ms",
                f"p99 {figures['p99_ms']:.2f} ms",
            )
        )
        if figures is one and cpu_per_request is not None:
            rows.append(
                (
                    "  mepd CPU per ?wait",
                    f"{int(one['rounds'])}",
                    f"{1000 * cpu_per_request:.2f} ms",
                    "daemon process, all threads",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a short run (for tests)")
    parser.add_argument("--url", help="a running daemon (default: start one; needs root)")
    parser.add_argument("--token", help="a token for --url")
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2, help="max_workers of the user endpoint")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.batch, args.threads, args.rounds = 2_000, 250, 2, 20
    variables = {"engine": "ThreadPoolEngine", "max_workers": args.workers}

    cleanup = None
    pid = 0
    if args.url:
        if not args.token:
            parser.error("--url needs --token")
        url, token = args.url, args.token
    else:
        if os.geteuid() != 0:
            sys.stderr.write("bench/api.py: needs root to start its own daemon (or --url)\n")
            return 2
        tmp = tempfile.TemporaryDirectory(prefix="mep-bench-")
        daemon, url, token, cleanup = own_daemon(Path(tmp.name))
        pid = int(daemon.process.pid)
    cpu_per_request: float | None = None
    try:
        tp = throughput(url, token, args.tasks, args.batch, args.threads, variables)
        lat = latency(url, token, args.rounds, variables)
        before = cpu_seconds(pid) if cleanup is not None else 0.0
        one = latency(url, token, args.rounds, variables, one_request=True)
        if cleanup is not None:
            # Per request: the measured rounds, the warm-up rounds, the registration.
            cpu_per_request = (cpu_seconds(pid) - before) / (args.rounds + 6)
    finally:
        if cleanup is not None:
            cleanup()
    rows = _rows(tp, lat, one, http_floor(args.rounds), cpu_per_request)
    print(
        f"mepd API on loopback ({args.threads} client threads, batch {args.batch},"
        f" {args.workers} workers)"
    )
    print(f"{'measure':<26}{'n':>8}  {'time':<16}{'result'}")
    for name, n, t, result in rows:
        print(f"{name:<26}{n:>8}  {t:<16}{result}")
    if tp["failed"]:
        print(f"FAILED tasks: {int(tp['failed'])}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
