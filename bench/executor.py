"""No-op task throughput and latency: mep's engines beside their peers, in one run.

Rows, each measured in this process:
- mep ProcessPoolEngine / ThreadPoolEngine / GlobusComputeEngine (Parsl, LocalProvider),
  through ``mepcore.tasks.Executor`` (envelopes, argument packing, function cache, limits);
- a bare ``concurrent.futures.ProcessPoolExecutor`` (the reference: ratios are against it);
- Parsl's HighThroughputExecutor used directly (no DataFlowKernel);
- Dask's ``LocalCluster`` (if ``dask.distributed`` is installed: ``make bench`` installs it).

Throughput: N no-op tasks submitted at once, until every result is in.
Latency (p50): one task at a time, submit to result.

Usage: python bench/executor.py [--smoke] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

WORKERS = 2


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


@contextlib.contextmanager
def parsl_htex() -> Iterator[Any]:
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
    from parsl.launchers import SingleNodeLauncher
    from parsl.providers import LocalProvider

    provider = LocalProvider(init_blocks=1, max_blocks=1, launcher=SingleNodeLauncher())
    htex = HighThroughputExecutor(
        label="bench",
        provider=provider,
        address="127.0.0.1",
        max_workers_per_node=WORKERS,
        launch_cmd=DEFAULT_LAUNCH_CMD.replace(
            "process_worker_pool.py",
            f"{sys.executable} -m parsl.executors.high_throughput.process_worker_pool",
            1,
        ),
        interchange_launch_cmd=[
            sys.executable,
            "-m",
            "parsl.executors.high_throughput.interchange",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="bench-parsl-") as run_dir:
        htex.run_dir = run_dir
        htex.run_id = "bench"
        provider.script_dir = run_dir
        htex.start()
        try:
            htex.scale_out_facade(1)
            yield htex
        finally:
            provider.cancel(list(htex.blocks_to_job_id.values()))
            htex.shutdown()


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
        ("Parsl HTEX (direct)", lambda r: bench_htex(r, slow, samples)),
        ("Dask LocalCluster", lambda r: bench_dask(r, slow, samples)),
    ]
    rows = []
    for name, run in plan:
        if args.only and not any(part in name for part in args.only):
            continue
        row = Row(name)
        try:
            run(row)
        except ImportError as exc:
            row.note = f"not available: {exc}"
        rows.append(row)
    reference = next((r.throughput for r in rows if r.name.startswith("bare")), None)
    print(f"no-op tasks, {WORKERS} workers, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    header = f"{'engine':<26} {'tasks':>7} {'tasks/s':>10} {'p50 ms':>8} {'vs bare PPE':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.throughput is None:
            print(f"{row.name:<26} {row.note}")
            continue
        ratio = f"{row.throughput / reference:.2f}x" if reference else "-"
        print(
            f"{row.name:<26} {row.tasks:>7} {row.throughput:>10,.0f} {row.p50_ms:>8.3f} {ratio:>12}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
