"""A 1 MB argument and a 1 MB result, round trip through the whole system, beside peers.

Four cases, each one call at a time (submit, then wait for the result), repeated:
- a small call (the warm single-task round trip, here also through the ``Executor``),
- a 1 MiB ``bytes`` argument and a small result (``len``),
- a small argument and a 1 MiB result,
- a 1 MiB argument echoed back as a 1 MiB result;
through:
- mep over HTTP: ``mepd serve`` on 127.0.0.1, one user endpoint (process pool, two
  workers), ``POST /v1/endpoints/hpc/submit`` + ``POST /v1/tasks/wait`` with httpx,
  base64 in JSON (what a plain-JSON client does);
- mep through ``mepcore.client.Executor`` (batching and long-poll threads included; its
  payloads and results travel as mep frames, without base64);
- peers doing the same calls in the same run: a bare ``ProcessPoolExecutor``, Parsl's
  HighThroughputExecutor used directly, and Dask's ``LocalCluster`` (two workers each).

A second table is a concurrent caller's small round trip, alone and while another caller
streams 1 MiB echo round trips without pause through the same system: the difference of
the p50s is what a large payload costs everybody else (issue 22: at most +1 ms for mep).
For mep the streamer is another identity (its own user endpoint) in another process; the
peers are measured the same way in the same run, to show what two cores shared with a
streamer cost them: Dask's streamer is another process with its own ``Client`` of the same
scheduler, Parsl's a thread of this process (an HTEX serves the one executor object that
started it; submits are serialized by a lock, which HTEX's ``submit`` needs).

As root the daemon maps accounts made for the run (removed after); as another user
the daemon refuses to run work as its own uid, so the mep rows are "not measured".

Usage: python bench/payload.py [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ENDPOINT,
    WORKERS,
    Stats,
    bench_deployment,
    dask_client,
    fmt_stats,
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
# Starts a 1 MiB echo streamer for the length of a ``with`` block (``streaming``).
Streamer = Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Peer:
    """A peer's one-call round trip, and how to stream 1 MiB echoes beside it."""

    call: Call
    streamer: Streamer | None = None


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
    with mep_executor_as(deployment, deployment.token(deployment.identities[0])) as call:
        yield call


@contextmanager
def mep_executor_as(deployment: Any, token: str) -> Iterator[Call]:
    from mepcore.client import Executor

    with Executor(ENDPOINT, USER_ENDPOINT_CONFIG, url=deployment.url, token=token) as ex:
        yield lambda fn, arg: ex.submit(fn, arg).result(timeout=60)


@contextmanager
def bare_pool() -> Iterator[Peer]:
    with concurrent.futures.ProcessPoolExecutor(WORKERS) as pool:
        yield Peer(lambda fn, arg: pool.submit(fn, arg).result(timeout=60))


def _htex_stream(executor: Any, lock: Any, stop: Any, count: Any) -> None:
    """In a thread: 1 MiB echo round trips through the HTEX until ``stop`` is set."""
    while not stop.is_set():
        with lock:
            future = executor.submit(echo, {}, PAYLOAD)
        if future.result(timeout=60) != PAYLOAD:
            raise RuntimeError("the HTEX streamer got a wrong result")
        with count.get_lock():
            count.value += 1


@contextmanager
def htex() -> Iterator[Peer]:
    with parsl_htex() as executor:
        lock = threading.Lock()  # HTEX's submit is not thread-safe (counter, ZMQ socket)

        def call(fn: Callable[[Any], Any], arg: Any) -> Any:
            with lock:
                future = executor.submit(fn, {}, arg)
            return future.result(timeout=60)

        yield Peer(call, lambda: streaming(_htex_stream, (executor, lock), thread=True))


def _dask_stream(address: str, stop: Any, count: Any) -> None:
    """In another process: 1 MiB round trips through the Dask scheduler at ``address``
    (``bytes`` copies its argument: a builtin, so no function travels by value)."""
    from dask.distributed import Client

    with Client(address) as client:
        while not stop.is_set():
            if client.submit(bytes, PAYLOAD, pure=False).result(timeout=60) != PAYLOAD:
                raise RuntimeError("the Dask streamer got a wrong result")
            with count.get_lock():
                count.value += 1


@contextmanager
def dask() -> Iterator[Peer]:
    with dask_client() as client:
        address = client.scheduler.address
        yield Peer(
            lambda fn, arg: client.submit(fn, arg, pure=False).result(timeout=60),
            lambda: streaming(_dask_stream, (address,)),
        )


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


def _stream(url: str, token: str, function_id: str, stop: Any, count: Any) -> None:
    """In another process: 1 MiB echo round trips through mep until ``stop`` is set."""
    from mepcore.client import Client, TaskRequest, pack_args

    args = pack_args((PAYLOAD,), {})
    with Client(url, token) as client:
        while not stop.is_set():
            # As the Executor sends a call alone: submit and wait in one request, then
            # the long-poll if the result is not in yet.
            ids, report = client.submit_and_wait(
                ENDPOINT,
                [TaskRequest(function_id, args)],
                wait=0.05,
                user_endpoint_config=USER_ENDPOINT_CONFIG,
            )
            while not report.tasks:
                report = client.wait_report(ids, timeout=10)
            if report.tasks[0].outcome() != PAYLOAD:
                raise RuntimeError("the streamer got a wrong result")
            with count.get_lock():
                count.value += 1


@contextmanager
def streaming(
    target: Callable[..., None], args: tuple[Any, ...], *, thread: bool = False
) -> Iterator[Any]:
    """``target(*args, stop, count)`` streaming in another process (or a thread of this
    one) for the length of the block, entered once its first round trip is through.
    Yields ``count`` (a shared integer: round trips so far)."""
    context = multiprocessing.get_context("spawn")
    stop, count = context.Event(), context.Value("i", 0)
    factory: Any = threading.Thread if thread else context.Process
    runner = factory(target=target, args=(*args, stop, count), daemon=True)
    runner.start()
    try:
        end = time.monotonic() + 60
        while count.value == 0 and runner.is_alive() and time.monotonic() < end:
            time.sleep(0.01)  # the first 1 MiB round trip is through: streaming
        if count.value == 0:
            raise RuntimeError("the 1 MiB streamer got no round trip through")
        yield count
    finally:
        stop.set()
        runner.join(60)
        if not thread and runner.is_alive():
            runner.kill()


def _small_calls(call: Call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        if call(size_of, b"x") != 1:
            raise RuntimeError("small call: wrong result")
        samples.append(time.perf_counter() - began)
    return samples


def alone_and_beside(call: Call, streamer: Streamer, count: int) -> dict[str, Any]:
    """``count`` small round trips through ``call``, half alone and half while
    ``streamer`` streams 1 MiB round trips; windows alternate (alone, beside, alone,
    beside) so that drift of the machine's load falls on both."""
    alone: list[float] = []
    beside: list[float] = []
    streamed = 0
    _small_calls(call, 5)  # warm
    for _ in range(2):
        alone += _small_calls(call, count // 2)
        with streamer() as done:
            beside += _small_calls(call, count // 2)
        streamed += int(done.value)
    return {
        "alone": Stats.of(alone).to_dict(),
        "beside": Stats.of(beside).to_dict(),
        "streamed": streamed,
    }


def beside_streamer(deployment: Any, count: int) -> dict[str, Any]:
    """mep: a small Executor round trip (first identity), alone and while the second
    identity streams 1 MiB round trips from another process."""
    from mepcore.client import Client

    small_token, big_token = deployment.tokens(deployment.identities[:2])
    with Client(deployment.url, big_token) as other:
        function_id = other.register_function(echo)
        warm = other.submit(
            ENDPOINT, function_id, (b"warm",), user_endpoint_config=USER_ENDPOINT_CONFIG
        )
        other.get_result(warm, timeout=120)  # its user endpoint is up
    with mep_executor_as(deployment, small_token) as call:
        return alone_and_beside(
            call, lambda: streaming(_stream, (deployment.url, big_token, function_id)), count
        )


def _beside_rows(system: str, found: dict[str, Any] | str) -> list[list[str]]:
    if isinstance(found, str):
        return [[system, "-", "-", "-", "-", "-", "-", "-", found]]
    alone, beside = Stats(**found["alone"]), Stats(**found["beside"])
    growth = beside.p50 - alone.p50
    return [
        [system, "alone", str(alone.count), *fmt_stats(alone), "-", "-"],
        [
            system,
            "beside a 1 MiB streamer",
            str(beside.count),
            *fmt_stats(beside),
            f"p50 {growth * 1e3:+.2f} ms",
            str(found["streamed"]),
        ],
    ]


def print_beside(found: dict[str, dict[str, Any] | str]) -> None:
    """One table: each system's small round trip alone and beside its 1 MiB streamer."""
    rows = [row for system, figures in found.items() for row in _beside_rows(system, figures)]
    print_table(
        "A small round trip while another caller streams 1 MiB round trips (mep: another"
        " identity), beside the peers",
        ["system", "caller", "n", "min", "p50", "p95", "max", "growth", "streamed"],
        rows,
        [
            "mep: the small caller's Executor; the streamer another identity (its own user"
            " endpoint) in another process, 1 MiB echo round trips back to back (Client,"
            " frames); target: p50 growth <= +1 ms",
            "Dask: the streamer another process with its own Client of the same scheduler;"
            " Parsl HTEX: a thread of this process (HTEX serves one executor object; submits"
            " under a lock)",
            "streamed: 1 MiB round trips the streamer completed during the beside windows;"
            f" {WORKERS} workers everywhere, all on the same two cores",
        ],
    )


def _peer_beside(peer: Peer, count: int) -> dict[str, Any] | str:
    assert peer.streamer is not None
    try:
        return alone_and_beside(peer.call, peer.streamer, count)
    except Exception as exc:
        return f"not measured: {why_not_measured(exc)}"


Results = dict[str, dict[str, Stats] | str]
Beside = dict[str, Any] | str


def measure_mep(repeats: int, small_calls: int) -> tuple[Results, Beside]:
    """mep's rows (HTTP and the Executor) and its small round trip beside a streamer."""
    results: Results = {}
    beside: Beside = "not measured"
    try:
        with bench_deployment(2) as deployment:
            for name, runner in (("mep, HTTP", mep_http), ("mep, Executor", mep_executor)):
                try:
                    with runner(deployment) as call:
                        results[name] = measure(call, repeats)
                except Exception as exc:
                    results[name] = f"not measured: {why_not_measured(exc)}"
            try:
                beside = beside_streamer(deployment, small_calls)
            except Exception as exc:
                beside = f"not measured: {why_not_measured(exc)}"
    except Exception as exc:
        for name in ("mep, HTTP", "mep, Executor"):
            results[name] = f"not measured: no daemon: {type(exc).__name__}: {str(exc)[:160]}"
        beside = results["mep, HTTP"]
    return results, beside


def measure_peers(results: Results, repeats: int, small_calls: int) -> dict[str, Beside]:
    """The peers' rows into ``results``; the Parsl and Dask small round trips beside
    their own 1 MiB streamers returned."""
    beside: dict[str, Beside] = {}
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
            with runner() as peer:
                results[name] = measure(peer.call, repeats)
                if peer.streamer is not None:
                    beside[name] = _peer_beside(peer, small_calls)
        except Exception as exc:
            results[name] = f"not measured: {why_not_measured(exc)}"
    for name in ("Parsl HTEX (direct)", "Dask LocalCluster"):
        if name not in beside:  # the peer itself was not measured: the same reason
            beside[name] = str(results[name])
    return beside


def print_round_trips(results: Results) -> None:
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
            rows.append([path, case, str(stats.count), *fmt_stats(stats), ratio])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few calls (for tests)")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.smoke else 40)
    small_calls = max(repeats, 10) * 5

    results, beside = measure_mep(repeats, small_calls)
    beside_peers = measure_peers(results, repeats, small_calls)
    print_round_trips(results)
    print_beside({"mep, Executor": beside, **beside_peers})
    figures: dict[str, Any] = {
        k: (v if isinstance(v, str) else {c: s.to_dict() for c, s in v.items()})
        for k, v in results.items()
    }
    figures["beside_streamer"] = beside
    # The same measurement for the peers: what sharing two cores with a streamer costs them.
    figures["beside_streamer_peers"] = beside_peers
    write_json(args.json, figures)
    measured = all(not isinstance(v, str) for k, v in results.items() if k.startswith("mep"))
    # Not root: the daemon refuses its own uid on purpose; the table says so, not a failure.
    return 0 if measured or not is_root() else 1


if __name__ == "__main__":
    sys.exit(main())
