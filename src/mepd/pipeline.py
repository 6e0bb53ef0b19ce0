"""The request pipeline: authenticate → map → authorize → validate → get or start the
user endpoint → persist → dispatch; and the way back: results → store → waiters.

The pipeline talks to the site's components through small ports (``Site``,
``UserEndpoints``, ``Handle``) so it can be tested with fakes; ``mepd.daemon`` adapts
the real mepcore components and the registry to them. Every step that refuses raises a
``MepError`` with a reason code; the HTTP layer (``mepd.api``) turns it into a status
code and the public message. Every decision is written to the audit log *before* the
work it allows happens; if the audit log cannot be written, nothing is accepted.

Payloads and results are opaque bytes here (DESIGN.md §3.4). Waiting is event-driven:
a waiter registers an ``asyncio.Event`` per task id and is woken when a result batch
is committed, never by polling the database.

Deliberately not here: HTTP parsing and status codes (``mepd.api``), loading files
(``mepd.daemon``), process management (the registry).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
import uuid
from collections import Counter as TallyCounter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import structlog

from mepcore.errors import (
    REASONS,
    ApiError,
    AuthError,
    AuthzError,
    ConfigError,
    IdentityError,
    MepError,
    TaskError,
    Violation,
)
from mepcore.types import Account, IdentitySet
from mepd.audit import AuditSink, AuditUnavailable
from mepd.auth import Caller
from mepd.metrics import Labels, Metrics, labels
from mepd.settings import Limits
from mepd.shapes import (
    FUNCTION_SCHEMA,
    STOP_SCHEMA,
    SUBMIT_SCHEMA,
    WAIT_SCHEMA,
    RequestError,
    b64decode,
    check_shape,
    submit_shape_ok,
    wait_shape_ok,
)
from mepd.store import NewTask, Outcome, Spec, TaskRecord, TaskStore

log = structlog.get_logger("mepd.pipeline")

# -- ports ------------------------------------------------------------------------------


@attrs.frozen
class DecisionView:
    """What the pipeline needs of an authorization decision."""

    allowed: bool
    reason: str
    lines: tuple[str, ...] = ()
    policy_version: str = ""


class Site(Protocol):
    """One configured endpoint with its loaded files (mapping, policy, template…)."""

    @property
    def name(self) -> str: ...

    @property
    def template_name(self) -> str: ...

    @property
    def allowed_functions(self) -> frozenset[str] | None: ...

    @property
    def mapping_blocks(self) -> bool:
        """True when mapping may run a program (then it runs off the event loop)."""
        ...

    def map_identity(self, identities: IdentitySet) -> str | None: ...

    def check_account(self, name: str) -> Account: ...

    def decide(
        self,
        obj: str,
        action: str,
        principals: Sequence[str],
        *,
        mfa: bool,
        auth_age: float | None,
        uid: int | None,
    ) -> DecisionView: ...

    def validate_variables(self, variables: Mapping[str, Any]) -> dict[str, Any]: ...

    def config_key(self, account: Account, variables: Mapping[str, Any]) -> str: ...


@attrs.frozen
class DispatchTask:
    task_id: str
    function_id: str
    payload: bytes
    walltime: float | None


class Handle(Protocol):
    """A running user endpoint."""

    def register_function(self, function_id: str, payload: bytes) -> None: ...

    def dispatch(self, tasks: Sequence[DispatchTask]) -> None: ...


@attrs.frozen
class StartSpec:
    site: Site
    account: Account
    config_key: str
    variables: dict[str, Any]
    identity: dict[str, Any]
    user_runtime: dict[str, Any]


class UserEndpoints(Protocol):
    async def get_or_start(self, spec: StartSpec) -> Handle: ...

    def status(self, account_name: str | None) -> list[dict[str, Any]]: ...

    async def stop(self, account_name: str, endpoint: str, reason: str) -> int: ...

    async def introspect(self, account_name: str, endpoint: str) -> list[dict[str, Any]]: ...


class Authenticate(Protocol):
    async def authenticate(self, authorization: str | None) -> Caller: ...


def principals_of(caller: Caller, account: Account | None) -> list[str]:
    out: list[str] = []
    for ident in caller.identities:
        out.append(f"id:{ident.id}")
        if ident.username:
            out.append(f"username:{ident.username}")
        if ident.domain:
            out.append(f"domain:{ident.domain}")
    if account is not None:
        out.append(f"user:{account.name}")
        out += [f"group:{g}" for g in account.group_names]
    return list(dict.fromkeys(out))


# -- the pipeline ---------------------------------------------------------------------

_NOBODY = ("", "", 0.0, "")


@attrs.define(eq=False)
class _Waiter:
    """One long-poll: woken with the ids that finished since it last looked."""

    event: asyncio.Event = attrs.field(factory=asyncio.Event)
    fired: set[str] = attrs.field(factory=set)


@attrs.define
class Pipeline:
    """The daemon's request handling and result delivery (one per running daemon)."""

    store: TaskStore
    audit: AuditSink
    authenticator: Authenticate
    ueps: UserEndpoints
    limits: Limits
    metrics: Metrics = attrs.field(factory=Metrics)
    sites: dict[str, Site] = attrs.field(factory=dict)
    draining: bool = False
    # task id -> (account, function id, dispatched at, owner)
    _inflight: dict[str, tuple[str, str, float, str]] = attrs.field(factory=dict)
    _pending: TallyCounter[str] = attrs.field(factory=TallyCounter)
    _waiters: dict[str, set[_Waiter]] = attrs.field(factory=dict)
    _outbox: list[Outcome] = attrs.field(factory=list)
    _flush_scheduled: bool = False
    _idle: asyncio.Event | None = None
    _registered: dict[int, tuple[Handle, set[str]]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.metrics.gauge(
            "mepd_tasks_in_flight",
            "tasks dispatched and not finished",
            lambda: {labels(): float(len(self._inflight))},
        )
        self.metrics.gauge(
            "mepd_audit_available",
            "1 if the audit log can be written",
            lambda: {labels(): 1.0 if self.audit.available else 0.0},
        )

    # -- startup ----------------------------------------------------------------------

    def load_pending_counts(self) -> None:
        self._pending = TallyCounter(self.store.pending_by_account())

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
        site = self.sites.get(endpoint)
        if site is None:
            raise ApiError("api.endpoint_unknown", f"no endpoint {endpoint!r}")
        return site

    async def _map(self, site: Site, caller: Caller) -> Account:
        audit_ids = [i.id for i in caller.identities]
        try:
            if site.mapping_blocks:
                # An external mapping program may run for seconds: not on the loop.
                name = await asyncio.to_thread(site.map_identity, caller.identities)
            else:
                name = site.map_identity(caller.identities)
            if name is None:
                raise IdentityError("identity.no_mapping", "no mapping rule matched")
            account = site.check_account(name)
        except IdentityError as exc:
            self.audit.record(
                "identity.mapping_failed",
                endpoint=site.name,
                identities=audit_ids,
                reason=exc.reason,
                detail=exc.detail,
            )
            raise
        self.audit.record(
            "identity.mapping_resolved",
            endpoint=site.name,
            identities=audit_ids,
            account=account.name,
            uid=account.uid,
        )
        return account

    def _authorize(
        self,
        site: Site,
        caller: Caller,
        account: Account,
        checks: Iterable[tuple[str, str]],
    ) -> None:
        principals = principals_of(caller, account)
        now = time.time()
        for obj, action in checks:
            decision = site.decide(
                obj,
                action,
                principals,
                mfa=caller.mfa,
                auth_age=caller.auth_age(now),
                uid=account.uid,
            )
            self.metrics.decisions.inc(action=action, allowed=str(decision.allowed).lower())
            self.audit.record(
                "authz.decided",
                endpoint=site.name,
                identity=caller.identities.primary.id,
                account=account.name,
                object=obj,
                action=action,
                allowed=decision.allowed,
                reason=decision.reason,
                lines=list(decision.lines),
                policy_version=decision.policy_version,
            )
            if not decision.allowed:
                reason = decision.reason if decision.reason in REASONS else "authz.denied"
                if not reason.startswith("authz.") or reason == "authz.allowed":
                    reason = "authz.denied"
                raise AuthzError(reason, f"{action} on {obj} denied")

    # -- functions --------------------------------------------------------------------

    async def register_function(self, caller: Caller, body: Any) -> dict[str, Any]:
        self._refuse_if_unavailable()
        check_shape(body, FUNCTION_SCHEMA)
        data = b64decode(body["function"], "$.function")
        if len(data) > self.limits.max_payload_bytes:
            raise TaskError("task.payload_too_large", "function too large")
        function_id = hashlib.sha256(data).hexdigest()
        created = self.store.put_function(
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

    async def submit(self, caller: Caller, endpoint: str, body: Any) -> dict[str, Any]:
        self._refuse_if_unavailable()
        site = self._site(endpoint)
        if not submit_shape_ok(body):
            check_shape(body, SUBMIT_SCHEMA)
            raise RequestError("api.bad_request", "request body invalid")
        raw_tasks: list[dict[str, Any]] = body["tasks"]
        if len(raw_tasks) > self.limits.max_tasks_per_request:
            raise RequestError("api.body_too_large", "too many tasks in one request")
        variables = body.get("user_endpoint_config") or {}
        user_runtime = body.get("user_runtime") or {}
        encoded_vars = json.dumps(variables, sort_keys=True)
        if len(encoded_vars) > self.limits.max_variables_bytes:
            raise ConfigError("config.variables_too_large", "variables too large")
        if len(json.dumps(user_runtime)) > self.limits.max_variables_bytes:
            raise RequestError("api.body_too_large", "user_runtime too large")
        payloads: list[bytes] = []
        for i, item in enumerate(raw_tasks):
            payload = b64decode(item["args"], f"$.tasks[{i}].args")
            if len(payload) > self.limits.max_payload_bytes:
                raise TaskError("task.payload_too_large", f"task {i} payload too large")
            payloads.append(payload)
        function_ids = list(dict.fromkeys(t["function_id"] for t in raw_tasks))

        account = await self._map(site, caller)
        checks = [
            (f"user:{account.name}", "map_identity"),
            (f"template:{site.template_name}", "start_endpoint"),
        ] + [(f"function:{fid}", "submit_task") for fid in function_ids]
        self._authorize(site, caller, account, checks)
        allowed = site.allowed_functions
        if allowed is not None:
            refused = [f for f in function_ids if f not in allowed]
            if refused:
                self.audit.record(
                    "task.function_refused",
                    endpoint=site.name,
                    account=account.name,
                    function_ids=refused,
                )
                raise TaskError("task.function_not_allowed", f"not allowed: {refused}")
        known = self.store.known_functions(function_ids)
        unknown = [f for f in function_ids if f not in known]
        if unknown:
            raise TaskError(
                "task.function_unknown",
                f"unknown functions {unknown}",
                violations=[
                    Violation("$.tasks", f"function {f} is not registered") for f in unknown[:20]
                ],
            )
        valid_vars = site.validate_variables(variables)
        n = len(raw_tasks)
        if self._pending[account.name] + n > self.limits.queued_tasks_per_user:
            raise ApiError("api.too_many_requests", "queued task limit reached")

        config_key = site.config_key(account, valid_vars)
        identity_doc = caller.identities.primary.to_dict()
        handle = await self.ueps.get_or_start(
            StartSpec(site, account, config_key, valid_vars, identity_doc, dict(user_runtime))
        )
        self._refuse_if_unavailable()  # the start may have taken a while
        self._register_functions(handle, function_ids)

        spec = Spec(
            spec_id=hashlib.sha256(
                json.dumps(
                    [site.name, account.name, valid_vars, user_runtime, identity_doc],
                    sort_keys=True,
                ).encode()
            ).hexdigest(),
            endpoint=site.name,
            account=account.name,
            variables=valid_vars,
            user_runtime=dict(user_runtime),
            identity=identity_doc,
        )
        now = time.time()
        walltime_cap = self.limits.max_walltime
        new = [
            NewTask(
                task_id=str(uuid.uuid4()),
                owner=caller.owner,
                endpoint=site.name,
                account=account.name,
                spec_id=spec.spec_id,
                function_id=item["function_id"],
                payload=payload,
                walltime=min(float(item.get("walltime") or walltime_cap), walltime_cap),
            )
            for item, payload in zip(raw_tasks, payloads, strict=True)
        ]
        # Audit first: a task the audit log cannot record is not accepted.
        self.audit.record_many(
            (
                "task.received",
                {
                    "task_id": t.task_id,
                    "function_id": t.function_id,
                    "account": account.name,
                    "endpoint": site.name,
                    "config_key": config_key,
                },
            )
            for t in new
        )
        self.store.put_spec(spec, now)
        # Inserted as dispatched in one committed transaction: if the daemon dies before
        # the frames leave, the restart reports them as task.endpoint_lost, never twice run.
        self.store.add_tasks(new, state="dispatched", now=now)
        for t in new:
            self._inflight[t.task_id] = (account.name, t.function_id, now, t.owner)
        self._pending[account.name] += n
        self.metrics.tasks.inc(n, state="received")
        self._dispatch(handle, new)
        return {"task_ids": [t.task_id for t in new]}

    def _register_functions(self, handle: Handle, function_ids: Iterable[str]) -> None:
        entry = self._registered.get(id(handle))
        if entry is None or entry[0] is not handle:
            entry = (handle, set())
            self._registered[id(handle)] = entry
            if len(self._registered) > 4096:  # forget handles long gone
                self._registered = {id(handle): entry}
        for fid in function_ids:
            if fid not in entry[1]:
                body = self.store.get_function(fid)
                if body is None:
                    raise TaskError("task.function_unknown", f"function {fid} vanished")
                handle.register_function(fid, body)
                entry[1].add(fid)

    def _dispatch(self, handle: Handle, tasks: Sequence[NewTask]) -> None:
        try:
            handle.dispatch(
                [DispatchTask(t.task_id, t.function_id, t.payload, t.walltime) for t in tasks]
            )
        except Exception as exc:
            log.warning("task.dispatch_failed", error=str(exc), count=len(tasks))
            self.on_lost([t.task_id for t in tasks], "task.endpoint_lost")
            return
        self.audit.record_many(("task.started", {"task_id": t.task_id}) for t in tasks)

    # -- re-dispatch after a restart ---------------------------------------------------

    async def redispatch(self, queued: Sequence[Any]) -> None:
        """Dispatch tasks that were accepted but not dispatched before a restart."""
        groups: dict[str, list[Any]] = {}
        for q in queued:
            groups.setdefault(q.spec_id, []).append(q)
        for spec_id, items in groups.items():
            ids = [q.task_id for q in items]
            try:
                spec = self.store.get_spec(spec_id)
                if spec is None:
                    raise TaskError("task.endpoint_lost", "spec missing")
                site = self._site(spec.endpoint)
                account = site.check_account(spec.account)
                variables = site.validate_variables(spec.variables)
                handle = await self.ueps.get_or_start(
                    StartSpec(
                        site,
                        account,
                        site.config_key(account, variables),
                        variables,
                        spec.identity,
                        spec.user_runtime,
                    )
                )
                self._register_functions(handle, {q.function_id for q in items})
                records = {r.task_id: r for r in self.store.get_many(ids)}
                still = [
                    q
                    for q in items
                    if records.get(q.task_id) and records[q.task_id].state == "queued"
                ]
                self.store.mark_dispatched([q.task_id for q in still])
                now = time.time()
                for q in still:
                    self._inflight[q.task_id] = (account.name, q.function_id, now, q.owner)
                self._dispatch(
                    handle,
                    [
                        NewTask(
                            q.task_id,
                            q.owner,
                            spec.endpoint,
                            account.name,
                            spec_id,
                            q.function_id,
                            q.payload,
                            q.walltime,
                        )
                        for q in still
                    ],
                )
            except MepError as exc:
                log.warning("task.redispatch_failed", reason=exc.reason, detail=exc.detail)
                self._finish_now([Outcome(i, "failed", {"reason": exc.reason}) for i in ids])

    # -- results ----------------------------------------------------------------------

    def on_result(self, key: str, header: Mapping[str, Any], payload: bytes) -> None:
        """Called by the registry (in the event loop) for each result."""
        task_id = header.get("task_id") if isinstance(header.get("task_id"), str) else key
        assert isinstance(task_id, str)
        status = header.get("status")
        if len(payload) > self.limits.max_result_bytes:
            outcome = Outcome(task_id, "failed", {"reason": "task.result_too_large"})
        elif status == "success":
            outcome = Outcome(task_id, "success", None, payload)
        else:
            error = header.get("error")
            error = dict(error) if isinstance(error, Mapping) else {}
            error.setdefault("reason", "task.failed")
            outcome = Outcome(task_id, "failed", error, payload or None)
        self._queue_outcomes([outcome])

    def on_lost(self, task_ids: Sequence[str], reason: str) -> None:
        self._queue_outcomes([Outcome(t, "failed", {"reason": reason}) for t in task_ids])

    def _queue_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        self._outbox.extend(outcomes)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Coalesce every result that arrives in this turn of the event loop into one
            # transaction (and one audit write).
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        batch, self._outbox = self._outbox, []
        if batch:
            self._finish_now(batch)

    def _finish_now(self, outcomes: Sequence[Outcome]) -> None:
        now = time.time()
        # Tasks this daemon dispatched are open for sure (popped here, so a duplicate
        # outcome falls to the checked path); others (queued after a restart, stray
        # duplicates) are checked row by row.
        mine: list[tuple[Outcome, tuple[str, str, float, str]]] = []
        others: list[Outcome] = []
        for o in outcomes:
            info = self._inflight.pop(o.task_id, None)
            if info is None:
                others.append(o)
            else:
                mine.append((o, info))
        self.store.finish([o for o, _ in mine], now, known_open=True)
        changed = set(self.store.finish(others, now)) if others else set()
        for _, info in mine:
            self.metrics.task_seconds.observe(now - info[2])
        finished = [(o, info[0], info[1]) for o, info in mine]
        for o in others:
            if o.task_id in changed:
                rec = self.store.get(o.task_id)
                finished.append((o, rec.account if rec else "", rec.function_id if rec else ""))
        events: list[tuple[str, Mapping[str, Any]]] = []
        for o, account, function_id in finished:
            if account:
                self._pending[account] -= 1
                if self._pending[account] <= 0:
                    del self._pending[account]
            reason = (o.error or {}).get("reason") if o.state != "success" else None
            self.metrics.tasks.inc(state=o.state)
            events.append(
                (
                    "task.finished",
                    {
                        "task_id": o.task_id,
                        "function_id": function_id,
                        "account": account,
                        "status": o.state,
                        "reason": reason,
                    },
                )
            )
            for waiter in self._waiters.get(o.task_id, ()):
                waiter.fired.add(o.task_id)
                waiter.event.set()
        try:
            self.audit.record_many(events)
        except AuditUnavailable as exc:
            log.error("audit.write_failed", detail=exc.detail)
        if not self._inflight and self._idle is not None:
            self._idle.set()

    # -- reading results --------------------------------------------------------------

    def _owned(self, caller: Caller, record: TaskRecord | None) -> TaskRecord:
        # Someone else's task looks exactly like a missing one: ids do not leak.
        if record is None or record.owner != caller.owner:
            raise TaskError("task.not_found", "no such task for this caller")
        return record

    def get_task(self, caller: Caller, task_id: str) -> dict[str, Any]:
        return task_view(self._owned(caller, self.store.get(task_id)))

    async def wait(self, caller: Caller, body: Any) -> dict[str, Any]:
        if not wait_shape_ok(body):
            check_shape(body, WAIT_SCHEMA)
            raise RequestError("api.bad_request", "request body invalid")
        ids = list(dict.fromkeys(body["task_ids"]))
        timeout = min(float(body.get("timeout", 10.0)), self.limits.max_wait_timeout)
        owner = caller.owner
        waiter = _Waiter()
        for task_id in ids:
            self._waiters.setdefault(task_id, set()).add(waiter)
        try:
            deadline = time.monotonic() + timeout
            done: list[dict[str, Any]] = []
            unknown: set[str] = set()
            pending = set(ids)

            def absorb(read: Sequence[str]) -> None:
                records = {r.task_id: r for r in self.store.get_many(read)}
                for task_id in read:
                    rec = records.get(task_id)
                    if rec is None or rec.owner != owner:
                        unknown.add(task_id)
                        pending.discard(task_id)
                    elif rec.is_final:
                        done.append(task_view(rec))
                        pending.discard(task_id)

            # The caller's tasks in flight are pending without reading the database.
            absorb([t for t in ids if self._inflight.get(t, _NOBODY)[3] != owner])
            while True:
                remaining = deadline - time.monotonic()
                if done or not pending or remaining <= 0:
                    return {
                        "tasks": done,
                        "pending": [t for t in ids if t in pending],
                        "unknown": [t for t in ids if t in unknown],
                    }
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.event.wait(), remaining)
                waiter.event.clear()
                fired, waiter.fired = waiter.fired, set()
                absorb([t for t in ids if t in fired and t in pending])
        finally:
            for task_id in ids:
                waiting = self._waiters.get(task_id)
                if waiting is not None:
                    waiting.discard(waiter)
                    if not waiting:
                        del self._waiters[task_id]

    def cancel(self, caller: Caller, task_id: str) -> dict[str, Any]:
        self._refuse_if_unavailable()
        record = self._owned(caller, self.store.get(task_id))
        if record.is_final:
            return task_view(record)
        if record.state != "queued":
            raise ApiError("api.task_started", "task already dispatched")
        self._finish_now([Outcome(task_id, "cancelled", {"reason": "task.cancelled"})])
        return self.get_task(caller, task_id)

    # -- status and stop ----------------------------------------------------------------

    async def status(self, caller: Caller, endpoint: str) -> dict[str, Any]:
        site = self._site(endpoint)
        account = await self._map(site, caller)
        self._authorize(site, caller, account, [(f"user:{account.name}", "read_status")])
        entries = [
            e for e in self.ueps.status(account.name) if e.get("endpoint") in (None, site.name)
        ]
        return {"endpoint": site.name, "user_endpoints": entries}

    async def introspect(self, caller: Caller, endpoint: str) -> dict[str, Any]:
        """The process identity of the caller's own ready user endpoints (uid, groups,
        umask, descriptors, limits, capabilities…), as each one reports it."""
        site = self._site(endpoint)
        account = await self._map(site, caller)
        self._authorize(site, caller, account, [(f"user:{account.name}", "read_status")])
        entries = await self.ueps.introspect(account.name, site.name)
        return {"endpoint": site.name, "user_endpoints": entries}

    async def stop(self, caller: Caller, endpoint: str, body: Any) -> dict[str, Any]:
        site = self._site(endpoint)
        check_shape(body or {}, STOP_SCHEMA)
        account = await self._map(site, caller)
        target = (body or {}).get("account") or account.name
        if target == account.name:
            self._authorize(site, caller, account, [(f"user:{account.name}", "stop_endpoint")])
        else:
            self._authorize(site, caller, account, [("endpoint", "admin")])
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
        self.flush()
        if self._inflight:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        self.flush()
        return len(self._inflight)

    def inflight_count(self) -> int:
        return len(self._inflight)

    def pending_by_account(self) -> Mapping[Labels, float]:
        return {labels(account=a): float(n) for a, n in self._pending.items()}


def task_view(record: TaskRecord) -> dict[str, Any]:
    """The public JSON of a task (its result base64-encoded, never deserialized)."""
    state = "running" if record.state == "dispatched" else record.state
    view: dict[str, Any] = {
        "task_id": record.task_id,
        "state": state,
        "function_id": record.function_id,
        "endpoint": record.endpoint,
        "received": record.created,
        "finished": record.finished,
    }
    if record.state == "success":
        view["result"] = base64.b64encode(record.result or b"").decode()
    elif record.state in ("failed", "cancelled"):
        error = dict(record.error or {})
        reason = error.get("reason") or "task.failed"
        view["error"] = {
            "reason": reason,
            "type_name": error.get("type_name"),
            "message": error.get("message") or REASONS.get(reason, ""),
            "traceback": error.get("traceback"),
        }
        if record.result:
            view["result"] = base64.b64encode(record.result).decode()
    return view
