"""The request pipeline: one method per route, each a short walk through the rooms.

A submit is: shape (``mepd.shapes``) → decision (``mepd.admission``: map, authorize,
validate) → user endpoint (``UserEndpoints`` port: get or start) → audit, store,
dispatch; results come back through ``mepd.delivery``. Every step that refuses raises a
``MepError`` with a reason code; the HTTP layer (``mepd.api``) turns it into a status
code and the public message. Every decision is written to the audit log *before* the
work it allows happens; if the audit log cannot be written, nothing is accepted.

The pipeline talks to the site and the user endpoints through ports (``Site`` in
``mepd.admission``, ``UserEndpoints`` and ``Handle`` here) so it can be tested with
fakes; ``mepd.daemon`` adapts the real components. Payloads are opaque bytes here
(DESIGN.md §3.4).

Deliberately not here: HTTP parsing and status codes (``mepd.api``), loading files
(``mepd.daemon``), process management (``mepd.registry``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import structlog

from mepcore.errors import ApiError, AuthError, MepError, TaskError, Violation
from mepcore.types import Account
from mepd.admission import (
    READ_STATUS,
    STOP_OTHER,
    STOP_OWN,
    Admission,
    Admitted,
    RequestKind,
    Site,
    check_resources,
)
from mepd.audit import AuditSink, AuditUnavailable
from mepd.auth import Caller
from mepd.delivery import Delivery, task_view
from mepd.inflight import DispatchTask, InFlight, InFlightTask
from mepd.metrics import Labels, Metrics, labels
from mepd.settings import Limits
from mepd.shapes import (
    FUNCTION_SCHEMA,
    STOP_SCHEMA,
    WAIT_SCHEMA,
    RequestError,
    SubmitRequest,
    b64decode,
    check_shape,
    payload_chars,
    wait_shape_ok,
)
from mepd.store import NewTask, QueuedTask, TaskStore

log = structlog.get_logger("mepd.pipeline")

# A JSON submit carrying more base64 than this is decoded in a worker thread.
OFF_LOOP_CHARS = 128 * 1024
# Function ids remembered as registered (``Pipeline._check_registered``).
KNOWN_FUNCTIONS = 100_000


def function_bytes(body: Any, frames: list[bytes] | None) -> bytes:
    """The function a registration carries: base64 ``function`` in a JSON body, or the
    one frame of a frames body (whose header then has no ``function``)."""
    if frames is None:
        check_shape(body, FUNCTION_SCHEMA)
        return b64decode(body["function"], "$.function")
    if type(body) is dict and "function" in body:
        raise RequestError(
            "api.bad_request",
            "function in a frames header",
            violations=[Violation("$.function", "the function travels as frame 0")],
        )
    if len(frames) != 1 or not frames[0]:
        found = "an empty frame" if len(frames) == 1 else f"{len(frames)} frames"
        raise RequestError(
            "api.bad_request",
            "a function registration takes one frame",
            violations=[Violation("$frames.count", f"one non-empty frame expected, {found}")],
        )
    check_shape({**body, "function": "x"} if type(body) is dict else body, FUNCTION_SCHEMA)
    return frames[0]


def new_task_ids(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs in their usual text form, as
    ``str(uuid.uuid4())`` makes them, from one read of the system's random source (a
    batch makes thousands; ``uuid4`` reads it once for each and builds an object)."""
    pool = os.urandom(16 * count)
    ids = []
    for start in range(0, 16 * count, 16):
        raw = bytearray(pool[start : start + 16])
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
        h = raw.hex()
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids


# -- ports ------------------------------------------------------------------------------


class Handle(Protocol):
    """A running user endpoint."""

    @property
    def id(self) -> str: ...

    def missing_functions(self, function_ids: Sequence[str]) -> list[str]:
        """The ids among ``function_ids`` this user endpoint has not been sent yet."""
        ...

    def register_function(self, function_id: str, payload: bytes) -> None: ...

    def dispatch(self, tasks: Sequence[DispatchTask]) -> None:
        """Send tasks; each becomes an ``InFlightTask`` of this user endpoint."""
        ...


class UserEndpoints(Protocol):
    async def get_or_start(self, admitted: Admitted) -> Handle: ...

    def status(self, account_name: str | None) -> list[dict[str, Any]]: ...

    async def stop(self, account_name: str, endpoint: str, reason: str) -> int: ...

    async def introspect(self, account_name: str, endpoint: str) -> list[dict[str, Any]]: ...

    def cancel(self, endpoint_id: str, task_ids: Sequence[str]) -> bool:
        """Ask a user endpoint to stop tasks it runs; False if it is gone."""
        ...

    async def read_log(self, account: Account, endpoint: str, lines: int) -> dict[str, Any]:
        """The last lines of the account's endpoint log, read as the account."""
        ...


class Authenticate(Protocol):
    async def authenticate(self, authorization: str | None) -> Caller: ...

    def login_metadata(self) -> dict[str, Any]: ...


SiteLookup = Callable[[str], Site | None]


# -- the pipeline -----------------------------------------------------------------------


@attrs.define
class Pipeline:
    """The daemon's request handling (one per running daemon). Build with ``create``."""

    store: TaskStore
    audit: AuditSink
    authenticator: Authenticate
    ueps: UserEndpoints
    limits: Limits
    site_of: SiteLookup
    in_flight: InFlight
    metrics: Metrics
    admission: Admission
    delivery: Delivery
    draining: bool = False
    # Function ids the store has confirmed (the store never deletes a function), so a
    # submit of a known function does not ask it again; bounded by ``KNOWN_FUNCTIONS``.
    _known: set[str] = attrs.field(factory=set, init=False)

    @classmethod
    def create(
        cls,
        *,
        store: TaskStore,
        audit: AuditSink,
        authenticator: Authenticate,
        ueps: UserEndpoints,
        limits: Limits,
        site_of: SiteLookup,
        delivery: Delivery | None = None,
    ) -> Pipeline:
        """A pipeline; its ``Delivery`` (with the in-flight table and the metrics) is
        made here unless the daemon made it first to wire the registry to it."""
        if delivery is None:
            delivery = Delivery(store, audit, InFlight(), Metrics(), limits.max_result_bytes)
        pipeline = cls(
            store,
            audit,
            authenticator,
            ueps,
            limits,
            site_of,
            delivery.in_flight,
            delivery.metrics,
            Admission(audit, delivery.metrics),
            delivery,
        )
        pipeline._register_gauges()
        return pipeline

    def _register_gauges(self) -> None:
        self.metrics.gauge(
            "mepd_tasks_in_flight",
            "tasks dispatched and not finished",
            lambda: {labels(): float(self.in_flight.dispatched())},
        )
        self.metrics.gauge(
            "mepd_audit_available",
            "1 if the audit log can be written",
            lambda: {labels(): 1.0 if self.audit.available else 0.0},
        )
        self.metrics.gauge(
            "mepd_tasks_pending",
            "tasks accepted and not finished, by account",
            self.pending_by_account,
        )

    # -- the common front half ----------------------------------------------------------

    def _refuse_if_unavailable(self) -> None:
        if self.draining:
            raise ApiError("api.shutting_down", "daemon is draining")
        if not self.audit.available:
            raise AuditUnavailable(detail="audit log unavailable")

    async def authenticate(self, authorization: str | None, *, route: str) -> Caller:
        try:
            return await self.authenticator.authenticate(authorization)
        except AuthError as exc:
            self.metrics.auth_failures.inc(reason=exc.reason)
            self.audit.record("auth.failed", reason=exc.reason, detail=exc.detail, route=route)
            raise

    def _site(self, endpoint: str) -> Site:
        site = self.site_of(endpoint)
        if site is None:
            raise ApiError("api.endpoint_unknown", f"no endpoint {endpoint!r}")
        return site

    # -- functions --------------------------------------------------------------------

    async def register_function(
        self, caller: Caller, body: Any, frames: list[bytes] | None = None
    ) -> dict[str, Any]:
        """Store a function (base64 in ``function``, or a frames body's one frame)."""
        self._refuse_if_unavailable()
        data = function_bytes(body, frames)
        if len(data) > self.limits.max_payload_bytes:
            raise TaskError("task.payload_too_large", "function too large")
        function_id = hashlib.sha256(data).hexdigest()
        created = await self.store.commit_function(
            function_id, data, body.get("name"), body.get("source"), time.time()
        )
        if created:
            self.audit.record(
                "function.registered",
                function_id=function_id,
                identity=caller.identities.primary.id,
                name=body.get("name"),
            )
        return {"function_id": function_id}

    # -- submit -----------------------------------------------------------------------

    async def submit(
        self, caller: Caller, endpoint: str, body: Any, frames: list[bytes] | None = None
    ) -> dict[str, Any]:
        """Shape → decision → user endpoint → audit, store, dispatch."""
        self._refuse_if_unavailable()
        site = self._site(endpoint)
        if frames is None and payload_chars(body) > OFF_LOOP_CHARS:
            # A megabyte of base64 is decoded in a worker thread, not on the event loop.
            request = await asyncio.to_thread(SubmitRequest.from_body, body, self.limits)
        else:
            request = SubmitRequest.from_body(body, self.limits, frames)
        admitted = await self.admission.admit_submit(
            site, caller, request.function_ids, request.variables, request.user_runtime
        )
        check_resources(site, admitted.account, [t.resources for t in request.tasks])
        self._check_registered(request.function_ids)
        self._check_queue_room(admitted.account.name, len(request.tasks))
        handle = await self.ueps.get_or_start(admitted)
        self._refuse_if_unavailable()  # the start may have taken a while
        self._send_functions(handle, request.function_ids)
        walltime_cap = self.limits.max_walltime
        new = [
            NewTask(
                task_id=task_id,
                owner=caller.owner,
                endpoint=site.name,
                account=admitted.account.name,
                spec_id=admitted.spec.spec_id,
                function_id=task.function_id,
                payload=task.payload,
                walltime=min(task.walltime or walltime_cap, walltime_cap),
                resources=None if task.resources is None else task.resources.to_dict(),
                uep_id=handle.id,
            )
            for task, task_id in zip(request.tasks, new_task_ids(len(request.tasks)), strict=True)
        ]
        written = self._accept(admitted, new)
        if written.done():  # committed inline (or refused): no hand-off, no wait
            written.result()
            self._accepted(handle, new)
        else:
            # Shielded: once the commit is asked for, the tasks are dispatched even if
            # this request is given up meanwhile (a committed task is never left behind).
            await asyncio.shield(self._dispatch_when_written(written, handle, new))
        return {"task_ids": [t.task_id for t in new]}

    async def _dispatch_when_written(
        self, written: asyncio.Future[None], handle: Handle, new: Sequence[NewTask]
    ) -> None:
        await written
        self._accepted(handle, new)

    def _accepted(self, handle: Handle, new: Sequence[NewTask]) -> None:
        self.metrics.tasks.inc(len(new), state="received")
        self._dispatch(handle, new)

    def _check_registered(self, function_ids: Sequence[str]) -> None:
        ask = [f for f in function_ids if f not in self._known]
        if not ask:
            return
        known = self.store.known_functions(ask)
        if len(self._known) + len(known) > KNOWN_FUNCTIONS:
            self._known.clear()
        self._known.update(known)
        unknown = [f for f in ask if f not in known]
        if unknown:
            raise TaskError(
                "task.function_unknown",
                f"unknown functions {unknown}",
                violations=[
                    Violation("$.tasks", f"function {f} is not registered") for f in unknown[:20]
                ],
            )

    def _check_queue_room(self, account: str, count: int) -> None:
        if self.in_flight.count_account(account) + count > self.limits.queued_tasks_per_user:
            raise ApiError("api.too_many_requests", "queued task limit reached")

    def _accept(self, admitted: Admitted, new: Sequence[NewTask]) -> asyncio.Future[None]:
        """Audit, then store: a task the audit log cannot record is not accepted. The
        tasks (with their payloads) and the spec are committed in one transaction by
        the store's writer thread, grouped with whatever else is being written (a small
        batch at once when it is idle); the answer waits for that commit (the returned
        future), the event loop does not."""
        self.audit.record_many(
            (
                "task.received",
                {
                    "task_id": t.task_id,
                    "function_id": t.function_id,
                    "account": t.account,
                    "endpoint": t.endpoint,
                    "config_key": admitted.config_key,
                },
            )
            for t in new
        )
        # Inserted as dispatched in one committed transaction: if the daemon dies before
        # the frames leave, the restart reports them as task.endpoint_lost, never twice run.
        return self.store.queue_tasks(new, state="dispatched", now=time.time(), spec=admitted.spec)

    def _send_functions(self, handle: Handle, function_ids: Sequence[str]) -> None:
        for fid in handle.missing_functions(function_ids):
            body = self.store.get_function(fid)
            if body is None:
                raise TaskError("task.function_unknown", f"function {fid} vanished")
            handle.register_function(fid, body)

    def _dispatch(self, handle: Handle, tasks: Sequence[NewTask]) -> None:
        try:
            handle.dispatch(
                [
                    DispatchTask(
                        t.task_id, t.owner, t.function_id, t.payload, t.walltime, t.resources
                    )
                    for t in tasks
                ]
            )
        except Exception as exc:
            log.warning("task.dispatch_failed", error=str(exc), count=len(tasks))
            self.delivery.fail([t.task_id for t in tasks], "task.endpoint_lost")
            return
        self.audit.record_many(("task.started", {"task_id": t.task_id}) for t in tasks)

    # -- re-dispatch after a restart ---------------------------------------------------

    def hold_queued(self, queued: Sequence[QueuedTask]) -> None:
        """Tasks accepted before a restart and not dispatched: in flight, in the daemon."""
        now = time.time()
        self.in_flight.add(
            InFlightTask(q.task_id, q.owner, q.account, q.function_id, None, now) for q in queued
        )

    async def redispatch(self, queued: Sequence[QueuedTask]) -> None:
        """Dispatch tasks that were accepted but not dispatched before a restart."""
        groups: dict[str, list[QueuedTask]] = {}
        for q in queued:
            groups.setdefault(q.spec_id, []).append(q)
        for spec_id, items in groups.items():
            try:
                await self._redispatch_group(spec_id, items)
            except MepError as exc:
                log.warning("task.redispatch_failed", reason=exc.admin_reason, detail=exc.detail)
                self.delivery.fail([q.task_id for q in items], exc.reason)

    async def _redispatch_group(self, spec_id: str, items: Sequence[QueuedTask]) -> None:
        spec = self.store.get_spec(spec_id)
        if spec is None:
            raise TaskError("task.endpoint_lost", "spec missing")
        admitted = await self.admission.admit_again(self._site(spec.endpoint), spec)
        handle = await self.ueps.get_or_start(admitted)
        self._send_functions(handle, list(dict.fromkeys(q.function_id for q in items)))
        # Still queued: not cancelled meanwhile.
        still = [q for q in items if self.in_flight.get(q.task_id) is not None]
        self.store.mark_dispatched([q.task_id for q in still], handle.id)
        self._dispatch(
            handle,
            [
                NewTask(
                    q.task_id,
                    q.owner,
                    spec.endpoint,
                    admitted.account.name,
                    spec_id,
                    q.function_id,
                    q.payload,
                    q.walltime,
                    resources=q.resources,
                )
                for q in still
            ],
        )

    # -- results ----------------------------------------------------------------------

    def get_task(
        self, caller: Caller, task_id: str, frames: list[bytes] | None = None
    ) -> dict[str, Any]:
        """The caller's task (its result into ``frames`` when given: ``task_view``)."""
        found = self.delivery.records([task_id])
        return task_view(self.delivery.owned(caller, found[0] if found else None), frames)

    async def wait(
        self, caller: Caller, body: Any, frames: list[bytes] | None = None
    ) -> dict[str, Any]:
        if not wait_shape_ok(body):
            check_shape(body, WAIT_SCHEMA)
            raise RequestError("api.bad_request", "request body invalid")
        ids = list(dict.fromkeys(body["task_ids"]))
        timeout = min(float(body.get("timeout", 10.0)), self.limits.max_wait_timeout)
        return (await self.delivery.wait(caller, ids, timeout, frames)).to_dict()

    def cancel(self, caller: Caller, task_id: str) -> dict[str, Any]:
        """Cancel a task wherever it is: queued here, or at its user endpoint (queued
        there or running: the endpoint stops it). The store records it cancelled now;
        the endpoint's late answer is dropped. A final task is returned unchanged."""
        self._refuse_if_unavailable()
        record = self.delivery.owned(caller, self.store.get(task_id))
        if record.is_final:
            return task_view(record)
        flight = self.in_flight.get(task_id)
        if flight is not None and flight.endpoint_id is not None:
            told = self.ueps.cancel(flight.endpoint_id, [task_id])
            log.info("task.cancel_requested", task_id=task_id, endpoint_told=told)
        self.delivery.fail([task_id], "task.cancelled")
        return self.get_task(caller, task_id)

    # -- status and stop ----------------------------------------------------------------

    async def _own_account(
        self, caller: Caller, endpoint: str, kind: RequestKind
    ) -> tuple[Site, Account]:
        site = self._site(endpoint)
        account = await self.admission.account_of(site, caller)
        self.admission.authorize(site, caller, account, [kind.check(account=account.name)])
        return site, account

    async def status(self, caller: Caller, endpoint: str) -> dict[str, Any]:
        site, account = await self._own_account(caller, endpoint, READ_STATUS)
        entries = [
            e for e in self.ueps.status(account.name) if e.get("endpoint") in (None, site.name)
        ]
        return {"endpoint": site.name, "user_endpoints": entries}

    async def introspect(self, caller: Caller, endpoint: str) -> dict[str, Any]:
        """The process identity of the caller's own ready user endpoints (uid, groups,
        umask, descriptors, limits, capabilities…), as each one reports it."""
        site, account = await self._own_account(caller, endpoint, READ_STATUS)
        entries = await self.ueps.introspect(account.name, site.name)
        return {"endpoint": site.name, "user_endpoints": entries}

    async def read_log(self, caller: Caller, endpoint: str, lines: Any) -> dict[str, Any]:
        """The tail of the caller's own endpoint log (``lines``: 1 to 5000, 200 when
        absent), read as the caller's account."""
        try:
            count = 200 if lines is None else int(lines)
        except ValueError:
            count = 0
        if not 1 <= count <= 5000:
            raise RequestError("api.bad_request", "lines must be an integer from 1 to 5000")
        site, account = await self._own_account(caller, endpoint, READ_STATUS)
        self.audit.record(
            "uep.log_read",
            endpoint=site.name,
            identity=caller.identities.primary.id,
            account=account.name,
            lines=count,
        )
        return {"endpoint": site.name, **await self.ueps.read_log(account, site.name, count)}

    async def stop(self, caller: Caller, endpoint: str, body: Any) -> dict[str, Any]:
        site = self._site(endpoint)
        check_shape(body or {}, STOP_SCHEMA)
        account = await self.admission.account_of(site, caller)
        target = (body or {}).get("account") or account.name
        check = STOP_OWN.check(account=account.name)
        if target != account.name:
            check = STOP_OTHER.check()
        self.admission.authorize(site, caller, account, [check])
        self.audit.record(
            "uep.stop_requested",
            endpoint=site.name,
            identity=caller.identities.primary.id,
            account=target,
        )
        stopped = await self.ueps.stop(target, site.name, "stopped by caller")
        return {"stopped": stopped}

    # -- drain ------------------------------------------------------------------------

    async def drain(self, timeout: float) -> int:
        """Refuse new work and wait (bounded) for in-flight tasks; returns how many remain."""
        self.draining = True
        return await self.delivery.until_idle(timeout)

    def pending_by_account(self) -> Mapping[Labels, float]:
        return {labels(account=a): float(n) for a, n in self.in_flight.by_account().items()}
