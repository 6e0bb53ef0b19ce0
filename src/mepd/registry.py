"""The registry of user endpoints: one process per (account, config key), its lifecycle.

``get_or_start`` returns the running user endpoint of an (account, config key) or starts
one: plan (``mepcore.spawn.plan_spawn``), launch with a socketpair as the only inherited
descriptor, send the start message, wait for ``ready`` or a structured error. Concurrent
callers for the same key wait for the one start; a failed start is raised to every
waiter and is not retried (the next request tries again, once). Limits per account, in
total and on concurrent starts are enforced before anything is spawned.

A user endpoint that dies is noticed at once — by its channel's end-of-file or by its
pidfd becoming readable, whichever comes first — its in-flight tasks are reported through
``on_lost(task_ids, "task.endpoint_lost")`` and it is removed, so the next request gets a
fresh one. Results are accepted only for task ids dispatched to *that* user endpoint: a
user's process cannot complete another user's tasks.

Everything runs in the daemon's one event loop. Spawning happens on the loop's thread on
purpose: the parent-death signal of a child is tied to the *thread* that forked it.
Deliberately not here: HTTP, the task store, deserializing payloads (never, §3.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

import attrs
import structlog

from mepcore.errors import (
    ChannelError,
    MepError,
    SpawnError,
)
from mepcore.spawn import (
    Cgroups,
    LaunchedProcess,
    SpawnSettings,
    SystemCgroupPort,
    become_subreaper,
    launch,
    plan_spawn,
    prepare_cgroups,
    reap_adopted_orphans,
)
from mepcore.types import Account
from mepd.channel import AsyncChannel, ChannelLimits
from mepd.handle import EndpointStatus, UserEndpointHandle
from mepd.inflight import InFlight, InFlightTask
from mepd.rendercache import RenderCache, render_key
from mepd.spec import EndpointSpec

log = structlog.get_logger("mepd.registry")


class SessionHooks(Protocol):
    """What happens around each user endpoint's process (PAM, in ``mepd.pam``)."""

    async def open(self, account: Account) -> None:
        """Before the launch; raising refuses the start."""
        ...

    async def close(self, account: Account) -> None:
        """After the process has gone; must not raise."""
        ...


# (the task's in-flight record, the checked result header, the opaque result bytes)
ResultCallback = Callable[[InFlightTask, dict[str, Any], bytes], None]
# (the records of the tasks that will not finish, the reason code)
LostCallback = Callable[[list[InFlightTask], str], None]
# (handle, why): a user endpoint's process is gone, for whatever reason (idle, crash,
# stop). Called once per user endpoint, in the event loop, after on_lost.
ExitCallback = Callable[["UserEndpointHandle", str], None]


class AdoptionRecords(Protocol):
    """Records of user endpoints that may outlive the daemon (``mepd.adoption``)."""

    def launched(self, handle: UserEndpointHandle) -> dict[str, Any]:
        """Record a launched endpoint; the ``adoption`` fields of its start message."""
        ...

    def ended(self, handle: UserEndpointHandle) -> None:
        """Its process is gone: nothing to adopt any more."""
        ...


def _freeze(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@attrs.frozen
class RegistryLimits:
    """Bounds on user endpoints (DESIGN.md §3.6) and the lifecycle's time budgets."""

    max_per_account: int = 4
    max_total: int = 64
    max_concurrent_starts: int = 8
    start_timeout: float = 30.0
    stop_grace: float = 5.0
    shutdown_timeout: float = 30.0


@attrs.frozen
class StartRequest:
    """Everything a user endpoint needs to start: the ``EndpointSpec`` (its variables
    already validated), the account as looked up now, and the site's files."""

    spec: EndpointSpec
    account: Account
    config_key: str
    template_name: str
    template_text: str
    includes: Mapping[str, str] = attrs.field(converter=_freeze)
    environment: Mapping[str, str] = attrs.field(converter=_freeze)
    executor_limits: Mapping[str, Any] = attrs.field(converter=_freeze, factory=dict)
    # The bounds the daemon validated the variables with; the user endpoint re-checks
    # with the same ones, so a site that raises them is not refused at render time.
    variable_limits: Mapping[str, Any] = attrs.field(converter=_freeze, factory=dict)
    setup_timeout: float = 300.0
    teardown_timeout: float = 300.0
    # The endpoint's settings its template may read (_GC.parent_config; no secrets).
    parent_config: Mapping[str, Any] = attrs.field(converter=_freeze, factory=dict)

    def start_fields(self) -> dict[str, Any]:
        return {
            "template_name": self.template_name,
            "template_text": self.template_text,
            "includes": dict(self.includes),
            "variables": self.spec.variables,
            "identity": None if self.spec.identity is None else self.spec.identity.to_dict(),
            "user_runtime": self.spec.user_runtime or None,
            "account": self.account.to_dict(),
            "endpoint": self.spec.endpoint,
            "config_key": self.config_key,
            "setup_timeout": self.setup_timeout,
            "teardown_timeout": self.teardown_timeout,
            "executor_limits": dict(self.executor_limits),
            "variable_limits": dict(self.variable_limits),
            "parent_config": dict(self.parent_config),
        }


@attrs.define
class Registry:
    """All user endpoints of this daemon. Use from the daemon's event loop only.

    Tasks in flight are kept in ``in_flight`` (the daemon's one table, shared with the
    pipeline). ``on_result(record, result_header, result_payload)`` is called in the
    event loop for every result of a task dispatched through a handle, with the task's
    in-flight record (taken out of the table); the payload is opaque bytes, to be stored
    as they are. ``on_lost(records, "task.endpoint_lost")`` is called once with the tasks
    still in flight when a user endpoint dies or is stopped. Both must not raise (errors
    are logged and ignored) and must not block.
    """

    spawn_settings: SpawnSettings
    limits: RegistryLimits
    on_result: ResultCallback = attrs.field(kw_only=True)
    on_lost: LostCallback = attrs.field(kw_only=True)
    on_exit: ExitCallback | None = attrs.field(kw_only=True, default=None)
    channel_limits: ChannelLimits = attrs.field(kw_only=True, factory=ChannelLimits)
    clock: Callable[[], float] = attrs.field(kw_only=True, default=time.time)
    in_flight: InFlight = attrs.field(kw_only=True, factory=InFlight)
    sessions: SessionHooks | None = attrs.field(kw_only=True, default=None)
    # Set when user endpoints are adoptable (restart.adopt_endpoints): they outlive us.
    adoption: AdoptionRecords | None = attrs.field(kw_only=True, default=None)
    # Configurations user endpoints rendered, for the next start from the same inputs.
    render_cache: RenderCache = attrs.field(kw_only=True, factory=RenderCache)
    _handles: dict[tuple[str, str], UserEndpointHandle] = attrs.field(init=False, factory=dict)
    # (account, config key) of the previous daemon's endpoints awaiting re-adoption.
    awaiting: set[tuple[str, str]] = attrs.field(init=False, factory=set)
    _awaited: dict[tuple[str, str], asyncio.Event] = attrs.field(init=False, factory=dict)
    _starting: dict[tuple[str, str], asyncio.Future[UserEndpointHandle]] = attrs.field(
        init=False, factory=dict
    )
    _leaving: set[UserEndpointHandle] = attrs.field(init=False, factory=set)
    # Leaders launched and not yet reaped by their stop ladder: never reaped elsewhere.
    _unreaped: set[int] = attrs.field(init=False, factory=set)
    _start_tasks: set[asyncio.Task[None]] = attrs.field(init=False, factory=set)
    _shutting_down: bool = attrs.field(init=False, default=False)
    _subreaper: bool = attrs.field(init=False, default=False)
    _cgroups: Cgroups | None = attrs.field(init=False, default=None)
    _serial: itertools.count[int] = attrs.field(init=False, factory=itertools.count)

    # ----------------------------------------------------------------- start

    async def get_or_start(self, req: StartRequest) -> UserEndpointHandle:
        if self._shutting_down:
            raise SpawnError("spawn.shutting_down")
        key = (req.account.name, req.config_key)
        if key in self.awaiting:
            # Its endpoint of the previous daemon may come back: wait for it (bounded)
            # rather than start a second one.
            event = self._awaited.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), self.limits.start_timeout)
        handle = self._handles.get(key)
        if handle is not None and handle.state == "ready":
            if handle.account == req.account:
                return handle
            self._retire(handle)
        pending = self._starting.get(key)
        if pending is not None:
            started = await asyncio.shield(pending)
            if started.account == req.account:
                return started
            self._retire(started)
            return await self.get_or_start(req)
        self._check_limits(req.account.name)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[UserEndpointHandle] = loop.create_future()
        # Retrieve the exception even when every waiter was cancelled (no loop warning).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._starting[key] = future
        task = loop.create_task(self._start(key, req, future))
        self._start_tasks.add(task)
        task.add_done_callback(self._start_tasks.discard)
        return await asyncio.shield(future)

    def _retire(self, handle: UserEndpointHandle) -> None:
        """A user endpoint is bound to the (uid, gid, name, groups) it was started for:
        when the account looked up now differs (``userdel``/``useradd`` reused the name,
        the uid moved, groups changed), it is stopped and never used again."""
        log.warning(
            "uep.account_changed",
            uep=handle.id,
            account=handle.account.name,
            started_uid=handle.account.uid,
        )
        self._leave(handle, "stopping")
        handle.ensure_stopped("the account changed", self.limits.stop_grace)

    def _check_limits(self, account: str) -> None:
        # A start in progress counts as an endpoint: its key is in ``_starting`` before
        # its handle reaches ``_handles``, and concurrent requests must not both pass.
        keys = set(self._handles) | set(self._starting)
        mine = sum(1 for name, _ in keys if name == account)
        limits = self.limits
        if mine >= limits.max_per_account:
            raise SpawnError(
                "spawn.too_many_endpoints",
                f"{account} already has {mine} user endpoints (limit {limits.max_per_account})",
            )
        if len(keys) + len(self._leaving) >= limits.max_total:
            raise SpawnError(
                "spawn.too_many_endpoints",
                f"{len(keys)} user endpoints running or starting (limit {limits.max_total})",
            )
        if len(self._starting) >= limits.max_concurrent_starts:
            raise SpawnError(
                "spawn.too_many_starts",
                f"{len(self._starting)} starts in progress (limit {limits.max_concurrent_starts})",
            )

    async def _start(
        self,
        key: tuple[str, str],
        req: StartRequest,
        future: asyncio.Future[UserEndpointHandle],
    ) -> None:
        handle = UserEndpointHandle(
            id=f"{req.account.name}/{req.config_key[:16]}/{next(self._serial)}",
            account=req.account,
            config_key=req.config_key,
            endpoint=req.spec.endpoint,
            registry=self,
        )
        ready: asyncio.Future[Mapping[str, Any]] = asyncio.get_running_loop().create_future()
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        handle._ready = ready
        self._handles[key] = handle
        began = time.monotonic()
        try:
            await self._launch(handle, req, ready)
        except BaseException as exc:
            error = _as_start_error(exc, handle)
            await self._fail_start(handle, req, error)
            future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._starting.pop(key, None)
        handle.state = "ready"
        handle.started_at = self.clock()
        handle.idle_since = handle.started_at
        log.info(
            "uep.started",
            uep=handle.id,
            account=req.account.name,
            uid=req.account.uid,
            pid=handle.pid,
            config_key=req.config_key,
            seconds=round(time.monotonic() - began, 4),
        )
        future.set_result(handle)

    async def _launch(
        self,
        handle: UserEndpointHandle,
        req: StartRequest,
        ready: asyncio.Future[Mapping[str, Any]],
    ) -> None:
        """Plan, launch with the channel as the only inherited descriptor, send the start
        message and wait for ``ready`` (or the user endpoint's structured error)."""
        loop = asyncio.get_running_loop()
        if not self._subreaper:
            self._subreaper = become_subreaper()
            self._watch_adopted(loop)
        plan = plan_spawn(req.account, self.spawn_settings, req.environment)
        cgroups = self.cgroups()
        if self.sessions is not None:
            await self.sessions.open(req.account)
            handle.session_open = True
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            handle.process = launch(
                plan, theirs.fileno(), cgroups=cgroups, adoptable=self.adoption is not None
            )
            self._unreaped.add(handle.process.pid)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        handle.channel = await AsyncChannel.connect(
            ours, handle._on_frame, handle._on_close, self.channel_limits
        )
        handle._watch_fd = os.dup(handle.process.pidfd)
        loop.add_reader(handle._watch_fd, handle._on_exit)
        fields = req.start_fields()
        rendered_key = render_key(fields, req.environment)
        rendered = self.render_cache.get(rendered_key)
        if rendered is not None:
            fields["rendered"] = rendered
        if self.adoption is not None:
            # The secret travels on the channel only (never argv or the environment).
            fields["adoption"] = self.adoption.launched(handle)
        handle.channel.send("start", fields)
        answer = await asyncio.wait_for(asyncio.shield(ready), self.limits.start_timeout)
        if "rendered" in answer:
            self.render_cache.put(rendered_key, answer["rendered"])

    async def _fail_start(
        self, handle: UserEndpointHandle, req: StartRequest, error: MepError
    ) -> None:
        handle.state = "failed"
        self._forget(handle)
        if handle.process is not None:
            # A user endpoint that reported an error exits by itself; the ladder
            # makes sure of it and reaps it, so a failed start leaves no process.
            handle._closed.set()
            if handle._watch_fd >= 0:
                asyncio.get_running_loop().remove_reader(handle._watch_fd)
                os.close(handle._watch_fd)
                handle._watch_fd = -1
            if handle.channel is not None:
                handle.channel.close()
            await handle.ensure_stopped(None, self.limits.stop_grace)
        else:
            await handle.close_session()
        log.warning(
            "uep.start_failed",
            account=req.account.name,
            config_key=req.config_key,
            reason=error.admin_reason,
            detail=error.detail,
        )

    def cgroups(self) -> Cgroups:
        """The user endpoints' cgroups, prepared at the first start; what the machine
        does not allow is logged once. Raises ``spawn.cgroup_failed`` (every start then
        fails) when the settings require cgroups and there are none."""
        if self._cgroups is None:
            cgroups = prepare_cgroups(self.spawn_settings.cgroup, SystemCgroupPort())
            if not cgroups.available:
                log.warning("spawn.cgroups_unavailable", detail="; ".join(cgroups.notes))
            else:
                log.info("spawn.cgroups_prepared", layout=cgroups.describe())
                for note in cgroups.notes:
                    log.warning("spawn.cgroup_limited", detail=note)
            self._cgroups = cgroups
        return self._cgroups

    def _forget(self, handle: UserEndpointHandle) -> None:
        key = (handle.account.name, handle.config_key)
        if self._handles.get(key) is handle:
            del self._handles[key]
        self._leaving.discard(handle)

    # ----------------------------------------------------------------- queries

    def status(self, account_name: str | None = None) -> list[EndpointStatus]:
        handles = [*self._handles.values(), *self._leaving]
        return [
            h.status()
            for h in sorted(handles, key=lambda h: (h.account.name, h.config_key, h.id))
            if account_name is None or h.account.name == account_name
        ]

    def get(self, account_name: str, config_key: str) -> UserEndpointHandle | None:
        return self._handles.get((account_name, config_key))

    def by_id(self, endpoint_id: str) -> UserEndpointHandle | None:
        """The running or leaving user endpoint with this id (tasks name it)."""
        for handle in [*self._handles.values(), *self._leaving]:
            if handle.id == endpoint_id:
                return handle
        return None

    # ----------------------------------------------------------------- stop

    async def stop(
        self, account_name: str, config_key: str | None = None, reason: str = "requested"
    ) -> int:
        """Stop the user endpoints of an account (one config key, or all); their count."""
        chosen = [
            h
            for h in list(self._handles.values())
            if h.account.name == account_name
            and (config_key is None or h.config_key == config_key)
            and h.state in ("ready", "starting")
            and h.process is not None
        ]
        for handle in chosen:
            self._leave(handle, "stopping")
        await asyncio.gather(
            *(h.ensure_stopped(reason, self.limits.stop_grace) for h in chosen),
            return_exceptions=True,
        )
        return len(chosen)

    def _leave(self, handle: UserEndpointHandle, state: str) -> None:
        key = (handle.account.name, handle.config_key)
        if self._handles.get(key) is handle:
            del self._handles[key]
        handle.state = state
        self._leaving.add(handle)

    # ----------------------------------------------------------------- adoption

    def reserve_ids(self, used: Iterable[str]) -> None:
        """New handles get ids the previous daemon's live endpoints do not have."""
        serials = [int(i.rpartition("/")[2]) for i in used if i.rpartition("/")[2].isdigit()]
        if serials:
            self._serial = itertools.count(max(serials) + 1)

    async def adopt(
        self,
        endpoint_id: str,
        account: Account,
        config_key: str,
        endpoint: str,
        process: LaunchedProcess,
        sock: socket.socket,
    ) -> UserEndpointHandle:
        """Take over a verified user endpoint of the previous daemon (``mepd.adoption``
        checked the process and the peer) on its adoption connection; ``settle_adopted``
        then gives it its key."""
        loop = asyncio.get_running_loop()
        now = self.clock()
        handle = UserEndpointHandle(
            id=endpoint_id,
            account=account,
            config_key=config_key,
            endpoint=endpoint,
            state="ready",
            process=process,
            started_at=now,
            idle_since=now,
            registry=self,
        )
        handle.channel = await AsyncChannel.connect(
            sock, handle._on_frame, handle._on_close, self.channel_limits
        )
        handle._watch_fd = os.dup(process.pidfd)
        loop.add_reader(handle._watch_fd, handle._on_exit)
        return handle

    def settle_adopted(self, handle: UserEndpointHandle) -> None:
        """After its tasks are re-bound: the adopted endpoint serves its key, or, when a
        new one was started for that key meanwhile, it finishes its work and leaves."""
        key = (handle.account.name, handle.config_key)
        free = self._handles.get(key, handle) is handle and key not in self._starting
        if free and not self._shutting_down:
            self._handles[key] = handle
            self.adoption_settled(key)
            return
        with contextlib.suppress(ChannelError):
            handle._live_channel().send("drain")
        self._leave(handle, "draining")
        self.adoption_settled(key)

    def adoption_settled(self, key: tuple[str, str]) -> None:
        """The previous daemon's endpoint of ``key`` is adopted or given up: starts wait
        no longer."""
        self.awaiting.discard(key)
        event = self._awaited.pop(key, None)
        if event is not None:
            event.set()

    async def release(self) -> list[EndpointStatus]:
        """Stop serving without stopping the user endpoints (``--keep-endpoints``): the
        channels close, the endpoints keep their work and wait for the next daemon.
        Their tasks stay dispatched in the store. Returns what was released."""
        self._shutting_down = True
        if self._starting:
            with contextlib.suppress(Exception):
                await asyncio.wait(list(self._starting.values()), timeout=self.limits.start_timeout)
        released = []
        loop = asyncio.get_running_loop()
        for handle in list(self._handles.values()):
            if handle.state != "ready" or handle.process is None:
                continue
            released.append(handle.status())
            handle._closed.set()  # so that the channel's end is not a loss
            if handle._watch_fd >= 0:
                loop.remove_reader(handle._watch_fd)
                os.close(handle._watch_fd)
                handle._watch_fd = -1
            if handle.channel is not None:
                handle.channel.close()
            self._unreaped.discard(handle.process.pid)
            del self._handles[(handle.account.name, handle.config_key)]
        return released

    def _watch_adopted(self, loop: asyncio.AbstractEventLoop) -> None:
        # As a subreaper we inherit the orphans of user endpoints (Parsl blocks, workers
        # whose endpoint died first): reap them when they die, or they pile up as zombies.
        # Signal handlers need the main thread; elsewhere reaping happens at each exit.
        with contextlib.suppress(RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGCHLD, self.reap_adopted)

    def reap_adopted(self) -> list[int]:
        """Reap adopted descendants of user endpoints that have died (never a leader)."""
        return reap_adopted_orphans(self._unreaped)

    async def shutdown(self) -> None:
        """Refuse new starts, drain, then the stop ladder for everyone; bounded in time."""
        self._shutting_down = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.shutdown_timeout
        ladder_budget = 2 * self.limits.stop_grace + 2.0
        if self._starting:
            with contextlib.suppress(Exception):
                await asyncio.wait(
                    list(self._starting.values()),
                    timeout=max(0.0, deadline - loop.time() - ladder_budget),
                )
        handles = [h for h in self._handles.values() if h.process is not None]
        for handle in handles:
            if (
                handle.state == "ready"
                and handle.channel is not None
                and not handle.channel.is_closed
            ):
                with contextlib.suppress(ChannelError):
                    handle.channel.send("drain")
            self._leave(handle, "draining")
        drain_budget = deadline - loop.time() - ladder_budget
        if handles and drain_budget > 0:
            await asyncio.wait(
                [loop.create_task(h.wait_closed()) for h in handles], timeout=drain_budget
            )
        stoppers = [h.ensure_stopped("shutdown", self.limits.stop_grace) for h in handles]
        stoppers += [h._stopper for h in self._leaving if h._stopper is not None]
        if stoppers:
            await asyncio.wait(stoppers, timeout=max(0.1, deadline - loop.time()))
        for handle in [*handles, *self._leaving]:
            process = handle.process
            if process is not None and process.returncode is None:
                # Out of time: no more asking.
                process.signal_group(signal.SIGKILL)
                await asyncio.to_thread(process.reap, deadline=1.0)
        self._leaving.clear()
        if self._cgroups is not None:
            self._cgroups.release()


def _as_start_error(exc: BaseException, handle: UserEndpointHandle) -> MepError:
    if isinstance(exc, MepError):
        return exc
    if isinstance(exc, TimeoutError):
        return SpawnError(
            "spawn.start_timeout", f"user endpoint {handle.id} did not answer in time"
        )
    if isinstance(exc, asyncio.CancelledError):
        return SpawnError("spawn.start_failed", "the start was cancelled")
    error = SpawnError("spawn.start_failed", f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
