"""A 1 MB argument and a 1 MB result, round trip through the whole system, beside peers.

Four cases, each one call at a time (submit, then wait for the result), repeated:
- a small call (the warm single-task round trip, here also through the ``Executor``),
- a 1 MiB ``bytes`` argument and a small result (``len``),
- a small argument and a 1 MiB result,
- a 1 MiB argument echoed back as a 1 MiB result;
through:
- mep over HTTP: ``mepd serve`` on 127.0.0.1, one user endpoint (process pool, two
  workers), ``POST /v1/endpoints/hpc/submit`` + ``POST /v1/tasks/wait`` with httpx;
- mep through ``mepcore.client.Executor`` (batching and long-poll threads included);
- peers doing the same calls in the same run: a bare ``ProcessPoolExecutor``, Parsl's
  HighThroughputExecutor used directly, and Dask's ``LocalCluster`` (two workers each).

As root the daemon maps an account made for the run (removed after); as another user
the daemon refuses to run work as its own uid, so the mep rows are "not measured".

Usage: python bench/payload.py [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ENDPOINT,
    WORKERS,
    Stats,
    bench_deployment,
    dask_client,
    fmt_seconds,
    is_root,
    parsl_htex,
    peer_available,
    print_table,
    why_not_measured,
    write_json,
)

MIB = 1 << 20
USER_ENDPOINT_CONFIG = {"engine": "ProcessPoolEngine", "max_workers": WORKERS}


def size_of(data: bytes) -> int:
    return len(data)


def make(size: int) -> bytes:
    return bytes(size)


def echo(data: bytes) -> bytes:
    return data


PAYLOAD = bytes(range(256)) * (MIB // 256)
CASES: list[tuple[str, Callable[[Any], Any], Any, Any]] = [
    ("small argument, small result", size_of, b"x", 1),
    ("1 MiB argument, small result", size_of, PAYLOAD, MIB),
    ("small argument, 1 MiB result", make, MIB, bytes(MIB)),
    ("1 MiB argument, 1 MiB result", echo, PAYLOAD, PAYLOAD),
]

Call = Callable[[Callable[[Any], Any], Any], Any]


@contextmanager
def mep_http(deployment: Any) -> Iterator[Call]:
    import httpx

    from mepcore.client import pack_args, pack_function, unpack_value

    token = deployment.token(deployment.identities[0])
    with httpx.Client(
        base_url=deployment.url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
        limits=httpx.Limits(keepalive_expiry=1.0),  # below uvicorn's 5 s keep-alive
    ) as http:
        ids: dict[Any, str] = {}

        def call(fn: Callable[[Any], Any], arg: Any) -> Any:
            if fn not in ids:
                _, body = pack_function(fn)
                r = http.post("/v1/functions", json={"function": base64.b64encode(body).decode()})
                r.raise_for_status()
                ids[fn] = r.json()["function_id"]
            args = base64.b64encode(pack_args((arg,), {})).decode()
            r = http.post(
                f"/v1/endpoints/{ENDPOINT}/submit",
                json={
                    "user_endpoint_config": USER_ENDPOINT_CONFIG,
                    "tasks": [{"function_id": ids[fn], "args": args}],
                },
            )
            if r.status_code != 200:
                raise RuntimeError(f"submit refused: {r.status_code} {r.text[:200]}")
            (task_id,) = r.json()["task_ids"]
            end = time.monotonic() + 60
            while time.monotonic() < end:
                r = http.post("/v1/tasks/wait", json={"task_ids": [task_id], "timeout": 10})
                r.raise_for_status()
                for view in r.json()["tasks"]:
                    if view["state"] != "success":
                        raise RuntimeError(f"task {view['state']}: {view.get('error')}")
                    return unpack_value(base64.b64decode(view["result"]))
            raise TimeoutError("no result in 60 s")

        yield call


@contextmanager
def mep_executor(deployment: Any) -> Iterator[Call]:
    from mepcore.client import Executor

    token = deployment.token(deployment.identities[0])
    with Executor(ENDPOINT, USER_ENDPOINT_CONFIG, url=deployment.url, token=token) as ex:
        yield lambda fn, arg: ex.submit(fn, arg).result(timeout=60)


@contextmanager
def bare_pool() -> Iterator[Call]:
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
        yield lambda fn, arg: pool.submit(fn, arg).result(timeout=60)


@contextmanager
def htex() -> Iterator[Call]:
    with parsl_htex() as executor:
        yield lambda fn, arg: executor.submit(fn, {}, arg).result(timeout=60)


@contextmanager
def dask() -> Iterator[Call]:
    with dask_client() as client:
        yield lambda fn, arg: client.submit(fn, arg, pure=False).result(timeout=60)


def measure(call: Call, repeats: int) -> dict[str, Stats]:
    out = {}
    for name, fn, arg, expected in CASES:
        for _ in range(2):  # warm up: user endpoint / workers started, function cached
            if call(fn, arg) != expected:
                raise RuntimeError(f"{name}: wrong result")
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            result = call(fn, arg)
            samples.append(time.perf_counter() - began)
            if result != expected:
                raise RuntimeError(f"{name}: wrong result")
        out[name] = Stats.of(samples)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few calls (for tests)")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.smoke else 40)

    results: dict[str, dict[str, Stats] | str] = {}
    try:
        with bench_deployment(1) as deployment:
            for name, runner in (("mep, HTTP", mep_http), ("mep, Executor", mep_executor)):
                try:
                    with runner(deployment) as call:
                        results[name] = measure(call, repeats)
                except Exception as exc:
                    results[name] = f"not measured: {why_not_measured(exc)}"
    except Exception as exc:
        for name in ("mep, HTTP", "mep, Executor"):
            results[name] = f"not measured: no daemon: {type(exc).__name__}: {str(exc)[:160]}"
    peers: list[tuple[str, Callable[[], Any], str | None]] = [
        ("bare ProcessPoolExecutor", bare_pool, None),
        ("Parsl HTEX (direct)", htex, peer_available("parsl")),
        ("Dask LocalCluster", dask, peer_available("distributed")),
    ]
    for name, runner, missing in peers:
        if missing:
            results[name] = f"not measured: {missing}"
            continue
        try:
            with runner() as call:
                results[name] = measure(call, repeats)
        except Exception as exc:
            results[name] = f"not measured: {why_not_measured(exc)}"

    reference = results.get("mep, Executor")
    rows = []
    for path, found in results.items():
        if isinstance(found, str):
            rows.append([path, "all", "-", "-", "-", "-", "-", found])
            continue
        for case, stats in found.items():
            ratio = "-"
            if isinstance(reference, dict) and path != "mep, Executor":
                ratio = f"{stats.p50 / reference[case].p50:.2f}x"
            rows.append(
                [
                    path,
                    case,
                    str(stats.count),
                    fmt_seconds(stats.min),
                    fmt_seconds(stats.p50),
                    fmt_seconds(stats.p95),
                    fmt_seconds(stats.max),
                    ratio,
                ]
            )
    print_table(
        "Warm round trips: a small call, a 1 MiB argument, a 1 MiB result (one call at a time)",
        ["path", "case", "n", "min", "p50", "p95", "max", "p50 / mep Executor p50"],
        rows,
        [
            f"{WORKERS} workers everywhere; mep user endpoint: ProcessPoolEngine",
            "ratio > 1: that path is slower than mep's Executor; < 1: faster",
            "mep, HTTP: httpx submit + long-poll wait, base64 in JSON both ways",
        ],
    )
    write_json(
        args.json,
        {
            k: (v if isinstance(v, str) else {c: s.to_dict() for c, s in v.items()})
            for k, v in results.items()
        },
    )
    measured = all(not isinstance(v, str) for k, v in results.items() if k.startswith("mep"))
    # Not root: the daemon refuses its own uid on purpose; the table says so, not a failure.
    return 0 if measured or not is_root() else 1


if __name__ == "__main__":
    sys.exit(main())
