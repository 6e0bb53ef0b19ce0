"""The executor: accepts task envelopes, enforces the endpoint's rules, runs them on an engine.

Before a task reaches an engine the executor checks, whatever the daemon decided, that
its function is allowed (``allowed_functions``), registered (bodies are sent once and
cached by their sha256 id), and that its payload fits the limits; a refused task is a
failed ``ResultEnvelope``, never an exception. Engines are built from the ``engine``
mapping of an endpoint config through a closed table of types; Parsl is imported only
when ``GlobusComputeEngine`` is configured.

This module deliberately does not deserialize anything: payloads stay bytes until a
worker loads them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import attrs

from mepcore.errors import ConfigError, TaskError, Violation
from mepcore.tasks.engine import Engine, ExecutorLimits, Job
from mepcore.tasks.envelopes import RemoteError, ResultEnvelope, TaskEnvelope
from mepcore.tasks.serialization import BYTECODE_STRATEGIES, function_id_of, payload_tag

ENGINE_TYPES = ("ThreadPoolEngine", "ProcessPoolEngine", "GlobusComputeEngine", "GlobusMPIEngine")


def _config_error(path: str, message: str) -> ConfigError:
    return ConfigError(
        "config.endpoint_config_invalid",
        f"{path}: {message}",
        violations=[Violation(path, message)],
    )


def _positive_int(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if type(value) is not int or value < 1:
        raise _config_error(f"$.engine.{key}", "must be a positive integer")
    return value


def _check_keys(options: Mapping[str, Any], allowed: Collection[str], path: str) -> None:
    for key in options:
        if key not in allowed:
            raise _config_error(f"{path}.{key}", "is not a known option")


_THREAD_KEYS = frozenset({"type", "max_workers"})
_PROCESS_KEYS = frozenset({"type", "max_workers", "prefetch"})


def engine_keys(engine_type: str) -> frozenset[str]:
    """The keys an ``engine`` mapping of this type may hold (all honoured at start);
    the endpoint-config schema is tested equal to them."""
    if engine_type == "GlobusComputeEngine":
        from mepcore.tasks.parsl_build import _ENGINE_KEYS

        return frozenset(_ENGINE_KEYS)
    if engine_type == "GlobusMPIEngine":
        from mepcore.tasks.parsl_mpi import MPI_ENGINE_KEYS

        return frozenset(MPI_ENGINE_KEYS)
    if engine_type not in _BUILDERS:
        raise ValueError(f"unknown engine type {engine_type!r}")
    return _THREAD_KEYS if engine_type == "ThreadPoolEngine" else _PROCESS_KEYS


def _build_threads(options: Mapping[str, Any], limits: ExecutorLimits) -> Engine:
    from mepcore.tasks.threads import ThreadPoolEngine

    _check_keys(options, _THREAD_KEYS, "$.engine")
    default = min(32, (os.cpu_count() or 1) + 4)
    return ThreadPoolEngine(_positive_int(options, "max_workers", default), limits.max_result_bytes)


def _build_processes(options: Mapping[str, Any], limits: ExecutorLimits) -> Engine:
    from mepcore.tasks.process import ProcessPoolEngine

    _check_keys(options, _PROCESS_KEYS, "$.engine")
    return ProcessPoolEngine(
        _positive_int(options, "max_workers", os.cpu_count() or 1),
        limits.max_result_bytes,
        prefetch=_positive_int(options, "prefetch", 16),
    )


def _build_parsl(options: Mapping[str, Any], limits: ExecutorLimits) -> Engine:
    from mepcore.tasks.parsl_engine import ParslEngine

    return ParslEngine.from_config(options, limits)


def _build_parsl_mpi(options: Mapping[str, Any], limits: ExecutorLimits) -> Engine:
    from mepcore.tasks.parsl_mpi import ParslMPIEngine

    return ParslMPIEngine.from_config(options, limits)


_BUILDERS: Mapping[str, Callable[[Mapping[str, Any], ExecutorLimits], Engine]] = {
    "ThreadPoolEngine": _build_threads,
    "ProcessPoolEngine": _build_processes,
    "GlobusComputeEngine": _build_parsl,
    "GlobusMPIEngine": _build_parsl_mpi,
}


def build_engine(config: Mapping[str, Any], limits: ExecutorLimits) -> Engine:
    """The engine an endpoint config's ``engine`` mapping describes (not started)."""
    if not isinstance(config, Mapping):
        raise _config_error("$.engine", "must be a mapping")
    kind = config.get("type")
    builder = _BUILDERS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        raise _config_error("$.engine.type", f"must be one of {', '.join(ENGINE_TYPES)}")
    return builder(config, limits)


_NOT_MPI = (
    "a resource_specification is for MPI tasks: this endpoint's engine is not GlobusMPIEngine"
)


def _refused(task: TaskEnvelope, reason: str, message: str) -> Future[ResultEnvelope]:
    now = time.time()
    future: Future[ResultEnvelope] = Future()
    future.set_result(
        ResultEnvelope(
            task_id=task.task_id,
            status="failed",
            error=RemoteError.of(reason, message),
            received=now,
            started=now,
            finished=now,
        )
    )
    return future


@attrs.define
class Executor:
    """Runs task envelopes on one engine; see the module docstring."""

    engine: Engine
    limits: ExecutorLimits = attrs.field(factory=ExecutorLimits)
    allowed_functions: frozenset[str] | None = None
    # The (major, minor) Python of the client whose functions this executor runs (its
    # user_runtime), when known: bytecode from another minor version is refused.
    client_python: tuple[int, int] | None = None
    _functions: dict[str, bytes] = attrs.field(init=False, factory=dict)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _state: str = attrs.field(init=False, default="new")

    @classmethod
    def from_engine_config(
        cls,
        engine: Mapping[str, Any],
        *,
        limits: ExecutorLimits = ExecutorLimits(),  # noqa: B008 - frozen value
        allowed_functions: Collection[str] | None = None,
        client_python: tuple[int, int] | None = None,
    ) -> Executor:
        allowed = None if allowed_functions is None else frozenset(allowed_functions)
        return cls(build_engine(engine, limits), limits, allowed, client_python)

    def start(self) -> None:
        with self._lock:
            if self._state != "new":
                raise RuntimeError("the executor was already started")
            self._state = "starting"
        try:
            self.engine.start()
        except BaseException:
            with self._lock:
                self._state = "stopped"
            raise
        with self._lock:
            self._state = "running"

    def register_function(self, function_id: str, payload: bytes) -> None:
        """Cache a function body under its id (the sha256 hex of ``payload``)."""
        if len(payload) > self.limits.max_function_bytes:
            raise TaskError(
                "task.payload_too_large",
                f"function body of {len(payload)} bytes > {self.limits.max_function_bytes}",
            )
        if function_id_of(payload) != function_id:
            raise TaskError("task.envelope_invalid", "function id is not the sha256 of its body")
        with self._lock:
            if function_id in self._functions:
                return
            if len(self._functions) >= self.limits.max_registered_functions:
                raise TaskError("task.payload_too_large", "too many registered functions")
            self._functions[function_id] = payload

    def submit(self, task: TaskEnvelope) -> Future[ResultEnvelope]:
        return self.submit_many((task,))[0]

    def submit_many(self, tasks: Iterable[TaskEnvelope]) -> list[Future[ResultEnvelope]]:
        """Submit tasks in one batch; a refused task's future is already a failed result."""
        if self._state != "running":
            raise RuntimeError("the executor is not running (start() it; or it was shut down)")
        futures: list[Future[ResultEnvelope]] = []
        jobs: list[Job] = []
        received = time.time()
        functions = self._functions
        allowed = self.allowed_functions
        limits = self.limits
        for task in tasks:
            function_id = task.function_id
            if allowed is not None and function_id not in allowed:
                futures.append(
                    _refused(
                        task,
                        "task.function_not_allowed",
                        "this function is not allowed on this endpoint",
                    )
                )
                continue
            body = functions.get(function_id)
            if body is None:
                futures.append(
                    _refused(
                        task,
                        "task.function_unknown",
                        "the function is not registered on this endpoint",
                    )
                )
                continue
            mismatch = self._version_mismatch(body)
            if mismatch:
                futures.append(_refused(task, "task.version_mismatch", mismatch))
                continue
            if len(task.payload) > limits.max_payload_bytes:
                futures.append(
                    _refused(
                        task,
                        "task.payload_too_large",
                        f"the task payload is larger than {limits.max_payload_bytes} bytes",
                    )
                )
                continue
            if task.resource_specification is not None and not getattr(self.engine, "MPI", False):
                futures.append(_refused(task, "task.resources_invalid", _NOT_MPI))
                continue
            walltime = task.walltime if task.walltime is not None else limits.default_walltime
            future: Future[ResultEnvelope] = Future()
            futures.append(future)
            jobs.append(Job(task, body, future, received, walltime))
        if jobs:
            self.engine.submit(jobs)
        return futures

    def cancel(self, task_ids: Collection[str]) -> None:
        """Stop these tasks wherever they are in the engine (waiting, or running: the
        engine stops what runs them, see each engine); each one's future is completed
        with ``task.cancelled`` unless it finished first. Unknown ids are ignored."""
        wanted = frozenset(task_ids)
        if wanted and self._state == "running":
            self.engine.cancel(wanted)

    def _version_mismatch(self, body: bytes) -> str:
        """Why a function cannot run here ('' if it can): bytecode of another Python."""
        client, here = self.client_python, sys.version_info[:2]
        if client is None or client == here or payload_tag(body) not in BYTECODE_STRATEGIES:
            return ""
        theirs, ours = ".".join(map(str, client)), ".".join(map(str, here))
        return (
            f"the function was serialized as bytecode by Python {theirs} (the client) and "
            f"this endpoint runs Python {ours}, which cannot run it: send it by source "
            f'(Executor(..., serializer="source")) or submit from Python {ours}'
        )

    def shutdown(self, wait: bool = True) -> None:
        """Stop the engine: with ``wait``, accepted tasks finish first; else they are
        failed with ``task.cancelled``. Worker processes are reaped, blocks cancelled."""
        with self._lock:
            if self._state in ("stopping", "stopped"):
                return
            started = self._state != "new"
            self._state = "stopping"
        try:
            if started:
                self.engine.shutdown(wait)
        finally:
            with self._lock:
                self._state = "stopped"

    def __enter__(self) -> Executor:
        if self._state == "new":
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)
