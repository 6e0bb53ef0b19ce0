"""Futures per second for no-op calls through ``mepcore.client.Executor``, beside Parsl
and Dask doing the same work in the same run.

- mep: ``Executor.submit(noop)`` N times against a real ``mepd`` on 127.0.0.1 (the demo's
  deployment: examples/demo/, a process-pool user endpoint with 2 workers), then every
  ``result()``; the user endpoint is started (warm) before the clock starts.
- Parsl: a ``python_app`` on a HighThroughputExecutor with a LocalProvider and 2 workers,
  N calls, then every ``result()`` (after one warm-up call).
- Dask: ``client.map(noop, range(N), pure=False)`` and ``client.gather`` on a
  ``LocalCluster`` of 2 single-threaded worker processes (after one warm-up call);
  "not installed" when Dask is absent (``make bench`` installs it).

``--smoke`` runs a tiny N once, to keep the script working (a test does that).
Prints one table; ratios are to the mep row. As root the daemon maps to the demo
accounts (created if missing), as another user to that user.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "demo"))
sys.path.insert(0, str(REPO))

import demo  # noqa: E402 - the demo's deployment helpers, found through the path above
from tests.trusted_dir import use_private_tmp  # noqa: E402

use_private_tmp()  # mepd refuses deployments under /tmp (security rule 8)


def noop(*_: object) -> None:
    return None


def bench_mep(n: int) -> float:
    from mepcore.client import Executor

    with tempfile.TemporaryDirectory(prefix="mep-bench-") as tmp:
        work = Path(tmp)
        config, state_dir, _ = demo.prepare(work)
        process, url = demo.start_daemon(config, state_dir, work / "mepd.log")
        try:
            token = demo.issue_token(config, "alice@example.org")
            with Executor("demo", url=url, token=token) as ex:
                ex.submit(noop).result(120)  # start the user endpoint, register noop
                started = time.perf_counter()
                futures = [ex.submit(noop) for _ in range(n)]
                for future in futures:
                    future.result(300)
                elapsed = time.perf_counter() - started
        finally:
            demo.stop_daemon(process)
    return n / elapsed


def bench_parsl(n: int) -> float:
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    logging.getLogger("parsl").setLevel(logging.ERROR)
    # HTEX starts interchange.py and process_worker_pool.py by name, from PATH.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix="mep-bench-parsl-") as run_dir:
        config = Config(
            executors=[
                HighThroughputExecutor(
                    label="htex",
                    max_workers_per_node=2,
                    provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
                )
            ],
            run_dir=run_dir,
            strategy="none",
        )
        dfk = parsl.load(config)
        try:
            app = parsl.python_app(noop, executors=["htex"])
            app().result(120)
            started = time.perf_counter()
            futures = [app() for _ in range(n)]
            for future in futures:
                future.result(300)
            elapsed = time.perf_counter() - started
        finally:
            dfk.cleanup()
            parsl.clear()
    return n / elapsed


def bench_dask(n: int) -> float:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.submit(noop, pure=False).result(120)
        started = time.perf_counter()
        client.gather(client.map(noop, range(n), pure=False))
        elapsed = time.perf_counter() - started
    return n / elapsed


def measure(fn: Callable[[int], float], n: int) -> str | float:
    try:
        return fn(n)
    except ImportError as exc:
        return f"not installed ({exc.name})"
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {exc}"[:100]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run, to check it works")
    parser.add_argument("-n", type=int, default=10_000, help="no-op futures per system")
    args = parser.parse_args()
    n = 50 if args.smoke else args.n
    rows = [
        ("mep Executor (HTTP, batched, 2 workers)", measure(bench_mep, n)),
        ("Parsl python_app on HTEX (2 workers)", measure(bench_parsl, n)),
        ("Dask client.map on LocalCluster (2 procs)", measure(bench_dask, n)),
    ]
    base = rows[0][1]
    print(
        f"\nclient throughput: {n:,} no-op futures, {os.cpu_count()} cores"
        + (" (smoke)" if args.smoke else "")
    )
    print(f"{'system':<44}{'futures/s':>12}{'mep is':>10}")
    for name, value in rows:
        if isinstance(value, float):
            ratio = f"{base / value:.2f}x" if isinstance(base, float) and name != rows[0][0] else ""
            print(f"{name:<44}{value:>12,.0f}{ratio:>10}")
        else:
            print(f"{name:<44}  {value}")
    return 0 if isinstance(base, float) else 1


if __name__ == "__main__":
    sys.exit(main())
