"""No-op task throughput and latency: mep's engines beside their peers, in one run.

Rows, each measured in this process:
- mep ProcessPoolEngine / ThreadPoolEngine / GlobusComputeEngine (Parsl, LocalProvider),
  through ``mepcore.tasks.Executor`` (envelopes, argument packing, function cache, limits);
- a bare ``concurrent.futures.ProcessPoolExecutor`` (the reference: ratios are against it);
- Parsl's HighThroughputExecutor used directly (no DataFlowKernel);
- Dask's ``LocalCluster`` (if ``dask.distributed`` is installed: ``make bench`` installs it);
- "via uep" rows: the same engines behind a real user endpoint, measured from the daemon's
  side: ``mepd.registry.Registry`` → channel → ``python -m mepd.uep`` → executor → back,
  in the daemon's event loop. As root the user endpoint runs as a temporary account
  (created and removed here) with the tests' world-readable runtime venv; otherwise as
  the current user with this interpreter.

Throughput: N no-op tasks submitted at once, until every result is in.
Latency (p50): one task at a time, submit to result.

Usage: python bench/executor.py [--smoke] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import parsl_htex  # bench/common.py: Parsl HTEX driven directly

WORKERS = 2
REPO = Path(__file__).resolve().parent.parent
UEP_DEADLINE = 300.0  # seconds for any one wait on a user endpoint


def noop() -> None:
    return None


class Row:
    def __init__(self, name: str) -> None:
        self.name = name
        self.throughput: float | None = None
        self.p50_ms: float | None = None
        self.note = ""
        self.tasks = 0


def measure(
    row: Row,
    submit_all: Callable[[int], list[Any]],
    wait: Callable[[Any], Any],
    submit_one: Callable[[], Any],
    count: int,
    samples: int,
) -> None:
    for f in submit_all(min(200, count)):  # warm up: workers started, caches filled
        wait(f)
    began = time.perf_counter()
    for f in submit_all(count):
        wait(f)
    row.throughput = count / (time.perf_counter() - began)
    row.tasks = count
    latencies = []
    for _ in range(samples):
        t0 = time.perf_counter()
        wait(submit_one())
        latencies.append(time.perf_counter() - t0)
    row.p50_ms = statistics.median(latencies) * 1000


def bench_mep(engine: dict[str, Any], row: Row, count: int, samples: int) -> None:
    from mepcore.tasks import Executor, TaskEnvelope, pack_args, pack_function

    executor = Executor.from_engine_config(engine)
    executor.start()
    try:
        fid, body = pack_function(noop)
        executor.register_function(fid, body)
        ids = iter(range(10**9))

        def envelope() -> TaskEnvelope:
            return TaskEnvelope(f"b{next(ids)}", fid, pack_args((), {}))

        def submit_all(n: int) -> list[Any]:
            return executor.submit_many([envelope() for _ in range(n)])

        def wait(future: Any) -> None:
            result = future.result()
            if not result.ok:
                raise RuntimeError(f"task failed: {result.error}")

        measure(row, submit_all, wait, lambda: executor.submit(envelope()), count, samples)
    finally:
        executor.shutdown()


def bench_ppe(row: Row, count: int, samples: int) -> None:
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
        measure(
            row,
            lambda n: [pool.submit(noop) for _ in range(n)],
            lambda f: f.result(),
            lambda: pool.submit(noop),
            count,
            samples,
        )


def bench_htex(row: Row, count: int, samples: int) -> None:
    with parsl_htex() as htex:
        measure(
            row,
            lambda n: [htex.submit(noop, {}) for _ in range(n)],
            lambda f: f.result(),
            lambda: htex.submit(noop, {}),
            count,
            samples,
        )


def bench_dask(row: Row, count: int, samples: int) -> None:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        row.note = "not installed (make bench installs it)"
        return
    with (
        LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):
        measure(
            row,
            lambda n: [client.submit(noop, pure=False) for _ in range(n)],
            lambda f: f.result(),
            lambda: client.submit(noop, pure=False),
            count,
            samples,
        )


# -- through a user endpoint's channel ------------------------------------------------

# The engine comes in as a variable: a mapping renders as its JSON text, a YAML flow mapping.
UEP_TEMPLATE = """\
engine: {{ engine }}
heartbeat_period: 30
idle_heartbeats_soft: 1000
idle_heartbeats_hard: 100000
"""


class UepSite:
    """Where "via uep" rows spawn user endpoints: an account and the spawn settings.

    As root: a temporary account and the tests' world-readable runtime venv (built on
    first use). Otherwise: the current user and this interpreter.
    """

    def __init__(self) -> None:
        self.made: str | None = None
        self._ready: tuple[Any, Any] | None = None
        self._tmp_before: set[str] = set()

    def get(self) -> tuple[Any, Any]:
        if self._ready is not None:
            return self._ready
        from mepcore.ports import SystemAccountDatabase
        from mepcore.spawn import ResourceLimits, SpawnSettings
        from mepd.logs import configure_logging
        from mepd.runtime import probe_package_paths

        configure_logging("warning")  # the daemon's log goes to stderr; keep the table clean
        if os.geteuid() == 0:
            if str(REPO) not in sys.path:
                sys.path.insert(0, str(REPO))  # the account and runtime helpers of tests/
            from tests.accounts import create_account
            from tests.runtime_venv import runtime_python

            python = runtime_python()
            self.made = create_account().pw_name
            account = SystemAccountDatabase().by_name(self.made)
            if account is not None:
                self._tmp_before = _tmp_entries(account.uid)
        else:
            python = sys.executable
            account = SystemAccountDatabase().by_uid(os.getuid())
        if account is None:
            raise RuntimeError("no account to run user endpoints as")
        settings = SpawnSettings(
            python=python,
            package_paths=probe_package_paths(python),
            # RLIMIT_NPROC counts threads: Parsl's interchange and worker pool need room.
            limits=ResourceLimits(nproc=256, nofile=1024),
        )
        self._ready = (account, settings)
        return self._ready

    def close(self) -> None:
        if self.made is not None:
            from tests.accounts import delete_account

            if self._ready is not None:
                # Parsl's worker pool leaves its multiprocessing socket directory in
                # /tmp; the uid goes to the next account made, so clean up after it.
                for path in _tmp_entries(self._ready[0].uid) - self._tmp_before:
                    shutil.rmtree(path, ignore_errors=True)
            delete_account(self.made)
            self.made = None


def _tmp_entries(uid: int) -> set[str]:
    """Directories ``uid`` owns directly under /tmp."""
    out = set()
    for entry in os.scandir("/tmp"):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == uid:
                out.add(entry.path)
    return out


async def measure_async(
    row: Row,
    run_batch: Callable[[int], Awaitable[None]],
    count: int,
    samples: int,
) -> None:
    """``measure`` for the event loop: ``run_batch(n)`` submits n tasks, awaits them all."""
    await run_batch(min(200, count))  # warm up
    began = time.perf_counter()
    await run_batch(count)
    row.throughput = count / (time.perf_counter() - began)
    row.tasks = count
    latencies = []
    for _ in range(samples):
        t0 = time.perf_counter()
        await run_batch(1)
        latencies.append(time.perf_counter() - t0)
    row.p50_ms = statistics.median(latencies) * 1000


async def _bench_uep(
    site: UepSite, engine: dict[str, Any], row: Row, count: int, samples: int
) -> None:
    from mepcore.tasks import TaskEnvelope, pack_args, pack_function
    from mepd.inflight import DispatchTask, InFlightTask
    from mepd.registry import Registry, RegistryLimits, StartRequest
    from mepd.spec import EndpointSpec

    account, settings = site.get()
    loop = asyncio.get_running_loop()
    waiters: dict[str, asyncio.Future[None]] = {}

    def on_result(_record: InFlightTask, header: dict[str, Any], _payload: bytes) -> None:
        waiter = waiters.pop(header["task_id"], None)
        if waiter is None or waiter.done():
            return
        if header["status"] == "success":
            waiter.set_result(None)
        else:
            waiter.set_exception(RuntimeError(f"task failed: {header['error']}"))

    def on_lost(records: list[InFlightTask], reason: str) -> None:
        for record in records:
            waiter = waiters.pop(record.task_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(RuntimeError(f"task lost: {reason}"))

    registry = Registry(
        settings,
        RegistryLimits(start_timeout=60.0, stop_grace=5.0, shutdown_timeout=60.0),
        on_result=on_result,
        on_lost=on_lost,
    )
    try:
        handle = await registry.get_or_start(
            StartRequest(
                spec=EndpointSpec("bench", account.name, {"engine": engine}, None, None),
                account=account,
                config_key=f"bench-{engine['type']}",
                template_name="user_config_template.yaml.j2",
                template_text=UEP_TEMPLATE,
                includes={},
                environment={},
            )
        )
        # Sent by value, as a scientist's notebook function is: the user endpoint cannot
        # import this script.
        namespace: dict[str, Any] = {"__name__": "__main__"}
        exec("def noop():\n    return None\n", namespace)
        fid, body = pack_function(namespace["noop"])
        handle.register_function(fid, body)
        args = pack_args((), {})
        ids = iter(range(10**9))

        async def run_batch(n: int) -> None:
            items, futures = [], []
            for _ in range(n):
                task = TaskEnvelope(f"b{next(ids)}", fid, args)
                future: asyncio.Future[None] = loop.create_future()
                waiters[task.task_id] = future
                futures.append(future)
                items.append(DispatchTask(task.task_id, "bench", fid, task.payload, None))
            handle.dispatch(items)
            await asyncio.wait_for(asyncio.gather(*futures), UEP_DEADLINE)

        await measure_async(row, run_batch, count, samples)
    finally:
        await registry.shutdown()


def bench_uep(site: UepSite, engine: dict[str, Any], row: Row, count: int, samples: int) -> None:
    asyncio.run(_bench_uep(site, engine, row, count, samples))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts (for tests)")
    parser.add_argument("--only", nargs="*", help="run only rows whose name contains this")
    args = parser.parse_args(argv)
    fast, slow, samples = (200, 100, 20) if args.smoke else (20_000, 3_000, 300)
    local_parsl = {
        "type": "GlobusComputeEngine",
        "max_workers_per_node": WORKERS,
        "provider": {"type": "LocalProvider", "init_blocks": 1, "max_blocks": 1},
    }
    plan: list[tuple[str, Callable[[Row], None]]] = [
        ("bare ProcessPoolExecutor", lambda r: bench_ppe(r, fast, samples)),
        (
            "mep ProcessPoolEngine",
            lambda r: bench_mep(
                {"type": "ProcessPoolEngine", "max_workers": WORKERS}, r, fast, samples
            ),
        ),
        (
            "mep ThreadPoolEngine",
            lambda r: bench_mep(
                {"type": "ThreadPoolEngine", "max_workers": WORKERS}, r, fast, samples
            ),
        ),
        ("mep GlobusComputeEngine", lambda r: bench_mep(local_parsl, r, slow, samples)),
        (
            "mep ProcessPoolEngine via uep",
            lambda r: bench_uep(
                site, {"type": "ProcessPoolEngine", "max_workers": WORKERS}, r, fast, samples
            ),
        ),
        (
            "mep ThreadPoolEngine via uep",
            lambda r: bench_uep(
                site, {"type": "ThreadPoolEngine", "max_workers": WORKERS}, r, fast, samples
            ),
        ),
        (
            "mep GlobusComputeEngine via uep",
            lambda r: bench_uep(site, local_parsl, r, slow, samples),
        ),
        ("Parsl HTEX (direct)", lambda r: bench_htex(r, slow, samples)),
        ("Dask LocalCluster", lambda r: bench_dask(r, slow, samples)),
    ]
    rows = []
    site = UepSite()
    try:
        for name, run in plan:
            if args.only and not any(part in name for part in args.only):
                continue
            row = Row(name)
            try:
                run(row)
            except ImportError as exc:
                row.note = f"not available: {exc}"
            rows.append(row)
    finally:
        site.close()
    reference = next((r.throughput for r in rows if r.name.startswith("bare")), None)
    print(f"no-op tasks, {WORKERS} workers, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    width = max([26, *(len(row.name) for row in rows)])
    header = f"{'engine':<{width}} {'tasks':>7} {'tasks/s':>10} {'p50 ms':>8} {'vs bare PPE':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.throughput is None:
            print(f"{row.name:<{width}} {row.note}")
            continue
        ratio = f"{row.throughput / reference:.2f}x" if reference else "-"
        print(
            f"{row.name:<{width}} {row.tasks:>7} {row.throughput:>10,.0f} {row.p50_ms:>8.3f}"
            f" {ratio:>12}"
        )
    if any(row.name.endswith("via uep") for row in rows):
        print(
            "via uep: daemon side, Registry -> channel -> user endpoint process -> engine -> back"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
