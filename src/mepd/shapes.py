"""Request shapes: one JSON Schema per route body, and the parsed values of the bodies.

The schemas are the contract of the HTTP API: ``mepd.api`` builds the OpenAPI document
from them, and every body is checked against its route's schema before anything else
reads it. Submit and wait bodies are large and frequent, so each has a hand-written fast
check that accepts exactly what its schema accepts; the schema only runs, to list the
violations, when the fast check fails (a test keeps the two equivalent).

Deliberately not here: authentication, decisions about the caller, and anything about
the meaning of a task.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import jsonschema

from mepcore.errors import ApiError, ConfigError, TaskError, Violation
from mepcore.tasks import ResourceSpecification, resource_specification

MAX_WAIT_IDS = 10_000


class RequestError(ApiError):
    """A caller's own request is malformed; its violations are safe to show them."""

    expose_violations = True


_FID = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

SUBMIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["tasks"],
    "properties": {
        "user_endpoint_config": {"type": "object"},
        "user_runtime": {"type": "object"},
        "tasks": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["function_id", "args"],
                "properties": {
                    "function_id": _FID,
                    "args": {"type": "string"},
                    "walltime": {"type": "number", "exclusiveMinimum": 0},
                    # What an MPI task asks for (mepcore.tasks.ResourceSpecification).
                    "resource_specification": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "num_nodes": {"type": "integer", "minimum": 1},
                            "ranks_per_node": {"type": "integer", "minimum": 1},
                            "num_ranks": {"type": "integer", "minimum": 1},
                            "launcher_options": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}

FUNCTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["function"],
    "properties": {
        "function": {"type": "string", "minLength": 1},
        "name": {"type": "string", "maxLength": 256},
        "source": {"type": "string", "maxLength": 1_000_000},
    },
}

WAIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["task_ids"],
    "properties": {
        "task_ids": {"type": "array", "maxItems": MAX_WAIT_IDS, "items": {"type": "string"}},
        "timeout": {"type": "number", "minimum": 0},
    },
}

STOP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"account": {"type": "string", "minLength": 1}},
}

_VALIDATORS = {
    id(schema): jsonschema.Draft202012Validator(schema)
    for schema in (SUBMIT_SCHEMA, FUNCTION_SCHEMA, WAIT_SCHEMA, STOP_SCHEMA)
}


def check_shape(data: Any, schema: Mapping[str, Any]) -> None:
    """Validate a request body; every violation is returned to the caller."""
    validator = _VALIDATORS.get(id(schema)) or jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        violations = []
        for err in errors[:50]:
            path = "$" + "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path
            )
            violations.append(Violation(path, err.message[:200]))
        raise RequestError("api.bad_request", "request body invalid", violations=violations)


_FID_RE = re.compile(r"[0-9a-f]{64}")
_SUBMIT_KEYS = frozenset({"user_endpoint_config", "user_runtime", "tasks"})
_TASK_KEYS = frozenset({"function_id", "args", "walltime", "resource_specification"})


def submit_shape_ok(body: Any) -> bool:
    """A fast check equivalent to ``SUBMIT_SCHEMA`` (stricter on the id: ``fullmatch``).

    jsonschema costs ~70 µs per task item, too much for batches of thousands; it only
    runs when this check fails, to list the violations."""
    if type(body) is not dict or not body.keys() <= _SUBMIT_KEYS:
        return False
    for key in ("user_endpoint_config", "user_runtime"):
        if key in body and type(body[key]) is not dict:
            return False
    tasks = body.get("tasks")
    if type(tasks) is not list or not tasks:
        return False
    for item in tasks:
        if type(item) is not dict or not item.keys() <= _TASK_KEYS:
            return False
        fid = item.get("function_id")
        if type(fid) is not str or not _FID_RE.fullmatch(fid):
            return False
        if type(item.get("args")) is not str:
            return False
        if "walltime" in item:
            wall = item["walltime"]
            if type(wall) not in (int, float) or not wall > 0:
                return False
        if "resource_specification" in item and type(item["resource_specification"]) is not dict:
            return False
    return True


def wait_shape_ok(body: Any) -> bool:
    """A fast check equivalent to ``WAIT_SCHEMA``."""
    if type(body) is not dict or not body.keys() <= {"task_ids", "timeout"}:
        return False
    ids = body.get("task_ids")
    if type(ids) is not list or len(ids) > MAX_WAIT_IDS:
        return False
    if not all(type(i) is str for i in ids):
        return False
    if "timeout" in body:
        timeout = body["timeout"]
        if type(timeout) not in (int, float) or not timeout >= 0:
            return False
    return True


def b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            "api.bad_request", f"{what} is not base64", violations=[Violation(what, "not base64")]
        ) from exc


@attrs.frozen
class TaskItem:
    """One task of a submit: its function, its opaque argument bytes, its walltime."""

    function_id: str
    payload: bytes
    walltime: float | None
    resources: ResourceSpecification | None = None


def _resources(item: Mapping[str, Any], index: int) -> ResourceSpecification | None:
    try:
        return resource_specification(item.get("resource_specification"))
    except TaskError as exc:
        where = f"$.tasks[{index}].resource_specification"
        raise RequestError(
            exc.reason, exc.detail, violations=[Violation(where, exc.detail)]
        ) from None


@attrs.frozen
class SubmitRequest:
    """A submit body, checked against its schema and the size limits, payloads decoded."""

    tasks: tuple[TaskItem, ...]
    variables: dict[str, Any]
    user_runtime: dict[str, Any]

    @property
    def function_ids(self) -> list[str]:
        return list(dict.fromkeys(t.function_id for t in self.tasks))

    @classmethod
    def from_body(
        cls, body: Any, limits: SubmitLimits, frames: list[bytes] | None = None
    ) -> SubmitRequest:
        """``frames``: the argument bytes of a frames body (task *i* takes frame *i*; its
        items then carry no ``args``); None for a JSON body (base64 ``args``)."""
        if frames is not None:
            body = _with_frame_args(body, len(frames))
        if not submit_shape_ok(body):
            check_shape(body, SUBMIT_SCHEMA)
            raise RequestError("api.bad_request", "request body invalid")
        raw_tasks: list[dict[str, Any]] = body["tasks"]
        if len(raw_tasks) > limits.max_tasks_per_request:
            raise RequestError("api.body_too_large", "too many tasks in one request")
        variables = body.get("user_endpoint_config") or {}
        user_runtime = body.get("user_runtime") or {}
        if len(json.dumps(variables, sort_keys=True)) > limits.max_variables_bytes:
            raise ConfigError("config.variables_too_large", "variables too large")
        if len(json.dumps(user_runtime)) > limits.max_variables_bytes:
            raise RequestError("api.body_too_large", "user_runtime too large")
        tasks = []
        for i, item in enumerate(raw_tasks):
            where = f"$.tasks[{i}].args"
            payload = b64decode(item["args"], where) if frames is None else frames[i]
            if len(payload) > limits.max_payload_bytes:
                raise TaskError("task.payload_too_large", f"task {i} payload too large")
            walltime = item.get("walltime")
            tasks.append(
                TaskItem(
                    item["function_id"],
                    payload,
                    float(walltime or 0) or None,
                    _resources(item, i),
                )
            )
        return cls(tuple(tasks), variables, user_runtime)


def _with_frame_args(body: Any, count: int) -> Any:
    """A frames submit's header as its JSON body would be (``args`` filled in, to be
    checked by the same schema); its items must not carry ``args`` themselves, and there
    must be exactly one frame per task."""
    tasks = body.get("tasks") if type(body) is dict else None
    if type(tasks) is not list:
        return body  # the schema check says what is wrong
    if len(tasks) != count:
        raise RequestError(
            "api.bad_request",
            f"{len(tasks)} tasks and {count} frames",
            violations=[Violation("$frames.count", f"{count} frames for {len(tasks)} tasks")],
        )
    filled = []
    for i, item in enumerate(tasks):
        if type(item) is dict and "args" in item:
            raise RequestError(
                "api.bad_request",
                "args in a frames header",
                violations=[Violation(f"$.tasks[{i}].args", f"arguments travel as frame {i}")],
            )
        filled.append({**item, "args": ""} if type(item) is dict else item)
    return {**body, "tasks": filled}


def payload_chars(body: Any) -> int:
    """About how many characters of base64 a JSON submit body carries (0 if it is not
    shaped like one): large bodies are decoded off the event loop."""
    tasks = body.get("tasks") if type(body) is dict else None
    if type(tasks) is not list:
        return 0
    return sum(len(t["args"]) for t in tasks if type(t) is dict and type(t.get("args")) is str)


class SubmitLimits(Protocol):
    """The settings a submit body is measured against (``mepd.settings.Limits``)."""

    @property
    def max_tasks_per_request(self) -> int: ...

    @property
    def max_variables_bytes(self) -> int: ...

    @property
    def max_payload_bytes(self) -> int: ...
