"""bench/payload.py's "beside a streamer" measurement, shared by mep and the peers, and
the report line that puts the peers' growth next to mep's. No daemon and no peers here:
the measurement's windows with a stand-in call, a real streaming thread, and the report
from figures as the script writes them (``tests/test_bench_scripts.py`` runs the script)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest

from tests.test_bench_scripts import load


def stats(p50: float) -> dict[str, Any]:
    return {"count": 10, "min": p50, "p50": p50, "p95": p50, "p99": p50, "max": p50, "mean": p50}


def window(alone: float, beside: float, streamed: int = 7) -> dict[str, Any]:
    return {"alone": stats(alone), "beside": stats(beside), "streamed": streamed}


def payload_target(report: ModuleType, figures: dict[str, Any]) -> Any:
    run = report.ScriptRun("payload.py", [], returncode=0, stdout="", figures=figures)
    (side,) = [t for t in report._payload({"payload.py": run}) if t.key == "beside"]
    return side


def test_the_beside_target_shows_the_peers_growth_next_to_meps() -> None:
    report = load("report")
    side = payload_target(
        report,
        {
            "beside_streamer": window(0.004, 0.0045, streamed=12),
            "beside_streamer_peers": {
                "Parsl HTEX (direct)": window(0.002, 0.0207),
                "Dask LocalCluster": "not measured: not installed (distributed)",
            },
        },
    )
    assert side.met  # judged on mep's growth alone: +0.50 ms
    assert side.measured.startswith("+0.50 ms (12 streamed)")
    assert "Parsl HTEX (direct) +18.70 ms" in side.measured
    assert "Dask LocalCluster not measured" in side.measured


def test_figures_without_the_peers_read_as_before() -> None:
    report = load("report")
    side = payload_target(report, {"beside_streamer": window(0.004, 0.0062, streamed=3)})
    assert side.measured == "+2.20 ms (3 streamed)" and not side.met
    side = payload_target(report, {"beside_streamer": "not measured: no daemon"})
    assert side.why == "not measured: no daemon" and not side.met


def test_small_calls_alternate_alone_and_beside_the_streamer() -> None:
    payload = load("payload")
    streaming = threading.Event()
    seen: list[bool] = []

    def call(fn: Any, arg: Any) -> Any:
        seen.append(streaming.is_set())
        return fn(arg)

    class Done:
        value = 4

    @contextmanager
    def streamer() -> Iterator[Done]:
        streaming.set()
        yield Done()
        streaming.clear()

    found = payload.alone_and_beside(call, streamer, 20)
    assert found["alone"]["count"] == found["beside"]["count"] == 20
    assert found["streamed"] == 8
    # 5 warm-up calls, then alone, beside, alone, beside: 10 calls each.
    assert seen == [False] * 5 + ([False] * 10 + [True] * 10) * 2


def test_streaming_enters_after_a_first_round_trip_and_stops_its_thread() -> None:
    payload = load("payload")
    runners: list[threading.Thread] = []

    def target(stop: Any, count: Any) -> None:
        runners.append(threading.current_thread())
        while not stop.is_set():
            with count.get_lock():
                count.value += 1
            stop.wait(0.001)

    with payload.streaming(target, (), thread=True) as count:
        assert count.value >= 1
    assert not runners[0].is_alive()

    def gives_up(stop: Any, count: Any) -> None:
        return None

    with (
        pytest.raises(RuntimeError, match="no round trip"),
        payload.streaming(gives_up, (), thread=True),
    ):
        pass
