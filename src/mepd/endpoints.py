"""The registry behind the pipeline's ``UserEndpoints`` port, with its audit records.

``RegistryEndpoints`` turns an admitted submit into the registry's ``StartRequest``
(the spec, the account as looked up now, the site's files and the executor's limits),
and writes ``uep.started``, ``uep.start_failed``, ``uep.stopped`` and ``uep.exited``
audit records. The registry's handles are the pipeline's ``Handle`` as they are.

Deliberately not here: process management (``mepd.registry``), decisions (the pipeline
admitted the request before it gets here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from mepcore.errors import ApiError, MepError
from mepcore.types import Account
from mepd.admission import Admitted
from mepd.audit import AuditLog, AuditUnavailable
from mepd.handle import EndpointStatus, UserEndpointHandle
from mepd.metrics import Labels, labels
from mepd.registry import Registry, StartRequest
from mepd.sites import LoadedSite
from mepd.userlog import read_log

_STATUS_FIELDS = ("config_key", "endpoint", "state", "pid", "started_at", "idle_since", "in_flight")


@attrs.define
class UepAudit:
    """The audit records of user endpoint lifecycles: started, start failed, stopped,
    exited. ``uep.started`` is written once per process; the ids it remembers are
    forgotten when the process exits (bounded by the registry's limits)."""

    audit: AuditLog
    _started: set[str] = attrs.field(factory=set)

    def start_failed(self, admitted: Admitted, exc: MepError) -> None:
        self.audit.record(
            "uep.start_failed",
            endpoint=admitted.spec.endpoint,
            account=admitted.account.name,
            uid=admitted.account.uid,
            config_key=admitted.config_key,
            reason=exc.admin_reason,
            detail=exc.detail,
        )

    def started(self, admitted: Admitted, handle: UserEndpointHandle) -> None:
        if handle.id in self._started:
            return
        self._started.add(handle.id)
        self.audit.record(
            "uep.started",
            endpoint=admitted.spec.endpoint,
            account=admitted.account.name,
            uid=admitted.account.uid,
            pid=handle.pid,
            config_key=admitted.config_key,
        )

    def exited(self, handle: UserEndpointHandle, why: str) -> None:
        """Every user endpoint process that ends (idle, crash, stop) leaves an audit line."""
        self._started.discard(handle.id)
        with contextlib.suppress(AuditUnavailable):
            self.audit.record(
                "uep.exited",
                endpoint=handle.endpoint,
                account=handle.account.name,
                uid=handle.account.uid,
                pid=handle.pid,
                config_key=handle.config_key,
                state=handle.state,
                reason=why,
            )

    def stopped(self, statuses: Sequence[EndpointStatus], reason: str) -> None:
        with contextlib.suppress(AuditUnavailable):
            self.audit.record_many(
                (
                    "uep.stopped",
                    {
                        "endpoint": s.endpoint,
                        "account": s.account,
                        "uid": s.uid,
                        "pid": s.pid,
                        "config_key": s.config_key,
                        "reason": reason,
                    },
                )
                for s in statuses
            )


@attrs.define
class RegistryEndpoints:
    """Adapts ``mepd.registry.Registry`` to the pipeline's ``UserEndpoints`` port."""

    registry: Registry
    audit: UepAudit
    site_of: Callable[[str], LoadedSite | None]
    # What the user endpoint's executor enforces itself (result size is refused in the
    # worker, before megabytes cross the channel).
    executor_limits: Mapping[str, Any] = attrs.field(factory=dict)

    def start_request(self, admitted: Admitted) -> StartRequest:
        site = self.site_of(admitted.spec.endpoint)
        if site is None:
            raise ApiError("api.endpoint_unknown", f"no endpoint {admitted.spec.endpoint!r}")
        files = site.files
        return StartRequest(
            spec=admitted.spec,
            account=admitted.account,
            config_key=admitted.config_key,
            template_name=files.template_name,
            template_text=files.template_text,
            includes=files.includes,
            environment=files.environment,
            executor_limits=self.executor_limits,
            variable_limits=attrs.asdict(site.variable_limits),
            parent_config=site.parent_config,
        )

    async def get_or_start(self, admitted: Admitted) -> UserEndpointHandle:
        try:
            handle = await self.registry.get_or_start(self.start_request(admitted))
        except MepError as exc:
            self.audit.start_failed(admitted, exc)
            raise
        self.audit.started(admitted, handle)
        return handle

    def status(self, account_name: str | None) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in s.to_dict().items() if k in _STATUS_FIELDS}
            for s in self.registry.status(account_name)
        ]

    async def stop(self, account_name: str, endpoint: str, reason: str) -> int:
        chosen = [s for s in self.registry.status(account_name) if s.endpoint == endpoint]
        stopped = 0
        for key in {s.config_key for s in chosen}:
            stopped += await self.registry.stop(account_name, key, reason=reason)
        self.audit.stopped(chosen, reason)
        return stopped

    async def introspect(self, account_name: str, endpoint: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for status in self.registry.status(account_name):
            handle = self.registry.get(account_name, status.config_key)
            if status.endpoint != endpoint or status.state != "ready" or handle is None:
                continue
            try:
                answer = await handle.introspect()
            except MepError as exc:  # it went away meanwhile: report, don't fail the call
                answer = {"error": exc.reason}
            out.append({"config_key": status.config_key, "pid": status.pid, "process": answer})
        return out

    def cancel(self, endpoint_id: str, task_ids: Sequence[str]) -> bool:
        """Tell the user endpoint running these tasks to stop them; False when it is
        gone (its tasks end with it)."""
        handle = self.registry.by_id(endpoint_id)
        if handle is None:
            return False
        try:
            handle.cancel(task_ids)
        except MepError:
            return False
        return True

    async def read_log(self, account: Account, endpoint: str, lines: int) -> dict[str, Any]:
        tail = await read_log(account, endpoint, lines)
        return {"path": tail.path, "exists": tail.exists, "lines": tail.lines}

    def gauge(self) -> Mapping[Labels, float]:
        counts: dict[Labels, float] = {}
        for s in self.registry.status():
            key = labels(state=s.state)
            counts[key] = counts.get(key, 0.0) + 1
        return counts
