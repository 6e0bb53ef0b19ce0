"""Tasks in flight: the one record of every task accepted and not yet finished.

An ``InFlightTask`` is created when a task goes out to a user endpoint (by the registry's
``UserEndpointHandle.dispatch``) or, after a restart, when a queued task is read back from
the store (``endpoint_id`` is then None until it is dispatched again). It is taken out,
exactly once, by whoever learns how it ended: the registry on a result or on the loss of
its user endpoint, the pipeline on a cancel or a failed dispatch. Every count the daemon
reports (tasks in flight, per account, per user endpoint) is derived from this table;
nothing else keeps a copy.

Deliberately not here: the payloads (they are in the store and on the channel), results,
and any I/O. The table is used from the daemon's event loop only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs


@attrs.frozen
class DispatchTask:
    """A task on its way to a user endpoint; ``payload`` is opaque bytes (§3.4)."""

    task_id: str
    owner: str
    function_id: str
    payload: bytes
    walltime: float | None
    # What an MPI task asks for (ResourceSpecification.to_dict()); None: nothing.
    resources: Mapping[str, Any] | None = attrs.field(default=None, hash=False)


@attrs.frozen
class InFlightTask:
    """A task accepted and not finished: who owns it, where it runs, since when."""

    task_id: str
    owner: str
    account: str
    function_id: str
    endpoint_id: str | None
    since: float


@attrs.define
class InFlight:
    """The table of tasks in flight, indexed by task, account and user endpoint."""

    _tasks: dict[str, InFlightTask] = attrs.field(factory=dict)
    _by_endpoint: dict[str, set[str]] = attrs.field(factory=dict)
    _by_account: Counter[str] = attrs.field(factory=Counter)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[InFlightTask]:
        return iter(list(self._tasks.values()))

    def get(self, task_id: str) -> InFlightTask | None:
        return self._tasks.get(task_id)

    def add(self, records: Iterable[InFlightTask]) -> None:
        """Add records; a record with the id of one already here replaces it (a queued
        task that is dispatched again)."""
        for record in records:
            self._drop(record.task_id)
            self._tasks[record.task_id] = record
            self._by_account[record.account] += 1
            if record.endpoint_id is not None:
                self._by_endpoint.setdefault(record.endpoint_id, set()).add(record.task_id)

    def take(self, task_id: str, *, endpoint_id: str | None = None) -> InFlightTask | None:
        """Remove and return a task; with ``endpoint_id``, only if it runs there (so a
        user endpoint can only finish the tasks given to it)."""
        record = self._tasks.get(task_id)
        if record is None or (endpoint_id is not None and record.endpoint_id != endpoint_id):
            return None
        self._drop(task_id)
        return record

    def take_endpoint(self, endpoint_id: str) -> list[InFlightTask]:
        """Remove and return every task of a user endpoint (it is gone), by task id."""
        ids = sorted(self._by_endpoint.get(endpoint_id, ()))
        return [r for r in (self.take(t) for t in ids) if r is not None]

    def count_endpoint(self, endpoint_id: str) -> int:
        return len(self._by_endpoint.get(endpoint_id, ()))

    def count_account(self, account: str) -> int:
        return self._by_account.get(account, 0)

    def by_account(self) -> Mapping[str, int]:
        return dict(self._by_account)

    def dispatched(self) -> int:
        """Tasks out at a user endpoint (not those queued in the daemon after a restart)."""
        return sum(len(ids) for ids in self._by_endpoint.values())

    def _drop(self, task_id: str) -> None:
        old = self._tasks.pop(task_id, None)
        if old is None:
            return
        self._by_account[old.account] -= 1
        if self._by_account[old.account] <= 0:
            del self._by_account[old.account]
        if old.endpoint_id is not None:
            ids = self._by_endpoint.get(old.endpoint_id)
            if ids is not None:
                ids.discard(task_id)
                if not ids:
                    del self._by_endpoint[old.endpoint_id]
