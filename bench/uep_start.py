"""Benchmark: user endpoint cold start, idle memory, and task throughput through the channel.

Prints a table: p50/p95 time from "start requested" (``Registry.get_or_start``) to
"ready" for the process-pool engine (and the thread engine, for comparison), the CPU the
user endpoint process used until then (its own threads, not its pool workers), the idle
RSS of one user endpoint (the process itself, and with its pool workers), and no-op
task throughput through the registry, the channel and the user endpoint's executor.

As root it creates a temporary account (removed at the end) and uses the world-readable
runtime venv of the tests; as another user it spawns user endpoints as that user with
this interpreter. ``--smoke`` runs a few iterations only (used by the test suite).

    python bench/uep_start.py [--runs 20] [--tasks 20000] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mepcore.ports import SystemAccountDatabase  # noqa: E402
from mepcore.spawn import ResourceLimits, SpawnSettings  # noqa: E402
from mepcore.types import Account  # noqa: E402
from mepd.inflight import DispatchTask, InFlightTask  # noqa: E402
from mepd.registry import Registry, RegistryLimits, StartRequest  # noqa: E402
from mepd.runtime import probe_package_paths  # noqa: E402
from mepd.spec import EndpointSpec  # noqa: E402

TEMPLATE = """\
engine:
  type: {{ engine }}
  max_workers: {{ workers }}
heartbeat_period: 30
idle_heartbeats_soft: 100
idle_heartbeats_hard: 10000
"""


def cpu_ms(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far (ns resolution, /proc/PID/task/*/schedstat):
    less sensitive than wall time to what else runs on a shared machine."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e6


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    raw = fh.read()
            except OSError:
                continue
            fields = raw[raw.rfind(b")") + 2 :].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def request(account: Account, engine: str, key: str, workers: int = 2) -> StartRequest:
    return StartRequest(
        spec=EndpointSpec(
            "bench", account.name, {"engine": engine, "workers": workers}, None, None
        ),
        account=account,
        config_key=key,
        template_name="user_config_template.yaml.j2",
        template_text=TEMPLATE,
        includes={},
        environment={},
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _starts(
    registry: Registry, account: Account, engine: str, keys: list[str], label: str
) -> list[tuple[str, str]]:
    """Start and stop one user endpoint per key; the p50/p95 start → ready and CPU rows.
    With repeated keys, the first start (which renders) is not counted."""
    times, cpu = [], []
    for i, key in enumerate(keys):
        began = time.perf_counter()
        started = await registry.get_or_start(request(account, engine, key))
        if not (label and i == 0):
            times.append((time.perf_counter() - began) * 1000)
            if started.pid is not None:
                cpu.append(cpu_ms(started.pid))
        await registry.stop(account.name, key)
    kept = " (configuration as rendered before)" if label else ""
    rows = [
        (
            f"start{label} → ready, {engine}{kept} (ms)",
            f"p50 {statistics.median(times):.0f}  p95 {percentile(times, 0.95):.0f}"
            f"  (n={len(times)})",
        )
    ]
    if cpu:
        rows.append(
            (
                f"CPU of the user endpoint until ready{label}, {engine} (ms)",
                f"p50 {statistics.median(cpu):.0f}  p95 {percentile(cpu, 0.95):.0f}",
            )
        )
    return rows


async def measure(
    settings: SpawnSettings, account: Account, runs: int, tasks: int
) -> list[tuple[str, str]]:
    from mepcore.tasks import TaskEnvelope, pack_args, pack_function

    done = 0
    finished = asyncio.Event()
    target = 0

    def on_result(_record: InFlightTask, _header: dict[str, Any], _payload: bytes) -> None:
        nonlocal done
        done += 1
        if done >= target:
            finished.set()

    registry = Registry(
        settings,
        RegistryLimits(max_per_account=4, start_timeout=60, stop_grace=5, shutdown_timeout=30),
        on_result=on_result,
        on_lost=lambda ids, reason: None,
    )
    rows: list[tuple[str, str]] = []
    try:
        for engine in ("ProcessPoolEngine", "ThreadPoolEngine"):
            # Each start its own configuration: every one renders its template.
            keys = [f"{engine}-{i}" for i in range(runs)]
            rows.extend(await _starts(registry, account, engine, keys, ""))
        # The same configuration again and again, as an endpoint that idles out and is
        # started by the next call: mepd hands back what the first start rendered.
        again = ["again"] * (runs + 1)
        rows.extend((await _starts(registry, account, "ProcessPoolEngine", again, " again"))[:2])
        handle = await registry.get_or_start(request(account, "ProcessPoolEngine", "idle"))
        assert handle.pid is not None
        # Idle: give workers a moment to finish importing, polling until RSS settles.
        deadline = time.monotonic() + 5
        last = -1
        while time.monotonic() < deadline:
            now = rss_kib(handle.pid) + sum(rss_kib(c) for c in children_of(handle.pid))
            if now == last:
                break
            last = now
            await asyncio.sleep(0.2)
        own = rss_kib(handle.pid)
        workers = children_of(handle.pid)
        total = own + sum(rss_kib(c) for c in workers)
        rows.append(("idle RSS, user endpoint process (MiB)", f"{own / 1024:.1f}"))
        rows.append((f"idle RSS, with {len(workers)} pool processes (MiB)", f"{total / 1024:.1f}"))

        namespace: dict[str, Any] = {"__name__": "__main__"}
        exec("def noop():\n    return None\n", namespace)
        fid, body = pack_function(namespace["noop"])
        args = pack_args((), {})
        for engine in ("ProcessPoolEngine", "ThreadPoolEngine"):
            handle = await registry.get_or_start(
                request(account, engine, f"tp-{engine}", workers=2)
            )
            handle.register_function(fid, body)
            batch = [TaskEnvelope(f"{engine[:1]}{i}", fid, args) for i in range(tasks)]
            items = [DispatchTask(t.task_id, "bench", fid, t.payload, None) for t in batch]
            done, target = 0, tasks
            finished.clear()
            began = time.perf_counter()
            for start in range(0, tasks, 1000):
                handle.dispatch(items[start : start + 1000])
            await asyncio.wait_for(finished.wait(), 300)
            rate = tasks / (time.perf_counter() - began)
            rows.append(
                (f"no-op tasks/s through the channel, {engine}", f"{rate:,.0f}  (n={tasks})")
            )
    finally:
        await registry.shutdown()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--smoke", action="store_true", help="a few iterations only")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.tasks = 3, 500
    made: str | None = None
    if os.geteuid() == 0:
        from tests.accounts import create_account, delete_account
        from tests.runtime_venv import runtime_python

        python = runtime_python()
        made = create_account().pw_name
        account = SystemAccountDatabase().by_name(made)
    else:
        python = sys.executable
        account = SystemAccountDatabase().by_uid(os.getuid())
    assert account is not None
    try:
        settings = SpawnSettings(
            python=python,
            package_paths=probe_package_paths(python),
            limits=ResourceLimits(nproc=256, nofile=1024),
        )
        rows = asyncio.run(measure(settings, account, args.runs, args.tasks))
    finally:
        if made:
            delete_account(made)
    width = max(len(name) for name, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
