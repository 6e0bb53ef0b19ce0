"""``Client``: one method per call of mepd's HTTP API, with retries where they are safe.

The client speaks HTTP(S) with ``httpx``: JSON, except that payloads (functions,
arguments) and results travel as mep frames (``mepcore.client.frames``: raw bytes, no
base64) once an answer of the daemon listed ``frames`` in its ``Mep-Features`` header
(until then, and with a daemon without it, JSON; a frames body refused with 415 is sent
again as JSON, the 415 saying the daemon acted on nothing). It authenticates with a bearer token,
verifies TLS certificates by default (``verify=False`` or a CA bundle are explicit
choices), and retries transient failures with ``tenacity``:

- connection failures before a request reached the server, 429 and 503 (the daemon
  refused the request without acting on it; ``Retry-After`` is honoured) are retried for
  every call;
- 502, 504, timeouts and connections dropped mid-request are retried only for calls
  that are safe to repeat (reads, waiting, cancelling, stopping, and registering a
  function, which is content-addressed). ``submit`` is not idempotent — a repeated
  batch would run twice — so it is never retried once the request may have arrived;
- any other 4xx is raised at once as ``RequestRefused`` with the server's reason code
  and message.

The environment is an input here too: ``Client.from_environment(environ)`` takes the
``MEP_URL``/``MEP_TOKEN`` mapping from its caller, and ``Client`` itself never looks at
the process environment. ``Executor`` is the one entry point that defaults to
``os.environ``, for scientists' scripts.

This module deliberately knows nothing of futures or threads: ``Executor`` builds on
it. It imports nothing server-side.
"""

from __future__ import annotations

import base64
import email.utils
import importlib.metadata
import inspect
import math
import platform
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import dill
import httpx
import tenacity

from mepcore.client import frames
from mepcore.client.errors import (
    ClientError,
    RequestRefused,
    ServiceUnavailable,
)
from mepcore.client.records import TaskRecord, WaitReport
from mepcore.client.serialize import pack_args, pack_function
from mepcore.errors import Violation

TOKEN_VARIABLE = "MEP_TOKEN"  # noqa: S105 - the name of a variable, not a secret
URL_VARIABLE = "MEP_URL"

# Statuses the daemon uses to refuse a request it did not act on.
_REFUSED_UNPROCESSED = frozenset({429, 503})
# Statuses a proxy may return after the daemon did receive the request.
_GATEWAY = frozenset({502, 504})


def token_from_environment(environ: Mapping[str, str]) -> str | None:
    """The bearer token in ``environ["MEP_TOKEN"]``, or None when unset or blank.

    ``environ`` is the caller's to pass (usually ``os.environ``: the environment is the
    usual way to hand a script a credential without writing it into code)."""
    value = environ.get(TOKEN_VARIABLE, "").strip()
    return value or None


def url_from_environment(environ: Mapping[str, str]) -> str | None:
    """The daemon's URL in ``environ["MEP_URL"]``, or None when unset or blank."""
    value = environ.get(URL_VARIABLE, "").strip()
    return value or None


def user_runtime() -> dict[str, Any]:
    """What the daemon may want to know of the caller's interpreter (informational;
    templates see it as ``_GC.user_runtime``).

    The fields the Globus Compute SDK sends (``python_version`` is ``sys.version``, as
    there; ``python``, ``platform``), its two version fields only when those SDKs are
    installed here (this client is not them), and mep's own ``mep_client_version`` and
    ``dill_version``."""
    runtime: dict[str, Any] = {
        "python_version": sys.version,
        "python": {
            "version": platform.python_version(),
            "version_description": sys.version,
            "version_tuple": list(sys.version_info[:3]),
            "version_info": list(sys.version_info),
            "implementation": platform.python_implementation(),
            "compiler": platform.python_compiler(),
        },
        "platform": {
            "architecture": list(platform.architecture()),
            "machine": platform.machine(),
            "node": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "release": platform.release(),
        },
        "dill_version": str(getattr(dill, "__version__", "unknown")),
    }
    for field, distribution in (
        ("globus_compute_sdk_version", "globus-compute-sdk"),
        ("globus_sdk_version", "globus-sdk"),
        ("mep_client_version", "mep"),
    ):
        try:
            runtime[field] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return runtime


@attrs.frozen
class RetryPolicy:
    """How transient failures are retried: at most ``attempts`` tries in ``deadline``
    seconds, waiting exponentially from ``initial_wait`` up to ``max_wait`` (with
    jitter), or what the server's ``Retry-After`` asks, up to ``max_retry_after``."""

    attempts: int = 8
    deadline: float = 60.0
    initial_wait: float = 0.1
    max_wait: float = 5.0
    max_retry_after: float = 60.0

    @classmethod
    def never(cls) -> RetryPolicy:
        return cls(attempts=1)


@attrs.frozen
class TaskRequest:
    """One task of a batch: a registered function's id and its packed arguments."""

    function_id: str
    args: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    walltime: float | None = None
    # What an MPI task asks for: num_nodes, ranks_per_node, num_ranks, launcher_options.
    resource_specification: Mapping[str, Any] | None = attrs.field(default=None, hash=False)

    @classmethod
    def pack(
        cls,
        function_id: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        walltime: float | None = None,
    ) -> TaskRequest:
        return cls(function_id, pack_args(tuple(args), dict(kwargs or {})), walltime)

    def to_json(self) -> dict[str, Any]:
        """The task as an item of a JSON submit (base64 ``args``)."""
        return {**self.to_header(), "args": base64.b64encode(self.args).decode("ascii")}

    def to_header(self) -> dict[str, Any]:
        """The task as an item of a frames submit's header (its ``args`` go as a frame)."""
        out: dict[str, Any] = {"function_id": self.function_id}
        if self.walltime is not None:
            out["walltime"] = self.walltime
        if self.resource_specification:
            out["resource_specification"] = dict(self.resource_specification)
        return out


class _Transient(Exception):
    """A failure worth another try; ``maybe_processed`` when the server may have acted."""

    def __init__(
        self,
        detail: str,
        *,
        maybe_processed: bool,
        refused: RequestRefused | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.maybe_processed = maybe_processed
        self.refused = refused
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _log_lines(log: object) -> str:
    """A failed start's endpoint log (its path and last lines), for the message."""
    if not isinstance(log, Mapping) or not isinstance(log.get("path"), str):
        return ""
    tail = [str(line) for line in log.get("tail") or () if isinstance(line, str)]
    return f"; endpoint log {log['path']}, last lines:\n" + "\n".join(tail)


def _refusal(response: httpx.Response) -> RequestRefused:
    """The server's ``{"error": {...}}`` as an exception (or a generic one if absent)."""
    reason, message, violations = "client.unknown_reason", "", []
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        if isinstance(error.get("reason"), str):
            reason = error["reason"]
        if isinstance(error.get("message"), str):
            message = error["message"] + _log_lines(error.get("log"))
        for item in error.get("violations") or ():
            if isinstance(item, Mapping):
                violations.append(
                    Violation(
                        str(item.get("path", "$")),
                        str(item.get("message", "")),
                        str(item.get("code", "invalid")),
                    )
                )
    return RequestRefused(
        response.status_code,
        reason,
        message or response.reason_phrase or f"HTTP {response.status_code}",
        violations=violations,
        retry_after=_retry_after(response),
    )


_FEATURES_HEADER = "mep-features"


# A frames request: its type, and frames asked for in the answer too.
_FRAMES_OUT = {"Content-Type": frames.MEDIA_TYPE, "Accept": frames.ACCEPT}


@attrs.frozen
class _Framed:
    """A frames request body."""

    content: bytes
    headers: Mapping[str, str] = _FRAMES_OUT


@attrs.frozen
class _Accepting:
    """A JSON request body (or none) whose answer may come as frames."""

    body: Any


def _media(response: httpx.Response) -> str:
    given: str = response.headers.get("content-type", "")
    return given.partition(";")[0].strip().lower()


def _base_url(value: object) -> str:
    return str(value).rstrip("/")


def _function_source(fn: Callable[..., Any]) -> str | None:
    """The function's source text, sent for the audit trail when it can be found."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return None


def _stored_login(url: str, environ: Mapping[str, str], options: Mapping[str, Any]) -> Any:
    """The ``mep login`` of ``url`` as an httpx auth flow, or None (never logged in)."""
    from mepcore.client import login  # authlib is loaded only for a stored login

    store = login.TokenStore(login.tokens_path(environ))
    if not store.path.exists():
        return None
    verify = options.get("ca_bundle") or options.get("verify", True)
    found = login.Login.stored(url, store, verify)
    return None if found is None else login.LoginAuth(found)


@attrs.define
class Client:
    """A connection to one mepd service.

    ``url`` is the service's base URL (``https://mep.example.org``). ``token`` is the
    bearer token; None sends no token (the constructor does not look at the process
    environment: ``Client.from_environment(os.environ)`` takes ``MEP_TOKEN`` from it).
    ``verify`` is True (the system's CA store), False (no verification — for tests
    only), or the path of a CA bundle; ``ca_bundle`` is the same as passing a path.
    ``timeout`` bounds each request (a long poll adds its own wait to it). The HTTP
    connection pool is created on first use and released by ``close()``. Safe to use
    from several threads at once.
    """

    url: str = attrs.field(converter=_base_url)
    token: str | None = attrs.field(default=None, repr=False)
    verify: bool | str = attrs.field(default=True, kw_only=True)
    ca_bundle: str | None = attrs.field(default=None, kw_only=True)
    timeout: float = attrs.field(default=30.0, kw_only=True)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy, kw_only=True)
    transport: httpx.BaseTransport | None = attrs.field(default=None, kw_only=True, repr=False)
    # Instead of ``token``: an httpx auth flow, e.g. a stored login (mepcore.client.login).
    auth: httpx.Auth | None = attrs.field(default=None, kw_only=True, repr=False)
    # Payloads and results as mep frames where the daemon takes them (False: JSON only).
    frames: bool = attrs.field(default=True, kw_only=True)
    _http: httpx.Client | None = attrs.field(default=None, init=False, repr=False)
    # What the daemon said of frames: None until an answer tells.
    _frames: bool | None = attrs.field(default=None, init=False, repr=False)
    # A frames body refused with 415: JSON for good, whatever later answers list.
    _frames_refused: bool = attrs.field(default=False, init=False, repr=False)
    _user_runtime: dict[str, Any] | None = attrs.field(default=None, init=False, repr=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ClientError("mep.invalid_input", f"the service URL must be http(s): {self.url}")

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str],
        url: str | None = None,
        *,
        token: str | None = None,
        **options: Any,
    ) -> Client:
        """A client for ``url`` (or ``environ["MEP_URL"]``) with ``token`` (or
        ``environ["MEP_TOKEN"]``). The caller passes the environment, usually
        ``Client.from_environment(os.environ)``; ``options`` go to the constructor."""
        found = url or url_from_environment(environ)
        if not found:
            raise ClientError("mep.invalid_input", f"no service URL given and {URL_VARIABLE} unset")
        token = token if token is not None else token_from_environment(environ)
        if token is None and "auth" not in options:
            options["auth"] = _stored_login(found, environ, options)
        return cls(found, token, **options)

    # -- connection ----------------------------------------------------------------

    def _connection(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                verify: bool | ssl.SSLContext = bool(self.verify)
                bundle = self.ca_bundle or (self.verify if isinstance(self.verify, str) else None)
                if bundle:
                    verify = ssl.create_default_context(cafile=bundle)
                headers = {"User-Agent": "mep-client/0.1"}
                if self.token:
                    headers["Authorization"] = f"Bearer {self.token}"
                self._http = httpx.Client(
                    base_url=self.url,
                    headers=headers,
                    auth=self.auth,
                    verify=verify,
                    timeout=self.timeout,
                    transport=self.transport,
                    limits=httpx.Limits(
                        max_connections=16,
                        max_keepalive_connections=8,
                        # Below any server's keep-alive timeout (uvicorn's default is
                        # 5 s): a reused idle connection must not be one being closed.
                        keepalive_expiry=2.0,
                    ),
                )
            return self._http

    def _runtime(self) -> dict[str, Any]:
        # Computed once per client: it reads package metadata, too slow for every submit.
        if self._user_runtime is None:
            self._user_runtime = user_runtime()
        return self._user_runtime

    def close(self) -> None:
        """Release the connection pool; the client can be used again afterwards."""
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request, with retries -------------------------------------------------

    def _send_once(
        self, method: str, path: str, body: Any, timeout: float | None
    ) -> httpx.Response:
        http = self._connection()
        options: dict[str, Any] = {"json": body}
        if isinstance(body, _Framed):
            options = {"content": body.content, "headers": body.headers}
        elif isinstance(body, _Accepting):
            options = {"json": body.body}
            if self.frames:
                options["headers"] = {"Accept": frames.ACCEPT}
        try:
            response = http.request(
                method,
                path,
                timeout=self.timeout if timeout is None else timeout,
                **options,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # No connection was made: the server cannot have seen the request.
            raise _Transient(f"{type(exc).__name__}: {exc}", maybe_processed=False) from exc
        except httpx.TransportError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}", maybe_processed=True) from exc
        self._note_features(response)
        status = response.status_code
        if status in _REFUSED_UNPROCESSED or status in _GATEWAY:
            refused = _refusal(response)
            raise _Transient(
                str(refused),
                maybe_processed=status in _GATEWAY,
                refused=refused,
                retry_after=refused.retry_after,
            )
        if status >= 400:
            raise _refusal(response)
        return response

    def _wait_before_retry(self, state: tenacity.RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        hinted = getattr(failure, "retry_after", None)
        if hinted is not None:
            return float(min(hinted, self.retry.max_retry_after))
        # "Full jitter": a random wait up to the exponential bound, so many clients
        # that failed together do not come back together.
        backoff = tenacity.wait_random_exponential(
            multiplier=self.retry.initial_wait, max=self.retry.max_wait
        )
        return float(backoff(state))

    def _note_features(self, response: httpx.Response) -> None:
        # Every answer of a daemon's handlers lists its features; one without the header
        # is an older daemon (or a proxy's own answer, which says nothing either way).
        features = response.headers.get(_FEATURES_HEADER)
        if features is not None:
            self._frames = "frames" in (f.strip() for f in features.split(","))
        elif response.headers.get("x-request-id") is not None:
            self._frames = False

    @property
    def sends_frames(self) -> bool:
        """Whether payloads go as frames: once an answer of the daemon listed them. The
        first payload goes as JSON, which every mepd (and a stand-in for one) reads."""
        return self.frames and self._frames is True and not self._frames_refused

    def _exchange(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        idempotent: bool,
        timeout: float | None = None,
    ) -> httpx.Response:
        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, _Transient) and (idempotent or not exc.maybe_processed)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(retryable),
            stop=(
                tenacity.stop_after_attempt(self.retry.attempts)
                | tenacity.stop_after_delay(self.retry.deadline)
            ),
            wait=self._wait_before_retry,
            reraise=True,
        )
        try:
            return retrying(self._send_once, method, path, body, timeout)
        except _Transient as exc:
            if exc.refused is not None:
                raise exc.refused from exc
            raise ServiceUnavailable(
                "client.unavailable", f"{method} {path}: {exc}"
            ) from exc.__cause__

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        idempotent: bool,
        timeout: float | None = None,
    ) -> Any:
        """Send one API request and return its JSON body, retrying transient failures
        (every one if ``idempotent``, otherwise only those the server did not act on)."""
        return self.request_framed(method, path, body, idempotent=idempotent, timeout=timeout)[0]

    def request_framed(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        idempotent: bool,
        timeout: float | None = None,
    ) -> tuple[Any, list[bytes] | None]:
        """``request``, also for a frames answer: its JSON header and its frames (None
        for a JSON answer)."""
        response = self._exchange(method, path, body, idempotent=idempotent, timeout=timeout)
        if _media(response) == frames.MEDIA_TYPE:
            return frames.decode(response.content)
        try:
            return response.json(), None
        except ValueError as exc:
            raise ClientError(
                "client.protocol_error", f"{method} {path}: the answer is not JSON"
            ) from exc

    def _send_payload(
        self,
        path: str,
        header: dict[str, Any],
        payloads: Sequence[bytes],
        as_json: Callable[[], Any],
        *,
        idempotent: bool,
        timeout: float | None = None,
    ) -> tuple[Any, list[bytes] | None]:
        """POST a body carrying payloads: frames to a daemon that takes them (a 415 from
        an older daemon, which acted on nothing, switches to JSON for good), else JSON.
        The answer as ``request_framed`` returns it."""
        if self.sends_frames:
            framed = _Framed(frames.encode(header, payloads), _FRAMES_OUT)
            try:
                return self.request_framed(
                    "POST", path, framed, idempotent=idempotent, timeout=timeout
                )
            except RequestRefused as exc:
                if exc.status != 415:
                    raise
                self._frames_refused = True
        body = _Accepting(as_json())
        return self.request_framed("POST", path, body, idempotent=idempotent, timeout=timeout)

    # -- the API -------------------------------------------------------------------

    def register_payload(
        self, payload: bytes, *, name: str | None = None, source: str | None = None
    ) -> str:
        """Register an already packed function; returns the id the daemon gave it."""
        header: dict[str, Any] = {}
        if name:
            header["name"] = name
        if source:
            header["source"] = source
        answer, _ = self._send_payload(
            "/v1/functions",
            header,
            [payload],
            lambda: {"function": base64.b64encode(payload).decode("ascii"), **header},
            idempotent=True,
        )
        function_id = answer.get("function_id") if isinstance(answer, Mapping) else None
        if not isinstance(function_id, str):
            raise ClientError("client.protocol_error", "register: no function_id in the answer")
        return function_id

    def register_function(self, fn: Callable[..., Any], *, name: str | None = None) -> str:
        """Serialize ``fn`` with dill and register it; returns its id (the sha256 of the
        serialized bytes; registering the same function again returns the same id)."""
        _, payload = pack_function(fn)
        label = name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        return self.register_payload(payload, name=label, source=_function_source(fn))

    def submit_batch(
        self,
        endpoint: str,
        tasks: Sequence[TaskRequest],
        *,
        user_endpoint_config: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Submit several tasks in one request; returns their task ids in order.

        Not retried once the request may have reached the daemon (see the module
        docstring): a ``ServiceUnavailable`` from here means the batch may or may not
        have been accepted.
        """
        if not tasks:
            return []
        return self._submit(endpoint, tasks, user_endpoint_config, None)[0]

    def submit_and_wait(
        self,
        endpoint: str,
        tasks: Sequence[TaskRequest],
        *,
        wait: float,
        user_endpoint_config: Mapping[str, Any] | None = None,
    ) -> tuple[list[str], WaitReport]:
        """Submit, and have the same request wait up to ``wait`` seconds for the first
        results (``?wait``): the task ids, and the report of those final by then (as
        ``wait_report``). A daemon without ``?wait`` reports every task pending. Not
        retried once the request may have arrived, like ``submit_batch``."""
        if not tasks:
            return [], WaitReport(())
        return self._submit(endpoint, tasks, user_endpoint_config, wait)

    def _submit(
        self,
        endpoint: str,
        tasks: Sequence[TaskRequest],
        user_endpoint_config: Mapping[str, Any] | None,
        wait: float | None,
    ) -> tuple[list[str], WaitReport]:
        header = {
            "user_endpoint_config": dict(user_endpoint_config or {}),
            "user_runtime": self._runtime(),
            "tasks": [task.to_header() for task in tasks],
        }
        path = f"/v1/endpoints/{_segment(endpoint)}/submit"
        if wait is not None:
            path += f"?wait={max(0.0, float(wait)):g}"
        answer, parts = self._send_payload(
            path,
            header,
            [task.args for task in tasks],
            lambda: {**header, "tasks": [task.to_json() for task in tasks]},
            idempotent=False,
            timeout=None if wait is None else self.timeout + wait,
        )
        ids = answer.get("task_ids") if isinstance(answer, Mapping) else None
        if (
            not isinstance(ids, list)
            or len(ids) != len(tasks)
            or not all(isinstance(i, str) for i in ids)
        ):
            raise ClientError("client.protocol_error", "submit: the answer lacks the task ids")
        if wait is None or "tasks" not in answer:
            return list(ids), WaitReport((), pending=tuple(ids))
        return list(ids), WaitReport.from_mapping(answer, parts)

    def submit(
        self,
        endpoint: str,
        function_id: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        user_endpoint_config: Mapping[str, Any] | None = None,
        walltime: float | None = None,
    ) -> str:
        """Submit one call of a registered function; returns the task id."""
        task = TaskRequest.pack(function_id, args, kwargs, walltime=walltime)
        return self.submit_batch(endpoint, [task], user_endpoint_config=user_endpoint_config)[0]

    def get_task(self, task_id: str) -> TaskRecord:
        """The task's current record (state, and its result or error once final)."""
        answer, parts = self.request_framed(
            "GET", f"/v1/tasks/{_segment(task_id)}", _Accepting(None), idempotent=True
        )
        return TaskRecord.from_mapping(answer, parts)

    def wait_report(self, task_ids: Iterable[str], timeout: float = 10.0) -> WaitReport:
        """Long-poll ``POST /v1/tasks/wait``: returns as soon as at least one of
        ``task_ids`` is final (or after ``timeout`` seconds) with the final ones, the
        pending ones and the ones the daemon does not know."""
        ids = list(task_ids)
        if not ids:
            return WaitReport(())
        answer, parts = self.request_framed(
            "POST",
            "/v1/tasks/wait",
            _Accepting({"task_ids": ids, "timeout": timeout}),
            idempotent=True,
            timeout=self.timeout + timeout,
        )
        return WaitReport.from_mapping(answer, parts)

    def wait(self, task_ids: Iterable[str], timeout: float = 10.0) -> list[TaskRecord]:
        """The records of those of ``task_ids`` that are final, as soon as at least one
        is, or an empty list after ``timeout`` seconds (see ``wait_report``)."""
        return list(self.wait_report(task_ids, timeout).tasks)

    def get_result(self, task_id: str, timeout: float | None = None) -> Any:
        """The task's value, waiting for it up to ``timeout`` seconds (None: no limit).

        Raises ``RemoteException`` if the function raised, ``TaskInfrastructureError``
        if the task failed for another reason, ``TimeoutError`` if it is not done in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        record = self.get_task(task_id)
        while not record.done:
            left = 10.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"task {task_id} is not finished ({record.state})")
            found = self.wait([task_id], timeout=min(10.0, left))
            if found:
                record = found[0]
        return record.outcome()

    def cancel(self, task_id: str) -> bool:
        """Cancel a task wherever it is (queued, or running: its worker is stopped);
        True if it is now cancelled, False if it had finished first."""
        try:
            answer = self.request("DELETE", f"/v1/tasks/{_segment(task_id)}", idempotent=True)
        except RequestRefused as exc:
            if exc.status == 409:
                return False
            raise
        state = answer.get("state", answer.get("status")) if isinstance(answer, Mapping) else None
        return state in (None, "cancelled")

    def status(self, endpoint: str) -> Any:
        """The caller's user endpoints on ``endpoint`` (config key, state, pid, started,
        idle since), as the daemon's JSON."""
        return self.request("GET", f"/v1/endpoints/{_segment(endpoint)}/status", idempotent=True)

    def log(self, endpoint: str, lines: int = 200) -> Any:
        """The last ``lines`` lines of the caller's own endpoint log on ``endpoint``
        (``path``, ``exists``, ``lines``), as the daemon read it for the caller's account."""
        return self.request(
            "GET", f"/v1/endpoints/{_segment(endpoint)}/log?lines={int(lines)}", idempotent=True
        )

    def stop(self, endpoint: str) -> Any:
        """Stop the caller's user endpoints on ``endpoint``; the daemon's JSON answer."""
        return self.request("POST", f"/v1/endpoints/{_segment(endpoint)}/stop", {}, idempotent=True)


def _segment(value: str) -> str:
    """A path segment, refused if it could change the path (ids and names never do)."""
    if not value or "/" in value or value in (".", "..") or "?" in value or "#" in value:
        raise ClientError("mep.invalid_input", f"not a valid name or id: {value[:80]!r}")
    return value
