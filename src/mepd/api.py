"""The HTTP API (Starlette): routes, body limits, error format, the OpenAPI document.

Thin: each handler reads a bounded JSON body, authenticates, calls the pipeline and
renders its answer. Errors are ``{"error": {"reason", "message"}}`` (plus
``violations`` for a caller's own invalid input) with an honest status code. The
message is always the fixed one of the reason code (``REASONS``), never the text of an
exception (a template's ``'x' is undefined`` stays in the admin log), and violations
are shown only for the caller's own input (``_CALLER_INPUT``). A body over the limit
is refused with 413 from its ``Content-Length`` or, without one, as soon as the
streamed bytes exceed the limit — it is never read whole. Bodies are strict JSON: the
type must be ``application/json`` (else 415), UTF-8 without a byte-order mark, no
duplicate keys, no ``NaN``, bounded nesting, and the route's schema (else 400); a body
that does not arrive by its deadline is 408 (the deadline starts when the headers are
in: ``mepd.edge``). Every answer — errors of the routing layer (404, 405 with
``Allow``, 500) included — carries ``X-Request-ID``: the client's own when it is
plain (``[A-Za-z0-9._:-]{1,128}``), else a fresh one. An authenticated caller over
its rate (``mepd.ratelimit``) gets 429 with ``Retry-After``.

The OpenAPI 3.1 document is built here from the same request schemas the pipeline
validates with (``openapi_document()``); ``docs/openapi.json`` is a copy a test keeps
current (regenerate with ``python -m mepd.api > docs/openapi.json``).

Deliberately not here: authentication, authorization and everything about tasks (the
pipeline does those), and the request schemas themselves (``mepd.shapes``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import structlog
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mepcore.errors import ADMIN_ONLY_REASONS, REASONS, MepError, Violation
from mepd import __version__, frames
from mepd.auth import Caller
from mepd.logs import Throttled, request_scope
from mepd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mepd.metrics import Metrics
from mepd.pipeline import Pipeline
from mepd.ratelimit import Gate, RateLimiter
from mepd.settings import EdgeSettings, Limits
from mepd.shapes import (
    FUNCTION_SCHEMA,
    STOP_SCHEMA,
    SUBMIT_SCHEMA,
    WAIT_SCHEMA,
    RequestError,
    check_shape,
)

log = structlog.get_logger("mepd.api")

_EXACT_STATUS = {
    "auth.issuer_unavailable": 503,
    "identity.mapper_failed": 503,
    "identity.mapper_timeout": 503,
    "identity.mapper_output_invalid": 503,
    "identity.mapper_output_too_large": 503,
    "identity.mapping_invalid": 500,
    "identity.input_invalid": 400,
    "authz.policy_invalid": 500,
    "authz.model_invalid": 500,
    "authz.request_invalid": 500,
    "config.template_invalid": 500,
    "config.schema_invalid": 500,
    "config.environment_invalid": 500,
    "config.variables_too_large": 413,
    "spawn.too_many_endpoints": 429,
    "spawn.too_many_starts": 429,
    "spawn.interpreter_unreadable": 500,
    "spawn.settings_invalid": 500,
    "task.not_found": 404,
    "task.function_unknown": 422,
    "task.function_not_allowed": 403,
    "task.resources_not_allowed": 403,
    "task.payload_too_large": 413,
    "api.bad_request": 400,
    "api.not_found": 404,
    "api.endpoint_unknown": 404,
    "api.body_too_large": 413,
    "api.too_many_requests": 429,
    "api.unavailable": 503,
    "api.shutting_down": 503,
    "api.method_not_allowed": 405,
    "api.unsupported_media_type": 415,
    "api.request_timeout": 408,
    "api.rate_limited": 429,
    "api.too_many_connections": 503,
    "audit.unavailable": 503,
    "store.unavailable": 503,
    "store.invalid": 500,
    "settings.invalid": 500,
    "mep.internal": 500,
}
_AREA_STATUS = {
    "auth": 401,
    "identity": 403,
    "authz": 403,
    "config": 422,
    "spawn": 503,
    "channel": 503,
    "task": 400,
}
RETRY_AFTER_SECONDS = {
    "api.too_many_requests": 5,
    "spawn.too_many_starts": 2,
    "spawn.too_many_endpoints": 30,
    "api.shutting_down": 10,
    "audit.unavailable": 30,
    "store.unavailable": 5,
    "auth.issuer_unavailable": 5,
    "api.too_many_connections": 1,
}
# Reasons about the caller's own input: their violations are shown to them. Any other
# error's violations (a template's line and message, a site file's) stay in the admin log.
_CALLER_INPUT = frozenset(
    {
        "api.bad_request",
        "mep.invalid_input",
        "config.invalid_variables",
        "config.reserved_variable",
        "config.variables_too_large",
        "task.resources_invalid",
        "task.resources_not_allowed",
    }
)


def status_for(reason: str) -> int:
    if reason in _EXACT_STATUS:
        return _EXACT_STATUS[reason]
    return _AREA_STATUS.get(reason.partition(".")[0], 500)


def public_error(error: MepError) -> dict[str, Any]:
    """What a caller sees of ``error``: its public code, that code's fixed message, and
    the violations only of their own input."""
    body: dict[str, Any] = {"reason": error.reason, "message": REASONS[error.reason]}
    if error.reason in _CALLER_INPUT and error.expose_violations and error.violations:
        body["violations"] = [v.to_dict() for v in error.violations]
    if isinstance(error.context.get("log"), Mapping):
        # A failed start of the caller's own user endpoint: where its log is, and the
        # last lines it wrote there (as the caller's account, about itself).
        body["log"] = dict(error.context["log"])
    return body


# Starlette's JSONResponse builds a new encoder (``json.dumps`` with options) for every
# answer; ``_JSONAnswer`` renders the same bytes with one made once.
_ANSWER_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class _JSONAnswer(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _ANSWER_ENCODER.encode(content).encode("utf-8")


def error_response(error: MepError) -> JSONResponse:
    status = status_for(error.reason)
    headers = {}
    retry_after = error.context.get("retry_after", RETRY_AFTER_SECONDS.get(error.reason))
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="mepd"'
    if status == 408:
        headers["Connection"] = "close"  # the rest of the body is not worth waiting for
    return _JSONAnswer({"error": public_error(error)}, status_code=status, headers=headers)


def json_depth_ok(value: Any, limit: int) -> bool:
    """True if ``value`` nests no deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return True


# Set by mepd.edge's protocol when a request's headers are in (event-loop time): the body
# must be complete by then. Without it (in-process tests) the deadline starts at reading.
BODY_DEADLINE = "mep.body_deadline"
REQUEST_ID = "mep.request_id"
# Set on a request refused by the rate limit (its Retry-After): mepd.edge then pauses
# reading that connection for as long, so a flood that ignores Retry-After costs little.
RETRY_LATER = "mep.retry_later"
# The rate-limit gate's digest of the request's Authorization value (``RequestGate``).
GATE_KEY = "mep.gate_key"


def _json_type(request: Request) -> bool:
    # No Content-Type at all is read as JSON (some clients send none); any other type —
    # text/plain, a form, JSON in another charset — is refused with 415.
    given = request.headers.get("content-type")
    if given is None:
        return True
    media, _, params = given.partition(";")
    if media.strip().lower() != "application/json":
        return False
    charset = params.strip().lower()
    return charset in ("", "charset=utf-8", 'charset="utf-8"')


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise RequestError("api.bad_request", "duplicate key in the JSON body")
    return out


def _no_constants(name: str) -> Any:
    raise RequestError("api.bad_request", f"{name} is not JSON")


# One strict decoder (``json.loads`` with options would build a new one per body).
_BODY_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def parse_json(raw: bytes, limits: Limits) -> Any:
    """Strict JSON: UTF-8 without a byte-order mark, no duplicate keys, no NaN/Infinity,
    nesting bounded."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise RequestError("api.bad_request", "body starts with a byte-order mark")
    try:
        text = raw.decode("utf-8")
        data = _BODY_DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError("api.bad_request", "body is not JSON") from exc
    if not json_depth_ok(data, limits.max_json_depth):
        raise RequestError("api.bad_request", "JSON nested too deeply")
    return data


async def _read_body(request: Request, limits: Limits, deadline: float) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limits.max_body_bytes:
                    raise RequestError("api.body_too_large", "streamed body over the limit")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise RequestError("api.request_timeout", f"body incomplete after {total} bytes") from exc
    return b"".join(chunks)


# A body (or an answer's payload bytes) above this is parsed or rendered in a worker
# thread: a megabyte of JSON or base64 must not hold up the event loop, while a small
# request stays cheaper inline than a thread hop.
OFF_LOOP_BYTES = 128 * 1024


def _declared_size(request: Request, limits: Limits) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError as exc:
        raise RequestError("api.bad_request", "bad Content-Length") from exc
    if size > limits.max_body_bytes:
        raise RequestError("api.body_too_large", f"declared {size} bytes")
    return size


def _is_frames(request: Request, frames_ok: bool) -> bool:
    return frames_ok and frames.media_type_of(request.headers.get("content-type")) == (
        frames.MEDIA_TYPE
    )


async def read_body(
    request: Request,
    limits: Limits,
    *,
    optional: bool = False,
    body_timeout: float = 60.0,
    frames_ok: bool = False,
) -> tuple[Any, list[bytes] | None]:
    """The parsed JSON body (or the JSON header of a frames body, where the route takes
    frames: ``frames_ok``) and the frames (None for a JSON body)."""
    size = _declared_size(request, limits)
    framed = _is_frames(request, frames_ok)
    if size is not None and size > 0 and not framed and not _json_type(request):
        raise RequestError("api.unsupported_media_type", "body is not application/json")
    deadline = request.scope.get(BODY_DEADLINE)
    if deadline is None:
        deadline = asyncio.get_running_loop().time() + body_timeout
    raw = await _read_body(request, limits, deadline)
    if not raw:
        if optional:
            return {}, None
        raise RequestError("api.bad_request", "empty body")
    if framed:
        header, parts = frames.decode(raw)
        return parse_json(header, limits), parts
    if not _json_type(request):
        raise RequestError("api.unsupported_media_type", "body is not application/json")
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, raw, limits), None
    return parse_json(raw, limits), None


async def read_json(
    request: Request, limits: Limits, *, optional: bool = False, body_timeout: float = 60.0
) -> Any:
    body, _ = await read_body(request, limits, optional=optional, body_timeout=body_timeout)
    return body


def _inline_results(views: list[dict[str, Any]], parts: list[bytes]) -> None:
    """Task views for JSON: each ``result_frame`` becomes a base64 ``result``."""
    for view in views:
        index = view.pop("result_frame", None)
        if index is not None:
            view["result"] = base64.b64encode(parts[index]).decode("ascii")


_FRAMES_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _render_answer(
    answer: dict[str, Any], views: list[dict[str, Any]], parts: list[bytes], binary: bool
) -> Response:
    if binary:
        header = _FRAMES_HEADER_ENCODER.encode(answer).encode()
        return Response(frames.encode(header, parts), media_type=frames.MEDIA_TYPE)
    _inline_results(views, parts)
    return _JSONAnswer(answer)


async def task_answer(
    request: Request, answer: dict[str, Any], views: list[dict[str, Any]], parts: list[bytes]
) -> Response:
    """An answer holding task views: a frames body when the caller's ``Accept`` lists
    frames, else JSON with base64 results; rendered off the loop when large."""
    binary = frames.accepts_frames(request.headers.get("accept"))
    # Frames cost one copy of the bytes, less than a thread hop; base64 and JSON of
    # megabytes go to a worker thread.
    if not binary and sum(len(p) for p in parts) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(_render_answer, answer, views, parts, binary)
    return _render_answer(answer, views, parts, binary)


# Every answer of a handler says which optional features this daemon has: a client
# sends frames bodies only to a daemon that lists ``frames``.
FEATURES_HEADER = "Mep-Features"
FEATURES = "frames"


Handler = Callable[[Request], Awaitable[Response]]


def create_app(
    pipeline: Pipeline,
    limits: Limits,
    edge: EdgeSettings | None = None,
    **starlette_options: Any,
) -> Starlette:
    """The ASGI application serving ``pipeline``; ``edge`` sets the per-identity rate
    limit and the body deadline (the defaults of ``EdgeSettings`` without it)."""
    edge = edge or EdgeSettings()
    limiter = RateLimiter(edge.rate, edge.burst)
    handlers = _Handlers(pipeline, limits, edge.body_timeout, limiter, Gate(limiter))
    gate = Middleware(
        RequestGate, gate=handlers.gate, metrics=pipeline.metrics, limited=handlers.limited
    )
    return Starlette(
        routes=handlers.routes(),
        middleware=[gate],
        exception_handlers={
            404: _not_found,
            405: _method_not_allowed,
            Exception: _crashed,
        },
        **starlette_options,
    )


# A request id a client (or a proxy in front) sends is kept when it is this plain.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` if it is one plain value, else a fresh one (an
    over-long, repeated or odd value is replaced, never echoed into logs or answers)."""
    given = [v for k, v in headers if k.lower() == b"x-request-id"]
    if len(given) == 1:
        text = given[0].decode("latin-1")
        if _REQUEST_ID.fullmatch(text):
            return text
    return os.urandom(16).hex()


class RequestGate:
    """The one ASGI layer in front of the routes (one layer: each costs every request a
    coroutine and a wrapped ``send``).

    - Gives every HTTP request an id (``scope["mep.request_id"]``), sets
      ``X-Request-ID`` on every answer, whoever makes it, and opens the request's scope
      for the admin and audit logs (``mepd.logs.request_scope``).
    - Refuses at once — before routing, before the token is parsed or verified — a
      request whose bearer token was verified before for an owner with no request left
      (``mepd.ratelimit.Gate``), so a flood's refusals cost little. Everything else goes
      on to the handlers, which verify, count and refuse as usual."""

    def __init__(self, app: ASGIApp, gate: Gate, metrics: Metrics, limited: Throttled) -> None:
        self.app, self.gate, self.metrics, self.limited = app, gate, metrics, limited
        self.body = json.dumps({"error": public_error(MepError("api.rate_limited"))}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope.get("headers", []))
        scope[REQUEST_ID] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        with request_scope(request_id):
            refusal = self._refusal(scope)
            if refusal is not None:
                scope[RETRY_LATER] = RateLimiter.retry_after(refusal[1])
                await self._refuse(send_with_id, *refusal)
                return
            await self.app(scope, receive, send_with_id)

    def _refusal(self, scope: Scope) -> tuple[str, float] | None:
        if scope["path"].startswith("/v1/"):
            for name, value in scope["headers"]:
                if name == b"authorization":
                    # Kept for ``_Handlers._caller``, which remembers this token's owner.
                    key = scope[GATE_KEY] = Gate.key(value)
                    return self.gate.refusal(value, key)
        return None

    async def _refuse(self, send: Send, owner: str, wait: float) -> None:
        self.metrics.requests.inc(route="rate_limited", status="429")
        self.limited.note(owner=owner, route="rate_limited")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            (b"retry-after", str(RateLimiter.retry_after(wait)).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def _request_id(request: Request) -> str:
    return str(request.scope.get(REQUEST_ID) or request_id_of(request.scope["headers"]))


def _log_path(scope: Scope) -> str:
    """The request's path as ``request.url.path`` gives it (``?``, ``#`` and ``\\``
    escaped), without building the whole URL for the access log line."""
    return str(scope["path"]).replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")


def _caller_fields(request: Request) -> dict[str, Any]:
    """Who the request was from, once authenticated (``_Handlers._caller`` keeps it)."""
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:
        return {"owner": None}
    primary = caller.identities.primary
    return {
        "owner": caller.owner,
        "identity": primary.id,
        "username": primary.username,
        "issuer": caller.issuer,
    }


def _instrumented(name: str, fn: Callable[[Request], Awaitable[Any]], metrics: Metrics) -> Handler:
    """``fn`` as a Starlette handler: its answer (or error) rendered, logged and counted.

    A value that is not already a ``Response`` becomes a 200 JSON answer. Every line
    logged while it runs carries its ``request_id`` (also the ``X-Request-ID`` answer
    header, opened by ``RequestGate``); it ends with one access log line
    (``api.request_completed``) — except a request refused by the rate limit: a flood
    must not become a flood of log lines (``_Handlers._caller`` logs those, throttled;
    the metrics count every one)."""

    async def handler(request: Request) -> Response:
        started = time.perf_counter()
        quiet = False
        try:
            result = await fn(request)
            response = result if isinstance(result, Response) else _JSONAnswer(result)
        except MepError as exc:
            quiet = exc.reason == "api.rate_limited"
            if not quiet:
                _log_refusal(name, exc, request)
            response = error_response(exc)
        except Exception:
            log.exception("api.request_crashed", route=name, **_caller_fields(request))
            response = error_response(MepError("mep.internal"))
        elapsed = time.perf_counter() - started
        # X-Request-ID is set on the way out by ``RequestGate``.
        response.headers[FEATURES_HEADER] = FEATURES
        metrics.requests.inc(route=name, status=str(response.status_code))
        metrics.latency.observe(elapsed, route=name)
        if not quiet and log.is_enabled_for(logging.INFO):  # its fields cost when filtered
            log.info(
                "api.request_completed",
                method=request.method,
                route=name,
                path=_log_path(request.scope),
                status=response.status_code,
                duration_ms=round(elapsed * 1000, 3),
                client=request.client.host if request.client else None,
                **_caller_fields(request),
            )
        return response

    return handler


def _log_refusal(route: str, exc: MepError, request: Request) -> None:
    # A 5xx is the daemon's fault and worth an error; a 4xx is the caller's and is not.
    # The admin log gets the specific code (``admin_reason``), the caller the public one,
    # and who the caller was (identity and issuer; none when authentication failed).
    fields = {"route": route, "reason": exc.admin_reason, "detail": exc.detail}
    if status_for(exc.reason) >= 500:
        log.error("api.request_failed", **fields, **_caller_fields(request))
    else:
        log.info("api.request_refused", **fields, **_caller_fields(request))


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(MepError("api.not_found"))


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    # Every method any route of this path takes (one route per method here, so the
    # route Starlette happened to try first does not know them all).
    allowed: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "\x00"})
        if match is Match.PARTIAL and isinstance(route, Route) and route.methods:
            allowed |= route.methods
    response = error_response(MepError("api.method_not_allowed", f"{request.method}"))
    response.headers["Allow"] = ", ".join(sorted(allowed))
    return response


async def _crashed(request: Request, exc: Exception) -> Response:
    # Outside the handlers (they catch their own): still a JSON answer with its id.
    log.error("api.request_crashed", path=request.url.path, exc_info=exc)
    response = error_response(MepError("mep.internal"))
    response.headers["X-Request-ID"] = _request_id(request)
    return response


@attrs.frozen
class _Handlers:
    """One handler per route: authenticate, read the bounded body, call the pipeline."""

    pipeline: Pipeline
    limits: Limits
    body_timeout: float
    limiter: RateLimiter
    gate: Gate
    limited: Throttled = attrs.field(factory=lambda: Throttled("api.rate_limited", log))

    def routes(self) -> list[Route]:
        # Order matters: ``/v1/tasks/wait`` must be tried before ``/v1/tasks/{task_id}``.
        table: list[tuple[str, str, str, Callable[[Request], Awaitable[Any]]]] = [
            ("/v1/functions", "POST", "functions", self.functions),
            ("/v1/endpoints/{endpoint}/submit", "POST", "submit", self.submit),
            ("/v1/endpoints/{endpoint}/status", "GET", "status", self.status),
            ("/v1/endpoints/{endpoint}/introspect", "GET", "introspect", self.introspect),
            ("/v1/endpoints/{endpoint}/stop", "POST", "stop", self.stop),
            ("/v1/endpoints/{endpoint}/log", "GET", "log", self.read_log),
            ("/v1/tasks/wait", "POST", "wait", self.wait),
            ("/v1/tasks/{task_id}", "GET", "task", self.get_task),
            ("/v1/tasks/{task_id}", "DELETE", "cancel", self.cancel_task),
            ("/v1/openapi.json", "GET", "openapi", self.openapi),
            ("/v1/auth", "GET", "auth", self.auth_metadata),
            ("/healthz", "GET", "healthz", self.healthz),
            ("/metrics", "GET", "metrics", self.metrics_text),
        ]
        metrics = self.pipeline.metrics
        return [
            Route(path, _instrumented(name, fn, metrics), methods=[method])
            for path, method, name, fn in table
        ]

    async def _caller(self, request: Request, route: str) -> Caller:
        caller = await self.pipeline.authenticate(request.headers.get("authorization"), route=route)
        request.state.caller = caller  # for the access and refusal log lines
        key = request.scope.get(GATE_KEY)
        self.gate.remember(request.headers.get("authorization") or "", caller.owner, key)
        wait = self.limiter.take(caller.owner)
        if wait > 0.0:
            self.limited.note(owner=caller.owner, route=route)
            retry_after = RateLimiter.retry_after(wait)
            request.scope[RETRY_LATER] = retry_after
            raise MepError(
                "api.rate_limited",
                f"over {self.limiter.rate}/s (burst {self.limiter.burst})",
                context={"retry_after": retry_after},
            )
        return caller

    async def _body(self, request: Request, *, optional: bool = False) -> Any:
        return await read_json(
            request, self.limits, optional=optional, body_timeout=self.body_timeout
        )

    async def _payload_body(self, request: Request) -> tuple[Any, list[bytes] | None]:
        return await read_body(request, self.limits, body_timeout=self.body_timeout, frames_ok=True)

    async def functions(self, request: Request) -> Any:
        caller = await self._caller(request, "functions")
        body, parts = await self._payload_body(request)
        return await self.pipeline.register_function(caller, body, parts)

    async def submit(self, request: Request) -> Any:
        caller = await self._caller(request, "submit")
        wait = self._wait_seconds(request.query_params.get("wait"))
        body, parts = await self._payload_body(request)
        answer = await self.pipeline.submit(caller, request.path_params["endpoint"], body, parts)
        if wait is None:
            return answer
        # Submit and wait: the tasks that finish within ``wait`` come back in this answer
        # (as from ``POST /v1/tasks/wait``), so a short call is one request.
        results: list[bytes] = []
        found = await self.pipeline.delivery.wait(caller, answer["task_ids"], wait, results)
        answer.update(found.to_dict())
        return await task_answer(request, answer, answer["tasks"], results)

    def _wait_seconds(self, given: str | None) -> float | None:
        if given is None:
            return None
        try:
            seconds = float(given)
        except ValueError:
            seconds = -1.0
        if not 0.0 <= seconds <= self.limits.max_wait_timeout:
            raise RequestError(
                "api.bad_request",
                "bad wait",
                violations=[
                    Violation(
                        "?wait", f"seconds from 0 to {self.limits.max_wait_timeout:g} expected"
                    )
                ],
            )
        return seconds

    async def get_task(self, request: Request) -> Any:
        caller = await self._caller(request, "task")
        parts: list[bytes] = []
        view = self.pipeline.get_task(caller, request.path_params["task_id"], parts)
        return await task_answer(request, view, [view], parts)

    async def cancel_task(self, request: Request) -> Any:
        caller = await self._caller(request, "cancel")
        return self.pipeline.cancel(caller, request.path_params["task_id"])

    async def wait(self, request: Request) -> Any:
        caller = await self._caller(request, "wait")
        parts: list[bytes] = []
        answer = await self.pipeline.wait(caller, await self._body(request), parts)
        return await task_answer(request, answer, answer["tasks"], parts)

    async def status(self, request: Request) -> Any:
        caller = await self._caller(request, "status")
        return await self.pipeline.status(caller, request.path_params["endpoint"])

    async def introspect(self, request: Request) -> Any:
        caller = await self._caller(request, "introspect")
        return await self.pipeline.introspect(caller, request.path_params["endpoint"])

    async def read_log(self, request: Request) -> Any:
        caller = await self._caller(request, "log")
        lines = request.query_params.get("lines")
        return await self.pipeline.read_log(caller, request.path_params["endpoint"], lines)

    async def stop(self, request: Request) -> Any:
        caller = await self._caller(request, "stop")
        body = await self._body(request, optional=True)
        check_shape(body, STOP_SCHEMA)  # ``false`` is not an empty body
        return await self.pipeline.stop(caller, request.path_params["endpoint"], body)

    async def healthz(self, request: Request) -> Any:
        if self.pipeline.draining:
            return _JSONAnswer({"status": "draining"}, status_code=503)
        if not self.pipeline.audit.available:
            return _JSONAnswer({"status": "audit_unavailable"}, status_code=503)
        if not self.pipeline.store.available:
            return _JSONAnswer({"status": "store_unavailable"}, status_code=503)
        return {"status": "ok", "version": __version__}

    async def metrics_text(self, request: Request) -> Any:
        return Response(self.pipeline.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def openapi(self, request: Request) -> Any:
        return openapi_document()

    async def auth_metadata(self, request: Request) -> Any:
        return self.pipeline.authenticator.login_metadata()


# -- OpenAPI ----------------------------------------------------------------------------


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": _STATUS_TEXT[s], **_json(_ref("Error"))} for s in statuses}


_STATUS_TEXT = {
    400: "invalid request",
    401: "not authenticated",
    403: "refused (mapping, policy, allow-list)",
    404: "not found (or not yours)",
    408: "the body did not arrive within edge.body_timeout",
    409: "conflict with the task's state",
    413: "body, payload or variables too large",
    415: "the body is not application/json",
    422: "invalid user endpoint variables (every violation listed) or unknown function",
    429: "a limit was reached (the identity's request rate, queued tasks); see Retry-After",
    503: "draining, audit log unavailable, or a user endpoint failed to start",
}

_TASK_VIEW = {
    "type": "object",
    "required": ["task_id", "state"],
    "properties": {
        "task_id": {"type": "string"},
        "state": {"enum": ["queued", "running", "success", "failed", "cancelled"]},
        "function_id": {"type": "string"},
        "endpoint": {"type": "string"},
        "received": {"type": "number"},
        "finished": {"type": ["number", "null"]},
        "result": {"type": "string", "description": "base64 of the serialized result"},
        "result_frame": {
            "type": "integer",
            "description": "in a frames answer, instead of result: the frame holding it",
        },
        "error": {
            "type": "object",
            "properties": {
                "reason": {"type": "string"},
                "type_name": {"type": ["string", "null"]},
                "message": {"type": ["string", "null"]},
                "traceback": {"type": ["string", "null"]},
            },
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API, built from the validating schemas."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mepd",
            "version": __version__,
            "description": "multi-user function-as-a-service endpoint",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT or opaque"}
            },
            "schemas": {
                "Error": _error_schema(),
                "RegisterFunction": FUNCTION_SCHEMA,
                "Submit": SUBMIT_SCHEMA,
                "Wait": WAIT_SCHEMA,
                "Stop": STOP_SCHEMA,
                "Task": _TASK_VIEW,
            },
        },
        "paths": {**_endpoint_paths(), **_task_paths(), **_service_paths()},
    }


def _error_schema() -> dict[str, Any]:
    violation = {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "message": {"type": "string"},
            "code": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["reason", "message"],
                "properties": {
                    "reason": {"enum": sorted(set(REASONS) - set(ADMIN_ONLY_REASONS))},
                    "message": {"type": "string"},
                    "violations": {"type": "array", "items": violation},
                    # A failed start: the caller's endpoint log and its last lines.
                    "log": {
                        "type": "object",
                        "properties": {"path": {"type": "string"}, "tail": _STRINGS},
                    },
                },
            }
        },
    }


def _path_parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _operation(
    summary: str,
    *,
    answer: tuple[str, dict[str, Any]],
    errors: tuple[int, ...],
    parameter: str | None = None,
    body: str | None = None,
    body_required: bool = True,
    framed: bool = False,
) -> dict[str, Any]:
    """An authenticated operation: ``answer`` is the 200 description and schema, ``body``
    the name of the request body's schema in the components; ``framed``: the body (or,
    on a result route, the answer) may also be mep frames (docs/api.md)."""
    operation: dict[str, Any] = {"summary": summary, "security": [{"bearer": []}]}
    if parameter is not None:
        operation["parameters"] = [_path_parameter(parameter)]
    if body is not None:
        operation["requestBody"] = {"required": body_required, **_json(_ref(body))}
    description, schema = answer
    ok = {"description": description, **_json(schema)}
    if framed and body in ("Submit", "RegisterFunction"):
        operation["requestBody"]["content"][frames.MEDIA_TYPE] = _FRAMES_CONTENT
    elif framed:
        ok["content"][frames.MEDIA_TYPE] = _FRAMES_CONTENT
    # Every authenticated route is rate limited per identity; a route with a body can
    # also be refused for its type or its lateness.
    edge = (408, 415, 429) if body is not None else (429,)
    operation["responses"] = {
        "200": ok,
        **_errors(*sorted({*errors, *edge})),
    }
    return operation


def _object(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


_STRINGS = {"type": "array", "items": {"type": "string"}}
_FRAMES_CONTENT = {
    "schema": {
        "type": "string",
        "format": "binary",
        "description": "mep frames: the JSON header without the payload bytes, then the"
        " bytes as frames (layout in docs/api.md)",
    }
}
_USER_ENDPOINTS = _object(
    endpoint={"type": "string"}, user_endpoints={"type": "array", "items": {"type": "object"}}
)
_INTROSPECTED = (
    "one entry per ready user endpoint: config_key, pid, and process (uid, gid, groups, "
    "umask, cwd, env_keys, fds, channel_fd, sid, rlimits, capabilities, setuid_refused)"
)


def _log_operation() -> dict[str, Any]:
    operation = _operation(
        "the tail of the caller's own endpoint log, read as the caller's account",
        parameter="endpoint",
        answer=(
            "the log's path in the account's home, whether it exists, its last lines",
            _object(
                endpoint={"type": "string"},
                path={"type": "string"},
                exists={"type": "boolean"},
                lines=_STRINGS,
            ),
        ),
        errors=(400, 401, 403, 404, 503),
    )
    operation["parameters"].append(
        {
            "name": "lines",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 5000, "default": 200},
        }
    )
    return operation


def _submit_operation() -> dict[str, Any]:
    answer = _object(
        task_ids=_STRINGS,
        tasks={"type": "array", "items": _ref("Task")},
        pending=_STRINGS,
        unknown=_STRINGS,
    )
    operation = _operation(
        "submit a batch of tasks to the caller's user endpoint (with ?wait: and wait for"
        " the first results)",
        parameter="endpoint",
        body="Submit",
        framed=True,
        answer=(
            "task ids, in request order; with ?wait also tasks (those final within the"
            " wait), pending and unknown, as from /v1/tasks/wait",
            answer,
        ),
        errors=(400, 401, 403, 404, 413, 422, 429, 503),
    )
    operation["responses"]["200"]["content"][frames.MEDIA_TYPE] = _FRAMES_CONTENT
    operation["parameters"].append(
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "schema": {"type": "number", "minimum": 0},
            "description": "seconds to wait for the first result (at most limits.max_wait_timeout)",
        }
    )
    return operation


def _endpoint_paths() -> dict[str, Any]:
    return {
        "/v1/functions": {
            "post": _operation(
                "register a serialized function (id = sha256 of its bytes)",
                body="RegisterFunction",
                framed=True,
                answer=("the function id", _object(function_id={"type": "string"})),
                errors=(400, 401, 413, 503),
            )
        },
        "/v1/endpoints/{endpoint}/submit": {"post": _submit_operation()},
        "/v1/endpoints/{endpoint}/status": {
            "get": _operation(
                "the caller's user endpoints",
                parameter="endpoint",
                answer=("user endpoints", _USER_ENDPOINTS),
                errors=(401, 403, 404),
            )
        },
        "/v1/endpoints/{endpoint}/introspect": {
            "get": _operation(
                "the process identity of the caller's ready user endpoints",
                parameter="endpoint",
                answer=(_INTROSPECTED, _USER_ENDPOINTS),
                errors=(401, 403, 404),
            )
        },
        "/v1/endpoints/{endpoint}/log": {"get": _log_operation()},
        "/v1/endpoints/{endpoint}/stop": {
            "post": _operation(
                "stop the caller's user endpoints (anyone's with policy admin)",
                parameter="endpoint",
                body="Stop",
                body_required=False,
                answer=("how many were stopped", _object(stopped={"type": "integer"})),
                errors=(400, 401, 403, 404),
            )
        },
    }


def _task_paths() -> dict[str, Any]:
    finished = _object(
        tasks={"type": "array", "items": _ref("Task")}, pending=_STRINGS, unknown=_STRINGS
    )
    return {
        "/v1/tasks/wait": {
            "post": _operation(
                "long-poll: the listed tasks that finish within the timeout",
                body="Wait",
                answer=("finished, pending and unknown ids", finished),
                framed=True,
                errors=(400, 401),
            )
        },
        "/v1/tasks/{task_id}": {
            "get": _operation(
                "a task's state and result",
                parameter="task_id",
                answer=("the task", _ref("Task")),
                framed=True,
                errors=(401, 404),
            ),
            "delete": _operation(
                "cancel a task that has not started",
                parameter="task_id",
                answer=("the task", _ref("Task")),
                errors=(401, 404, 409),
            ),
        },
    }


def _service_paths() -> dict[str, Any]:
    """The unauthenticated routes: health, metrics and this document."""
    return {
        "/healthz": {
            "get": {
                "summary": "liveness and readiness",
                "responses": {
                    "200": {"description": "serving"},
                    "503": {"description": "draining or audit log unavailable"},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            }
        },
        "/v1/auth": {
            "get": {
                "summary": "how to log in (mep login): the OpenID providers' issuer and"
                " audience, and the public client for device login",
                "responses": {
                    "200": {
                        "description": "{issuers: [{issuer, audience, device_client_id?, scopes?}]}"
                    }
                },
            }
        },
    }


def openapi_text() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(openapi_text())
