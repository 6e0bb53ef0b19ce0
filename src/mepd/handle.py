"""One user endpoint as the daemon sees it: ``UserEndpointHandle``, driven by the registry.

A handle is bound to the account (uid, gid, name, groups) its endpoint was started for,
owns the endpoint's channel and process, and turns the endpoint's frames into events:
results (accepted only for task ids dispatched to *this* endpoint — a user's process
cannot complete another user's tasks), errors with their log, ``ready``, the exit. When
the endpoint is gone its in-flight tasks are reported lost through the registry and the
stop ladder reaps it. ``EndpointStatus`` is what status queries report of it.

Deliberately not here: starting endpoints, limits, adoption (``mepd.registry``), HTTP,
the task store, deserializing payloads (never, §3.4).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from mepcore.errors import (
    REASONS,
    ChannelError,
    ConfigError,
    MepError,
    SpawnError,
    TemplateConfigError,
    Violation,
)
from mepcore.spawn import LaunchedProcess, stop_ladder
from mepcore.tasks import RemoteError, ResultEnvelope, TaskEnvelope
from mepcore.types import Account
from mepd.channel import AsyncChannel, Frame, batch_frames, check_items
from mepd.inflight import DispatchTask, InFlightTask

if TYPE_CHECKING:
    from mepd.registry import Registry

log = structlog.get_logger("mepd.registry")

# How much of the reason in an endpoint's ``exiting`` frame is kept.
_MAX_REASON_CHARS = 512


@attrs.frozen
class EndpointStatus:
    account: str
    uid: int
    config_key: str
    endpoint: str
    state: str
    pid: int | None
    started_at: float | None
    idle_since: float | None
    in_flight: int

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def error_from_frame(header: Mapping[str, Any]) -> MepError:
    """Rebuild the user endpoint's structured error; unknown reasons become start_failed."""
    reason = header.get("reason")
    if not isinstance(reason, str) or reason not in REASONS:
        reason = "spawn.start_failed"
    detail = header.get("detail")
    detail = detail[:4096] if isinstance(detail, str) else ""
    message = header.get("message")
    public = message[:1024] if isinstance(message, str) and message else None
    violations: list[Violation] = []
    raw = header.get("violations")
    if isinstance(raw, list):
        for item in raw[:200]:
            if isinstance(item, dict) and isinstance(item.get("path"), str):
                violations.append(
                    Violation(
                        str(item["path"])[:512],
                        str(item.get("message", ""))[:1024],
                        str(item.get("code", "invalid"))[:64],
                    )
                )
    cls: type[MepError]
    if reason.startswith("config."):
        cls = (
            TemplateConfigError
            if header.get("error_class") == "TemplateConfigError"
            else ConfigError
        )
    else:
        cls = SpawnError
    return cls(
        reason,
        f"user endpoint: {detail}",
        public_message=public,
        violations=violations,
        context=_log_context(header),
    )


def _log_context(header: Mapping[str, Any]) -> dict[str, Any]:
    """The user's endpoint log a failed start names (path, last lines), bounded."""
    path, tail = header.get("log_path"), header.get("log_tail")
    if not isinstance(path, str) or not isinstance(tail, list):
        return {}
    lines = [line[:500] for line in tail[-50:] if isinstance(line, str)]
    return {"log": {"path": path[:4096], "tail": lines}}


@attrs.define(eq=False)
class UserEndpointHandle:
    """One user endpoint as the daemon sees it. Created and driven by ``Registry``.

    It is bound to the account (uid, gid, name, groups) it was started for."""

    id: str
    account: Account
    config_key: str
    endpoint: str
    state: str = "starting"
    process: LaunchedProcess | None = None
    channel: AsyncChannel | None = None
    started_at: float | None = None
    idle_since: float | None = None
    exit_reason: str | None = None
    session_open: bool = False
    _registry: Registry | None = None
    _sent_functions: set[str] = attrs.field(factory=set)
    _cancelled: set[str] = attrs.field(factory=set)
    _ready: asyncio.Future[Mapping[str, Any]] | None = None
    _requests: dict[int, asyncio.Future[dict[str, Any]]] = attrs.field(factory=dict)
    _request_ids: itertools.count[int] = attrs.field(factory=itertools.count)
    _watch_fd: int = -1
    _stopper: asyncio.Task[None] | None = None
    _closed: asyncio.Event = attrs.field(factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    # ----------------------------------------------------------------- API

    @property
    def in_flight(self) -> int:
        """How many tasks this user endpoint is running (from the daemon's one table)."""
        return self._live_registry().in_flight.count_endpoint(self.id)

    def missing_functions(self, function_ids: Sequence[str]) -> list[str]:
        return [f for f in function_ids if f not in self._sent_functions]

    def register_function(self, function_id: str, payload: bytes) -> None:
        """Send a function body once; later calls with the same id do nothing."""
        if function_id in self._sent_functions:
            return
        self._live_channel().send("function", {"items": [{"function_id": function_id}]}, [payload])
        self._sent_functions.add(function_id)

    def dispatch(self, tasks: Sequence[DispatchTask]) -> None:
        """Send tasks in as few frames as the limits allow; each is then in flight here."""
        channel = self._live_channel()
        registry = self._live_registry()
        frames = [
            (
                TaskEnvelope(
                    t.task_id,
                    t.function_id,
                    t.payload,
                    t.walltime,
                    resource_specification=t.resources,
                ).to_header(),
                t.payload,
            )
            for t in tasks
        ]
        for buffers in batch_frames("task", frames, limits=channel.limits):
            channel.send_buffers(buffers)
        now = registry.clock()
        registry.in_flight.add(
            InFlightTask(t.task_id, t.owner, self.account.name, t.function_id, self.id, now)
            for t in tasks
        )
        self.idle_since = None

    def welcome(self, want: Sequence[str]) -> None:
        """Answer an adopted endpoint's hello: the held tasks whose results are wanted."""
        self._live_channel().send("adopt", {"want": list(want)})

    def cancel(self, task_ids: Sequence[str]) -> None:
        """Ask the user endpoint to stop these tasks; their late results are dropped
        quietly (the daemon has recorded them cancelled already)."""
        self._cancelled.update(task_ids)
        self._live_channel().send("cancel", {"task_ids": list(task_ids)})

    async def introspect(self, timeout: float = 10.0) -> dict[str, Any]:
        """The user endpoint's process identity (uid, groups, fds, limits…)."""
        channel = self._live_channel()
        request_id = next(self._request_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            channel.send("introspect", {"request_id": request_id})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._requests.pop(request_id, None)

    async def wait_closed(self) -> None:
        """Until the user endpoint is gone (channel closed or process exited)."""
        await self._closed.wait()

    def status(self) -> EndpointStatus:
        return EndpointStatus(
            account=self.account.name,
            uid=self.account.uid,
            config_key=self.config_key,
            endpoint=self.endpoint,
            state=self.state,
            pid=self.pid,
            started_at=self.started_at,
            idle_since=self.idle_since,
            in_flight=self.in_flight,
        )

    def _live_registry(self) -> Registry:
        if self._registry is None:
            raise ChannelError("channel.closed", f"user endpoint {self.id} has no registry")
        return self._registry

    def _live_channel(self) -> AsyncChannel:
        if (
            self.channel is None
            or self.channel.is_closed
            or self.state not in ("ready", "starting")
        ):
            raise ChannelError("channel.closed", f"user endpoint {self.id} is {self.state}")
        return self.channel

    # ----------------------------------------------------------------- events

    def _on_frame(self, frame: Frame) -> None:
        kind = frame.kind
        try:
            if kind == "result":
                self._on_results(frame)
            elif kind == "heartbeat":
                pass
            elif kind == "ready" and self._ready is not None and not self._ready.done():
                self._ready.set_result(dict(frame.header))
            elif kind == "error":
                err = error_from_frame(frame.header)
                if self._ready is not None and not self._ready.done():
                    self._ready.set_exception(err)
                else:
                    log.warning(
                        "uep.error_reported", uep=self.id, reason=err.reason, detail=err.detail
                    )
            elif kind == "introspect":
                future = self._requests.get(frame.header.get("request_id"))  # type: ignore[arg-type]
                answer = frame.header.get("answer")
                if future is not None and not future.done() and isinstance(answer, dict):
                    future.set_result(answer)
            elif kind == "exiting":
                reason = frame.header.get("reason")
                self.exit_reason = str(reason)[:_MAX_REASON_CHARS] if reason else "unknown"
                log.info("uep.exiting", uep=self.id, reason=self.exit_reason)
            else:
                raise ChannelError("channel.frame_invalid", f"unexpected {kind} frame")
        except ChannelError as exc:
            log.warning("channel.frame_refused", uep=self.id, reason=exc.reason, detail=exc.detail)
            if self.channel is not None:
                self.channel.close()

    def _on_results(self, frame: Frame) -> None:
        items = check_items(frame)
        registry = self._live_registry()
        for header, payload in zip(items, frame.parts(), strict=True):
            # Only a task given to *this* user endpoint: a user's process cannot complete
            # another user's tasks.
            record = registry.in_flight.take(header["task_id"], endpoint_id=self.id)
            if record is None and header["task_id"] in self._cancelled:
                self._cancelled.discard(header["task_id"])
                continue
            if record is None:
                log.warning("channel.result_refused", uep=self.id, task_id=header["task_id"][:128])
                continue
            checked, payload = _checked_result(header, payload)
            try:
                registry.on_result(record, checked, payload)
            except Exception:
                log.exception("registry.on_result_failed", uep=self.id)
        if not self.in_flight:
            self.idle_since = registry.clock()

    def _on_close(self, exc: BaseException | None) -> None:
        if isinstance(exc, ChannelError):
            log.warning(
                "channel.closed_malformed", uep=self.id, reason=exc.reason, detail=exc.detail
            )
        self._gone("channel closed")

    def _on_exit(self) -> None:
        # The process is gone but its last frames (results, ``exiting``) may still be in
        # the socket buffer, unread: handle them before declaring anything lost.
        if self.channel is not None:
            self.channel.read_pending()
        self._gone("process exited")

    def _gone(self, why: str) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        registry = self._live_registry()
        loop = asyncio.get_running_loop()
        if self._watch_fd >= 0:
            loop.remove_reader(self._watch_fd)
            os.close(self._watch_fd)
            self._watch_fd = -1
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                SpawnError(
                    "spawn.start_failed", f"user endpoint {self.id} ended before ready ({why})"
                )
            )
        for future in self._requests.values():
            if not future.done():
                future.set_exception(ChannelError("channel.closed", why))
        was = self.state
        self.state = "stopped" if was in ("stopping", "draining") else "lost"
        registry._forget(self)
        lost = registry.in_flight.take_endpoint(self.id)
        if lost:
            try:
                registry.on_lost(lost, "task.endpoint_lost")
            except Exception:
                log.exception("registry.on_lost_failed", uep=self.id)
        if was == "ready":
            log.warning(
                "uep.lost", uep=self.id, why=why, exit_reason=self.exit_reason, lost=len(lost)
            )
        if registry.on_exit is not None:
            try:
                registry.on_exit(self, self.exit_reason or why)
            except Exception:
                log.exception("registry.on_exit_failed", uep=self.id)
        if self.channel is not None:
            self.channel.close()
        self.ensure_stopped(None, registry.limits.stop_grace)
        registry.reap_adopted()

    def ensure_stopped(self, reason: str | None, grace: float) -> asyncio.Task[None]:
        """The one task that takes this user endpoint down the stop ladder and reaps it."""
        if self._stopper is None:
            self._stopper = asyncio.get_running_loop().create_task(self._stop(reason, grace))
        return self._stopper

    async def _stop(self, reason: str | None, grace: float) -> None:
        try:
            await self._stop_process(reason, grace)
        finally:
            await self.close_session()

    async def close_session(self) -> None:
        """Close the PAM session of this user endpoint, once, after its process."""
        registry = self._registry
        if self.session_open and registry is not None and registry.sessions is not None:
            self.session_open = False
            await registry.sessions.close(self.account)

    async def _stop_process(self, reason: str | None, grace: float) -> None:
        if self.process is None:
            return
        channel = self.channel

        def ask() -> None:
            if reason is not None and channel is not None and not channel.is_closed:
                channel.send("stop", {"reason": reason})

        try:
            outcome = await stop_ladder(self.process, ask=ask, grace=grace)
        finally:
            if self._registry is not None:
                self._registry._unreaped.discard(self.process.pid)
                if self._registry.adoption is not None:
                    self._registry.adoption.ended(self)
        log.info(
            "uep.stopped",
            uep=self.id,
            account=self.account.name,
            pid=self.process.pid,
            step=outcome.step,
            returncode=outcome.returncode,
            reason=reason or self.exit_reason,
        )


def _checked_result(header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """The result as sent if its header is valid, else a failed result saying so.

    Only the header is checked (``ResultEnvelope.from_header`` never loads a payload):
    the user endpoint runs as the user, so the daemon stores nothing it did not check.
    """
    try:
        ResultEnvelope.from_header(header, payload)  # validates; keys are exactly known
        return header, payload
    except MepError as exc:
        now = time.time()
        failed = ResultEnvelope(
            task_id=str(header["task_id"]),
            status="failed",
            error=RemoteError.of("task.envelope_invalid", exc.public_message),
            received=now,
            started=now,
            finished=now,
        )
        return failed.to_header(), b""
