"""The HTTP API (Starlette): routes, body limits, error format, the OpenAPI document.

Thin: each handler reads a bounded JSON body, authenticates, calls the pipeline and
renders its answer. Errors are ``{"error": {"reason", "message"}}`` (plus
``violations`` for a caller's own invalid input) with an honest status code; only the
public message of an error ever leaves the daemon. A body over the limit is refused
with 413 from its ``Content-Length`` or, without one, as soon as the streamed bytes
exceed the limit — it is never read whole. JSON nesting depth is bounded.

The OpenAPI 3.1 document is built here from the same request schemas the pipeline
validates with (``openapi_document()``); ``docs/openapi.json`` is a copy a test keeps
current (regenerate with ``python -m mepd.api > docs/openapi.json``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mepcore.errors import REASONS, MepError
from mepd import __version__
from mepd.auth import Caller
from mepd.pipeline import Pipeline
from mepd.settings import Limits
from mepd.shapes import (
    FUNCTION_SCHEMA,
    STOP_SCHEMA,
    SUBMIT_SCHEMA,
    WAIT_SCHEMA,
    RequestError,
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
    "task.payload_too_large": 413,
    "api.bad_request": 400,
    "api.not_found": 404,
    "api.endpoint_unknown": 404,
    "api.body_too_large": 413,
    "api.too_many_requests": 429,
    "api.unavailable": 503,
    "api.shutting_down": 503,
    "api.task_started": 409,
    "audit.unavailable": 503,
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
    "auth.issuer_unavailable": 5,
}


def status_for(reason: str) -> int:
    if reason in _EXACT_STATUS:
        return _EXACT_STATUS[reason]
    return _AREA_STATUS.get(reason.partition(".")[0], 500)


def error_response(error: MepError) -> JSONResponse:
    status = status_for(error.reason)
    headers = {}
    if error.reason in RETRY_AFTER_SECONDS:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS[error.reason])
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="mepd"'
    return JSONResponse({"error": error.to_public()}, status_code=status, headers=headers)


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


async def read_json(request: Request, limits: Limits, *, optional: bool = False) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise RequestError("api.bad_request", "bad Content-Length") from exc
        if size > limits.max_body_bytes:
            raise RequestError("api.body_too_large", f"declared {size} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limits.max_body_bytes:
            raise RequestError("api.body_too_large", "streamed body over the limit")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        if optional:
            return {}
        raise RequestError("api.bad_request", "empty body")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestError("api.bad_request", "body is not JSON") from exc
    if not json_depth_ok(data, limits.max_json_depth):
        raise RequestError("api.bad_request", "JSON nested too deeply")
    return data


Handler = Callable[[Request], Awaitable[Response]]


def create_app(pipeline: Pipeline, limits: Limits, **starlette_options: Any) -> Starlette:
    """The ASGI application serving ``pipeline``."""
    metrics = pipeline.metrics

    def route(name: str, fn: Callable[[Request], Awaitable[Any]], *, status: int = 200) -> Handler:
        async def handler(request: Request) -> Response:
            started = time.perf_counter()
            try:
                result = await fn(request)
                response: Response = (
                    result
                    if isinstance(result, Response)
                    else JSONResponse(result, status_code=status)
                )
            except MepError as exc:
                if status_for(exc.reason) >= 500:
                    log.error(
                        "api.request_failed", route=name, reason=exc.reason, detail=exc.detail
                    )
                else:
                    log.info(
                        "api.request_refused", route=name, reason=exc.reason, detail=exc.detail
                    )
                response = error_response(exc)
            except Exception:
                log.exception("api.request_crashed", route=name)
                response = error_response(MepError("mep.internal"))
            metrics.requests.inc(route=name, status=str(response.status_code))
            metrics.latency.observe(time.perf_counter() - started, route=name)
            return response

        return handler

    async def caller_of(request: Request, name: str) -> Caller:
        return await pipeline.authenticate(request.headers.get("authorization"), route=name)

    async def functions(request: Request) -> Any:
        caller = await caller_of(request, "functions")
        return await pipeline.register_function(caller, await read_json(request, limits))

    async def submit(request: Request) -> Any:
        caller = await caller_of(request, "submit")
        body = await read_json(request, limits)
        return await pipeline.submit(caller, request.path_params["endpoint"], body)

    async def get_task(request: Request) -> Any:
        caller = await caller_of(request, "task")
        return pipeline.get_task(caller, request.path_params["task_id"])

    async def cancel_task(request: Request) -> Any:
        caller = await caller_of(request, "cancel")
        return pipeline.cancel(caller, request.path_params["task_id"])

    async def wait(request: Request) -> Any:
        caller = await caller_of(request, "wait")
        return await pipeline.wait(caller, await read_json(request, limits))

    async def status(request: Request) -> Any:
        caller = await caller_of(request, "status")
        return await pipeline.status(caller, request.path_params["endpoint"])

    async def introspect(request: Request) -> Any:
        caller = await caller_of(request, "introspect")
        return await pipeline.introspect(caller, request.path_params["endpoint"])

    async def stop(request: Request) -> Any:
        caller = await caller_of(request, "stop")
        body = await read_json(request, limits, optional=True)
        return await pipeline.stop(caller, request.path_params["endpoint"], body)

    async def healthz(request: Request) -> Any:
        if pipeline.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not pipeline.audit.available:
            return JSONResponse({"status": "audit_unavailable"}, status_code=503)
        return {"status": "ok", "version": __version__}

    async def metrics_text(request: Request) -> Any:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(request: Request) -> Any:
        return openapi_document()

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(MepError("api.not_found"))

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        response = error_response(MepError("api.bad_request", public_message="method not allowed"))
        response.status_code = 405
        return response

    routes = [
        Route("/v1/functions", route("functions", functions), methods=["POST"]),
        Route("/v1/endpoints/{endpoint}/submit", route("submit", submit), methods=["POST"]),
        Route("/v1/endpoints/{endpoint}/status", route("status", status), methods=["GET"]),
        Route(
            "/v1/endpoints/{endpoint}/introspect",
            route("introspect", introspect),
            methods=["GET"],
        ),
        Route("/v1/endpoints/{endpoint}/stop", route("stop", stop), methods=["POST"]),
        Route("/v1/tasks/wait", route("wait", wait), methods=["POST"]),
        Route("/v1/tasks/{task_id}", route("task", get_task), methods=["GET"]),
        Route("/v1/tasks/{task_id}", route("cancel", cancel_task), methods=["DELETE"]),
        Route("/v1/openapi.json", route("openapi", openapi), methods=["GET"]),
        Route("/healthz", route("healthz", healthz), methods=["GET"]),
        Route("/metrics", route("metrics", metrics_text), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed},
        **starlette_options,
    )


# -- OpenAPI ----------------------------------------------------------------------------


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {"description": _STATUS_TEXT[s], **_json({"$ref": "#/components/schemas/Error"})}
        for s in statuses
    }


_STATUS_TEXT = {
    400: "invalid request",
    401: "not authenticated",
    403: "refused (mapping, policy, allow-list)",
    404: "not found (or not yours)",
    409: "conflict with the task's state",
    413: "body, payload or variables too large",
    422: "invalid user endpoint variables (every violation listed) or unknown function",
    429: "a limit was reached; see Retry-After",
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
    auth: list[dict[str, list[str]]] = [{"bearer": []}]
    endpoint_param = {
        "name": "endpoint",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    task_param = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
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
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["reason", "message"],
                            "properties": {
                                "reason": {"enum": sorted(REASONS)},
                                "message": {"type": "string"},
                                "violations": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "path": {"type": "string"},
                                            "message": {"type": "string"},
                                            "code": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        }
                    },
                },
                "RegisterFunction": FUNCTION_SCHEMA,
                "Submit": SUBMIT_SCHEMA,
                "Wait": WAIT_SCHEMA,
                "Stop": STOP_SCHEMA,
                "Task": _TASK_VIEW,
            },
        },
        "paths": {
            "/v1/functions": {
                "post": {
                    "summary": "register a serialized function (id = sha256 of its bytes)",
                    "security": auth,
                    "requestBody": {
                        "required": True,
                        **_json({"$ref": "#/components/schemas/RegisterFunction"}),
                    },
                    "responses": {
                        "200": {
                            "description": "the function id",
                            **_json(
                                {
                                    "type": "object",
                                    "properties": {"function_id": {"type": "string"}},
                                }
                            ),
                        },
                        **_errors(400, 401, 413, 503),
                    },
                }
            },
            "/v1/endpoints/{endpoint}/submit": {
                "post": {
                    "summary": "submit a batch of tasks to the caller's user endpoint",
                    "security": auth,
                    "parameters": [endpoint_param],
                    "requestBody": {
                        "required": True,
                        **_json({"$ref": "#/components/schemas/Submit"}),
                    },
                    "responses": {
                        "200": {
                            "description": "task ids, in request order",
                            **_json(
                                {
                                    "type": "object",
                                    "properties": {
                                        "task_ids": {"type": "array", "items": {"type": "string"}}
                                    },
                                }
                            ),
                        },
                        **_errors(400, 401, 403, 404, 413, 422, 429, 503),
                    },
                }
            },
            "/v1/endpoints/{endpoint}/status": {
                "get": {
                    "summary": "the caller's user endpoints",
                    "security": auth,
                    "parameters": [endpoint_param],
                    "responses": {
                        "200": {
                            "description": "user endpoints",
                            **_json(
                                {
                                    "type": "object",
                                    "properties": {
                                        "endpoint": {"type": "string"},
                                        "user_endpoints": {
                                            "type": "array",
                                            "items": {"type": "object"},
                                        },
                                    },
                                }
                            ),
                        },
                        **_errors(401, 403, 404),
                    },
                }
            },
            "/v1/endpoints/{endpoint}/introspect": {
                "get": {
                    "summary": "the process identity of the caller's ready user endpoints",
                    "security": auth,
                    "parameters": [endpoint_param],
                    "responses": {
                        "200": {
                            "description": "one entry per ready user endpoint: config_key, "
                            "pid, and process (uid, gid, groups, umask, cwd, env_keys, fds, "
                            "channel_fd, sid, rlimits, capabilities, setuid_refused)",
                            **_json(
                                {
                                    "type": "object",
                                    "properties": {
                                        "endpoint": {"type": "string"},
                                        "user_endpoints": {
                                            "type": "array",
                                            "items": {"type": "object"},
                                        },
                                    },
                                }
                            ),
                        },
                        **_errors(401, 403, 404),
                    },
                }
            },
            "/v1/endpoints/{endpoint}/stop": {
                "post": {
                    "summary": "stop the caller's user endpoints (anyone's with policy admin)",
                    "security": auth,
                    "parameters": [endpoint_param],
                    "requestBody": {
                        "required": False,
                        **_json({"$ref": "#/components/schemas/Stop"}),
                    },
                    "responses": {
                        "200": {
                            "description": "how many were stopped",
                            **_json(
                                {"type": "object", "properties": {"stopped": {"type": "integer"}}}
                            ),
                        },
                        **_errors(400, 401, 403, 404),
                    },
                }
            },
            "/v1/tasks/wait": {
                "post": {
                    "summary": "long-poll: the listed tasks that finish within the timeout",
                    "security": auth,
                    "requestBody": {
                        "required": True,
                        **_json({"$ref": "#/components/schemas/Wait"}),
                    },
                    "responses": {
                        "200": {
                            "description": "finished, pending and unknown ids",
                            **_json(
                                {
                                    "type": "object",
                                    "properties": {
                                        "tasks": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Task"},
                                        },
                                        "pending": {"type": "array", "items": {"type": "string"}},
                                        "unknown": {"type": "array", "items": {"type": "string"}},
                                    },
                                }
                            ),
                        },
                        **_errors(400, 401),
                    },
                }
            },
            "/v1/tasks/{task_id}": {
                "get": {
                    "summary": "a task's state and result",
                    "security": auth,
                    "parameters": [task_param],
                    "responses": {
                        "200": {
                            "description": "the task",
                            **_json({"$ref": "#/components/schemas/Task"}),
                        },
                        **_errors(401, 404),
                    },
                },
                "delete": {
                    "summary": "cancel a task that has not started",
                    "security": auth,
                    "parameters": [task_param],
                    "responses": {
                        "200": {
                            "description": "the task",
                            **_json({"$ref": "#/components/schemas/Task"}),
                        },
                        **_errors(401, 404, 409),
                    },
                },
            },
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
        },
    }


def openapi_text() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(openapi_text())
