"""Tests of ``mepcore.client`` without a daemon: records, errors, retries, TLS options,
the environment, and the future's state machine. The HTTP side uses
``httpx.MockTransport`` (a transport, not a patch of anything)."""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import CancelledError, wait
from typing import Any

import httpx
import pytest
import tenacity

from mepcore.client import (
    Client,
    ClientError,
    Executor,
    RemoteException,
    RequestRefused,
    RetryPolicy,
    SerializationError,
    ServiceUnavailable,
    TaskInfrastructureError,
    TaskRecord,
    WaitReport,
    pack_args,
    pack_function,
    pack_value,
    unpack_value,
)
from mepcore.client.executor import _SENT, TaskFuture
from mepcore.errors import REASONS

FAST = RetryPolicy(
    attempts=4, deadline=10.0, initial_wait=0.001, max_wait=0.002, max_retry_after=0.01
)
FID = "a" * 64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Recorder:
    """A MockTransport handler answering from a script of responses per path."""

    def __init__(self, script: dict[str, list[Callable[[httpx.Request], httpx.Response]]]):
        self.script = script
        self.calls: Counter[str] = Counter()
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls[path] += 1
        self.requests.append(request)
        answers = self.script[path]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        return answer(request)


def reply(
    status: int, body: Any, headers: dict[str, str] | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=body, headers=headers)


def refuse(
    status: int, reason: str, message: str = "no", **extra: Any
) -> Callable[[httpx.Request], httpx.Response]:
    return reply(status, {"error": {"reason": reason, "message": message, **extra}})


def raise_(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc

    return answer


def client_for(recorder: Recorder, token: str | None = "tok", **kwargs: Any) -> Client:
    kwargs.setdefault("retry", FAST)
    return Client("http://mep.test", token, transport=httpx.MockTransport(recorder), **kwargs)


SUBMIT = "/v1/endpoints/hpc/submit"
OK_SUBMIT = reply(200, {"task_ids": ["t1"]})


# -- serialization ------------------------------------------------------------------


def test_payload_round_trips_and_carries_its_tag() -> None:
    payload = pack_value({"a": [1, 2.5, None]})
    assert payload.startswith(b"dill.v1\n")
    assert unpack_value(payload) == {"a": [1, 2.5, None]}
    assert unpack_value(pack_args((1, "x"), {"k": 2})) == ((1, "x"), {"k": 2})


def test_function_id_is_the_sha256_of_the_payload() -> None:
    import hashlib

    def double(x: int) -> int:
        return 2 * x

    fid, payload = pack_function(double)
    assert fid == hashlib.sha256(payload).hexdigest()
    assert unpack_value(payload)(21) == 42


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"evil.module\n\x80\x05N.", "task.unknown_strategy"),
        (b"no tag here", "task.deserialization_failed"),
        (b"dill.v1\nnot a pickle", "task.deserialization_failed"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(SerializationError) as info:
        unpack_value(payload)
    assert info.value.reason == reason


def test_unserializable_argument_fails_at_submit_time() -> None:
    ex = Executor("hpc", client=Client("http://mep.test", "tok"))
    with pytest.raises(SerializationError) as info:
        ex.submit(print, (i for i in range(3)))  # generators cannot be serialized
    assert info.value.reason == "task.serialization_failed"
    ex.shutdown()


# -- records ------------------------------------------------------------------------


def test_success_record_unpacks_its_value() -> None:
    record = TaskRecord.from_mapping(
        {"task_id": "t1", "state": "success", "result": b64(pack_value([1, 2]))}
    )
    assert record.done and record.outcome() == [1, 2]


def test_failed_record_with_task_failed_is_a_remote_exception() -> None:
    record = TaskRecord.from_mapping(
        {
            "task_id": "t1",
            "state": "failed",
            "error": {
                "reason": "task.failed",
                "type_name": "KeyError",
                "message": "'k'",
                "traceback": "Traceback (most recent call last):\n  ...\nKeyError: 'k'",
            },
        }
    )
    with pytest.raises(RemoteException) as info:
        record.outcome()
    exc = info.value
    assert (exc.type_name, exc.message, exc.reason, exc.task_id) == (
        "KeyError",
        "'k'",
        "task.failed",
        "t1",
    )
    assert "KeyError: 'k'" in exc.traceback
    assert str(exc).startswith("KeyError: 'k'\n\nRemote traceback:\nTraceback")


@pytest.mark.parametrize("reason", ["task.endpoint_lost", "task.timeout", "task.worker_lost"])
def test_infrastructure_failures_have_their_own_type(reason: str) -> None:
    record = TaskRecord.from_mapping(
        {
            "task_id": "t9",
            "state": "failed",
            "error": {
                "reason": reason,
                "type_name": None,
                "message": REASONS[reason],
                "traceback": None,
            },
        }
    )
    with pytest.raises(TaskInfrastructureError) as info:
        record.outcome()
    assert not isinstance(info.value, RemoteException)
    assert info.value.reason == reason and info.value.task_id == "t9"


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"state": "success"},
        {"task_id": "t", "state": "success"},
        {"task_id": "t", "state": "success", "result": "***"},
        {"task_id": "t", "state": "failed", "error": "boom"},
    ],
)
def test_malformed_records_are_protocol_errors(data: Any) -> None:
    with pytest.raises(ClientError) as info:
        TaskRecord.from_mapping(data)
    assert info.value.reason == "client.protocol_error"


def test_wait_report_keeps_pending_and_unknown_ids() -> None:
    report = WaitReport.from_mapping({"tasks": [], "pending": ["a"], "unknown": ["b"]})
    assert report.pending == ("a",) and report.unknown == ("b",)


# -- errors and retries ---------------------------------------------------------------


def test_a_4xx_is_raised_once_with_the_servers_reason_message_and_violations() -> None:
    rec = Recorder(
        {
            SUBMIT: [
                refuse(
                    422,
                    "config.invalid_variables",
                    "bad variables",
                    violations=[{"path": "$.workers", "message": "too big"}],
                )
            ]
        }
    )
    with pytest.raises(RequestRefused) as info:
        client_for(rec).submit("hpc", FID, (1,))
    exc = info.value
    assert rec.calls[SUBMIT] == 1
    assert (exc.status, exc.reason, exc.message) == (
        422,
        "config.invalid_variables",
        "bad variables",
    )
    assert [(v.path, v.message) for v in exc.violations] == [("$.workers", "too big")]


def test_an_unknown_server_reason_is_kept_verbatim() -> None:
    rec = Recorder({"/v1/tasks/x": [refuse(409, "api.some_future_code", "later")]})
    with pytest.raises(RequestRefused) as info:
        client_for(rec).get_task("x")
    assert info.value.reason == "api.some_future_code"
    assert "HTTP 409 api.some_future_code: later" in str(info.value)


@pytest.mark.parametrize("status", [429, 503])
def test_submit_is_retried_after_a_refusal_the_server_did_not_act_on(status: int) -> None:
    rec = Recorder({SUBMIT: [refuse(status, "api.too_many_requests", headers=None), OK_SUBMIT]})
    assert client_for(rec).submit("hpc", FID, (1,)) == "t1"
    assert rec.calls[SUBMIT] == 2


def test_submit_is_retried_when_no_connection_was_made() -> None:
    rec = Recorder({SUBMIT: [raise_(httpx.ConnectError("refused")), OK_SUBMIT]})
    assert client_for(rec).submit("hpc", FID) == "t1"
    assert rec.calls[SUBMIT] == 2


@pytest.mark.parametrize(
    "failure",
    [
        refuse(502, "mep.internal"),
        refuse(504, "mep.internal"),
        raise_(httpx.ReadTimeout("slow")),
        raise_(httpx.RemoteProtocolError("dropped")),
    ],
)
def test_submit_is_not_repeated_once_the_server_may_have_acted(failure: Any) -> None:
    rec = Recorder({SUBMIT: [failure, OK_SUBMIT]})
    with pytest.raises((RequestRefused, ServiceUnavailable)):
        client_for(rec).submit("hpc", FID)
    assert rec.calls[SUBMIT] == 1


@pytest.mark.parametrize(
    "failure",
    [
        refuse(502, "mep.internal"),
        raise_(httpx.ReadTimeout("slow")),
        raise_(httpx.ConnectError("down")),
    ],
)
def test_safe_calls_are_retried_after_any_transient_failure(failure: Any) -> None:
    done = {"task_id": "t1", "state": "success", "result": b64(pack_value(5))}
    rec = Recorder({"/v1/tasks/t1": [failure, reply(200, done)]})
    assert client_for(rec).get_result("t1") == 5
    assert rec.calls["/v1/tasks/t1"] == 2


def test_retries_stop_after_the_allowed_attempts() -> None:
    rec = Recorder({"/v1/tasks/t1": [raise_(httpx.ConnectError("down"))]})
    with pytest.raises(ServiceUnavailable) as info:
        client_for(rec).get_task("t1")
    assert info.value.reason == "client.unavailable"
    assert rec.calls["/v1/tasks/t1"] == FAST.attempts


def test_retry_after_is_honoured_up_to_a_cap() -> None:
    client = Client(
        "http://mep.test",
        "tok",
        retry=RetryPolicy(max_retry_after=7.0, initial_wait=0.1, max_wait=0.2),
    )
    response = httpx.Response(
        429,
        json={"error": {"reason": "api.too_many_requests", "message": "later"}},
        headers={"Retry-After": "5"},
    )
    from mepcore.client.service import _refusal, _Transient

    def state_after(failure: Exception) -> tenacity.RetryCallState:
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.set_exception((type(failure), failure, None))
        return state

    hinted = _Transient("429", maybe_processed=False, retry_after=_refusal(response).retry_after)
    assert client._wait_before_retry(state_after(hinted)) == 5.0
    huge = _Transient("429", maybe_processed=False, retry_after=3600.0)
    assert client._wait_before_retry(state_after(huge)) == 7.0
    plain = _Transient("down", maybe_processed=False)
    assert 0.0 <= client._wait_before_retry(state_after(plain)) <= 0.2


def test_exhausted_retries_of_a_refusal_raise_the_refusal() -> None:
    rec = Recorder({SUBMIT: [refuse(503, "api.shutting_down", "draining")]})
    with pytest.raises(RequestRefused) as info:
        client_for(rec).submit("hpc", FID)
    assert (info.value.status, info.value.reason) == (503, "api.shutting_down")
    assert rec.calls[SUBMIT] == FAST.attempts


# -- tokens, URLs, TLS ---------------------------------------------------------------


def test_token_comes_from_mep_token_of_the_environment_passed_in() -> None:
    rec = Recorder({"/v1/tasks/t": [reply(200, {"task_id": "t", "state": "running"})]})
    transport = httpx.MockTransport(rec)
    environ = {"MEP_TOKEN": "from-env"}
    Client.from_environment(environ, "http://mep.test", transport=transport).get_task("t")
    assert rec.requests[0].headers["authorization"] == "Bearer from-env"


def test_an_explicit_token_wins_over_the_environment() -> None:
    rec = Recorder({"/v1/tasks/t": [reply(200, {"task_id": "t", "state": "running"})]})
    client = Client.from_environment(
        {"MEP_TOKEN": "from-env"},
        "http://mep.test",
        token="tok",
        transport=httpx.MockTransport(rec),
    )
    client.get_task("t")
    assert rec.requests[0].headers["authorization"] == "Bearer tok"


def test_a_client_built_directly_does_not_look_at_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEP_TOKEN", "from-env")
    rec = Recorder({"/v1/tasks/t": [reply(200, {"task_id": "t", "state": "running"})]})
    client_for(rec, token=None).get_task("t")
    assert "authorization" not in rec.requests[0].headers


def test_from_environment_needs_a_url() -> None:
    with pytest.raises(ClientError):
        Client.from_environment({"MEP_TOKEN": "t0"})
    environ = {"MEP_URL": "https://mep.example.org/", "MEP_TOKEN": "t0"}
    client = Client.from_environment(environ)
    assert (client.url, client.token) == ("https://mep.example.org", "t0")
    assert Client.from_environment({"MEP_TOKEN": " "}, "https://mep.example.org").token is None


def test_the_executor_takes_url_and_token_from_the_environment_it_is_given() -> None:
    environ = {"MEP_URL": "http://mep.test", "MEP_TOKEN": "from-env"}
    ex = Executor("hpc", environ=environ)
    assert (ex.client.url, ex.client.token) == ("http://mep.test", "from-env")
    ex.shutdown()
    ex = Executor("hpc", url="http://other.test", token="tok", environ=environ)
    assert (ex.client.url, ex.client.token) == ("http://other.test", "tok")
    ex.shutdown()
    with pytest.raises(ClientError):
        Executor("hpc", environ={})


def test_the_executor_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scientists' convenience: ``Executor("hpc", url=...)`` finds ``MEP_TOKEN``."""
    monkeypatch.setenv("MEP_TOKEN", "from-env")
    ex = Executor("hpc", url="http://mep.test")
    assert ex.client.token == "from-env"
    ex.shutdown()


def test_tls_verification_is_on_by_default_and_urls_must_be_http() -> None:
    assert Client("https://mep.example.org").verify is True
    with pytest.raises(ClientError):
        Client("file:///etc/passwd")


@pytest.mark.parametrize("bad", ["", "..", "a/b", "x?y"])
def test_ids_cannot_change_the_request_path(bad: str) -> None:
    with pytest.raises(ClientError):
        Client("http://mep.test", "t").get_task(bad)


# -- the future's state machine -----------------------------------------------------


def test_cancel_of_a_sent_task_asks_the_daemon_and_follows_its_answer() -> None:
    asked: list[str] = []
    refused = TaskFuture(lambda task_id: asked.append(task_id) or False)
    refused._begin_send()
    refused._sent("t1")
    assert refused.cancel() is False and not refused.cancelled()

    confirmed = TaskFuture(lambda task_id: asked.append(task_id) or True)
    confirmed._begin_send()
    confirmed._sent("t2")
    assert confirmed.cancel() is True
    done, _ = wait([confirmed], timeout=5)
    assert done == {confirmed} and confirmed.cancelled()
    with pytest.raises(CancelledError):
        confirmed.result()
    # A result arriving afterwards for the cancelled task changes nothing.
    confirmed._settle(_SENT, TaskRecord("t2", "success", pack_value(1)), None)
    assert confirmed.cancelled()
    assert asked == ["t1", "t2"]


def test_a_queued_future_cancels_without_asking_anyone() -> None:
    future = TaskFuture(lambda task_id: pytest.fail("no request for an unsent call"))
    assert future.cancel() and future.cancelled()
    assert not future._begin_send()  # the submitter skips it


def test_a_future_being_sent_cannot_be_cancelled() -> None:
    future = TaskFuture(lambda task_id: True)
    assert future._begin_send()
    assert future.cancel() is False


def test_executor_refuses_submits_after_shutdown_and_needs_one_way_to_connect() -> None:
    ex = Executor("hpc", url="http://mep.test", token="t")
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)
    with pytest.raises(ClientError):
        Executor("hpc", client=Client("http://mep.test", "t"), url="http://other.test")
    with pytest.raises(ClientError):
        Executor("hpc", client=Client("http://mep.test", "t"), environ={})


def test_user_endpoint_config_must_be_json() -> None:
    ex = Executor("hpc", client=Client("http://mep.test", "t"))
    with pytest.raises(ClientError):
        ex.user_endpoint_config = {"when": object()}
    ex.user_endpoint_config = {"b": 1, "a": [1]}
    assert dict(ex.user_endpoint_config) == {"a": [1], "b": 1}
    assert json.loads(ex._config_key) == {"a": [1], "b": 1}
