"""Envelopes, serialization strategies, the executor's checks and engine configuration."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mepcore.errors import ConfigError, TaskError
from mepcore.tasks import (
    STRATEGIES,
    Executor,
    ExecutorLimits,
    RemoteError,
    RemoteTaskError,
    ResultEnvelope,
    TaskEnvelope,
    pack_args,
    pack_function,
    unpack_result,
    unpack_value,
)
from mepcore.tasks.serialization import (
    FUNCTION_ONLY_STRATEGIES,
    ResultTooLarge,
    pack_value,
    pack_value_bounded,
)

FID = "ab" * 32
task_ids = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
walltimes = st.none() | st.floats(min_value=0.001, max_value=1e6, allow_nan=False)
texts = st.text(max_size=200)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@given(task_id=task_ids, walltime=walltimes, payload=st.binary(max_size=256))
def test_task_header_round_trips_through_json(
    task_id: str, walltime: float | None, payload: bytes
) -> None:
    envelope = TaskEnvelope(task_id, FID, payload, walltime)
    header = json.loads(json.dumps(envelope.to_header()))
    assert "payload" not in header
    assert TaskEnvelope.from_header(header, payload) == envelope


@given(
    task_id=task_ids,
    failed=st.booleans(),
    type_name=texts,
    message=texts,
    tb=texts,
    stamps=st.tuples(times, times, times),
    payload=st.binary(max_size=64),
)
def test_result_header_round_trips_through_json(
    task_id: str,
    failed: bool,
    type_name: str,
    message: str,
    tb: str,
    stamps: tuple[float, float, float],
    payload: bytes,
) -> None:
    error = RemoteError(type_name, message, tb, "task.timeout") if failed else None
    envelope = ResultEnvelope(
        task_id, "failed" if failed else "success", b"" if failed else payload, error, *stamps
    )
    header = json.loads(json.dumps(envelope.to_header()))
    assert ResultEnvelope.from_header(header, envelope.payload) == envelope


def good_task_header() -> dict[str, object]:
    return {"version": 1, "task_id": "t-1", "function_id": FID, "walltime": 5.0}


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("version", 2),
        ("version", "1"),
        ("version", True),
        ("task_id", ""),
        ("task_id", "x" * 129),
        ("task_id", "a/b"),
        ("task_id", 7),
        ("function_id", "AB" * 32),
        ("function_id", "ab" * 31),
        ("walltime", -1),
        ("walltime", 0),
        ("walltime", math.inf),
        ("walltime", math.nan),
        ("walltime", "5"),
        ("walltime", True),
        ("extra", 1),
    ],
)
def test_invalid_task_headers_are_refused(change: str, value: object) -> None:
    header = good_task_header()
    header[change] = value
    with pytest.raises(TaskError) as caught:
        TaskEnvelope.from_header(header, b"")
    assert caught.value.reason == "task.envelope_invalid"


def test_a_task_header_missing_a_key_or_not_a_mapping_is_refused() -> None:
    header = good_task_header()
    del header["walltime"]
    for bad in (header, ["not", "a", "mapping"]):
        with pytest.raises(TaskError, match="envelope_invalid"):
            TaskEnvelope.from_header(bad, b"")  # type: ignore[arg-type]


def test_oversized_task_payload_is_refused_at_the_edge() -> None:
    with pytest.raises(TaskError) as caught:
        TaskEnvelope.from_header(good_task_header(), b"x" * 11, max_payload_bytes=10)
    assert caught.value.reason == "task.payload_too_large"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.update(status="ok"),
        lambda h: h.update(error=None, status="failed"),
        lambda h: h["timings"].update(started=-1.0),
        lambda h: h["timings"].update(extra=1.0),
        lambda h: h.update(
            status="failed",
            error={"type_name": "X", "message": "m", "traceback": "", "reason": "auth.denied"},
        ),
        lambda h: h.update(
            status="failed",
            error={"type_name": "X", "message": "m", "traceback": "", "reason": "task.nope"},
        ),
        lambda h: h.update(
            status="failed",
            error={
                "type_name": "X" * 300,
                "message": "m",
                "traceback": "",
                "reason": "task.failed",
            },
        ),
    ],
)
def test_invalid_result_headers_are_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    header = ResultEnvelope("t", "success", b"", None, 1.0, 2.0, 3.0).to_header()
    mutate(header)
    with pytest.raises(TaskError, match="envelope_invalid"):
        ResultEnvelope.from_header(header, b"")


def test_a_failed_result_with_a_payload_is_refused() -> None:
    header = ResultEnvelope("t", "failed", b"", RemoteError.of("task.failed")).to_header()
    with pytest.raises(TaskError, match="envelope_invalid"):
        ResultEnvelope.from_header(header, b"payload")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    )
)
def test_values_round_trip_with_every_strategy(value: object) -> None:
    for tag in set(STRATEGIES) - FUNCTION_ONLY_STRATEGIES:
        assert unpack_value(pack_value(value, tag)) == value


def test_payloads_carry_their_strategy_tag_and_unknown_tags_are_refused() -> None:
    assert pack_args((1,), {"b": 2}).startswith(b"dill.v1\n")
    assert unpack_value(pack_args((1,), {"b": 2})) == ((1,), {"b": 2})
    assert pack_args((), {}, "pickle.v1").startswith(b"pickle.v1\n")
    with pytest.raises(TaskError) as caught:
        unpack_value(b"os.system\nrm -rf /")
    assert caught.value.reason == "task.unknown_strategy"
    with pytest.raises(TaskError) as caught:
        pack_args((), {}, "marshal.v0")
    assert caught.value.reason == "task.unknown_strategy"
    with pytest.raises(TaskError) as caught:
        unpack_value(b"dill.v1\nnot a pickle")
    assert caught.value.reason == "task.deserialization_failed"


def test_function_id_is_the_sha256_of_the_serialized_function() -> None:
    def double(x: int) -> int:
        return 2 * x

    function_id, body = pack_function(double)
    assert function_id == hashlib.sha256(body).hexdigest()
    assert unpack_value(body)(21) == 42


def test_bounded_serialization_stops_at_the_limit() -> None:
    assert unpack_value(pack_value_bounded(b"x" * 100, 1000)) == b"x" * 100
    with pytest.raises(ResultTooLarge):
        pack_value_bounded(b"x" * 2000, 1000)


def test_unpack_result_returns_the_value_or_raises_the_remote_error() -> None:
    ok = ResultEnvelope("t", "success", pack_value({"a": 1}))
    assert unpack_result(ok) == {"a": 1}
    error = RemoteError("KeyError", "'k'", "Traceback...\nKeyError: 'k'", "task.failed")
    with pytest.raises(RemoteTaskError) as caught:
        unpack_result(ResultEnvelope("t", "failed", b"", error))
    assert caught.value.type_name == "KeyError"
    assert caught.value.reason == "task.failed"
    assert "Traceback..." in str(caught.value)


def test_register_function_checks_the_id_and_the_size() -> None:
    executor = Executor.from_engine_config(
        {"type": "ThreadPoolEngine"}, limits=ExecutorLimits(max_function_bytes=1000)
    )
    function_id, body = pack_function(len)
    executor.register_function(function_id, body)
    with pytest.raises(TaskError, match="envelope_invalid"):
        executor.register_function("0" * 64, body)
    big = b"dill.v1\n" + bytes(2000)
    with pytest.raises(TaskError, match="payload_too_large"):
        executor.register_function(hashlib.sha256(big).hexdigest(), big)


def test_submit_before_start_is_a_bug_and_oversized_payloads_are_refused() -> None:
    executor = Executor.from_engine_config(
        {"type": "ThreadPoolEngine"}, limits=ExecutorLimits(max_payload_bytes=100)
    )
    function_id, body = pack_function(len)
    executor.register_function(function_id, body)
    envelope = TaskEnvelope("t", function_id, pack_args((b"x" * 200,), {}))
    with pytest.raises(RuntimeError):
        executor.submit(envelope)
    with executor:
        result = executor.submit(envelope).result(10)
        assert result.reason == "task.payload_too_large"
        small = TaskEnvelope("s", function_id, pack_args((b"xyz",), {}))
        assert unpack_result(executor.submit(small).result(10)) == 3


def test_default_walltime_applies_to_tasks_without_one() -> None:
    def sleepy() -> None:
        import time

        time.sleep(1.0)

    executor = Executor.from_engine_config(
        {"type": "ThreadPoolEngine"}, limits=ExecutorLimits(default_walltime=0.1)
    )
    function_id, body = pack_function(sleepy)
    with executor:
        executor.register_function(function_id, body)
        result = executor.submit(TaskEnvelope("t", function_id, pack_args((), {}))).result(10)
    assert result.reason == "task.timeout"


@pytest.mark.parametrize(
    ("engine", "path"),
    [
        ({"type": "DaskEngine"}, "$.engine.type"),
        ({"type": "parsl.executors.HighThroughputExecutor"}, "$.engine.type"),
        ({}, "$.engine.type"),
        ({"type": "ProcessPoolEngine", "max_workers": 0}, "$.engine.max_workers"),
        ({"type": "ProcessPoolEngine", "max_workers": "2"}, "$.engine.max_workers"),
        ({"type": "ProcessPoolEngine", "workers": 2}, "$.engine.workers"),
        ({"type": "ThreadPoolEngine", "prefetch": 2}, "$.engine.prefetch"),
        ({"type": "GlobusComputeEngine", "strategy": "bogus"}, "$.engine.strategy"),
        (
            {"type": "GlobusComputeEngine", "provider": {"type": "os.system"}},
            "$.engine.provider.type",
        ),
        (
            {"type": "GlobusComputeEngine", "provider": {"type": "LocalProvider", "bogus": 1}},
            "$.engine.provider.bogus",
        ),
        (
            {
                "type": "GlobusComputeEngine",
                "provider": {"type": "SlurmProvider", "launcher": {"type": "subprocess.Popen"}},
            },
            "$.engine.provider.launcher.type",
        ),
        (
            {
                "type": "GlobusComputeEngine",
                "provider": {"type": "LocalProvider", "init_blocks": "many"},
            },
            "$.engine.provider",
        ),
    ],
)
def test_engine_configs_are_checked_against_closed_tables(
    engine: dict[str, object], path: str
) -> None:
    if engine.get("type") == "GlobusComputeEngine":
        pytest.importorskip("parsl")
    with pytest.raises(ConfigError) as caught:
        Executor.from_engine_config(engine)
    assert caught.value.reason == "config.endpoint_config_invalid"
    assert caught.value.violations[0].path == path


def test_importing_the_package_imports_neither_parsl_nor_an_engine() -> None:
    code = (
        "import sys, mepcore.tasks as t\n"
        "t.Executor.from_engine_config({'type': 'ThreadPoolEngine'})\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('parsl', 'mepd', 'jinja2', 'casbin') or m in ('mepcore.config', 'mepcore.identity',"
        " 'mepcore.authz', 'mepcore.spawn', 'mepcore.client', 'mepcore.tasks.process',"
        " 'mepcore.tasks.parsl_engine', 'mepcore.tasks.parsl_build',"
        " 'mepcore.tasks.parsl_guard', 'mepcore.tasks.parsl_owner')]\n"
        "print(bad)\n"
        "import threading; print(threading.active_count())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "1"  # building an executor starts no thread


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)
task_keys = st.sampled_from(["version", "task_id", "function_id", "walltime"]) | st.text(max_size=8)
result_keys = st.sampled_from(["version", "task_id", "status", "error", "timings"]) | st.text(
    max_size=8
)


@given(st.dictionaries(task_keys, json_values, max_size=6), st.binary(max_size=16))
def test_any_task_header_is_either_valid_or_refused_with_a_reason(
    header: dict[str, object], payload: bytes
) -> None:
    reason = None
    try:
        envelope = TaskEnvelope.from_header(header, payload)
    except TaskError as exc:
        reason = exc.reason
    else:
        assert TaskEnvelope.from_header(envelope.to_header(), payload) == envelope
    assert reason in (None, "task.envelope_invalid")


@given(st.dictionaries(result_keys, json_values, max_size=6))
def test_any_result_header_is_either_valid_or_refused_with_a_reason(
    header: dict[str, object],
) -> None:
    reason = None
    try:
        ResultEnvelope.from_header(header, b"")
    except TaskError as exc:
        reason = exc.reason
    assert reason in (None, "task.envelope_invalid")
