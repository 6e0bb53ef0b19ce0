"""The way back: outcomes of tasks → the store → the audit log → waiting callers.

The registry hands over each result with the task's in-flight record (``on_result``),
and the records of a user endpoint that is gone (``on_lost``); the pipeline hands over
cancels and failed dispatches. Outcomes that arrive in one turn of the event loop are
committed in one transaction with one audit write, by the store's writer thread
(``mepd.writer``): the event loop does not wait for it, and waiters are woken once the
outcomes are committed. Cancels and failed dispatches are committed at once. Waiting is
event-driven: a long-poll registers an ``asyncio.Event`` per task id and is woken when a
batch is committed, never by polling the database.

Deliberately not here: deserializing anything (results are opaque bytes, DESIGN.md
§3.4), HTTP, starting or stopping user endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import structlog

from mepcore.errors import REASONS, StoreError, TaskError
from mepd.audit import AuditSink, AuditUnavailable
from mepd.auth import Caller
from mepd.inflight import InFlight, InFlightTask
from mepd.metrics import Metrics
from mepd.store import Outcome, TaskRecord, TaskStore

log = structlog.get_logger("mepd.delivery")

STORE_RETRY_SECONDS = 1.0
# Result bytes just committed are kept this long (at most) for the long-polls they
# wake, which then need not read megabytes back from the database on the event loop.
FRESH_RESULT_BYTES = 64 * 1024 * 1024
FRESH_RESULT_MIN = 64 * 1024  # smaller ones are cheaper to read back than to keep


@attrs.define(eq=False)
class _Waiter:
    """One long-poll: woken with the ids that finished since it last looked."""

    event: asyncio.Event = attrs.field(factory=asyncio.Event)
    fired: set[str] = attrs.field(factory=set)


@attrs.frozen
class WaitAnswer:
    """What a long-poll returns: finished tasks, those still pending, unknown ids."""

    tasks: list[dict[str, Any]]
    pending: list[str]
    unknown: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "pending": self.pending, "unknown": self.unknown}


def _finished_event(o: Outcome, account: str, function_id: str) -> tuple[str, Mapping[str, Any]]:
    reason = (o.error or {}).get("reason") if o.state != "success" else None
    fields = {
        "task_id": o.task_id,
        "function_id": function_id,
        "account": account,
        "status": o.state,
        "reason": reason,
    }
    return "task.finished", fields


def outcome_of(task_id: str, header: Mapping[str, Any], payload: bytes, limit: int) -> Outcome:
    """The stored outcome of one result frame (its header already checked)."""
    if len(payload) > limit:
        return Outcome(task_id, "failed", {"reason": "task.result_too_large"})
    if header.get("status") == "success":
        return Outcome(task_id, "success", None, payload)
    error = header.get("error")
    error = dict(error) if isinstance(error, Mapping) else {}
    error.setdefault("reason", "task.failed")
    # A task the user endpoint stopped (cancelled there, or refused while draining).
    state = "cancelled" if error["reason"] == "task.cancelled" else "failed"
    return Outcome(task_id, state, error, payload or None)


@attrs.define
class Delivery:
    """Finishes tasks: in the store, in the audit log, for the waiters."""

    store: TaskStore
    audit: AuditSink
    in_flight: InFlight
    metrics: Metrics
    max_result_bytes: int
    _waiters: dict[str, set[_Waiter]] = attrs.field(factory=dict)
    _outbox: list[tuple[Outcome, InFlightTask | None]] = attrs.field(factory=list)
    _flush_scheduled: bool = False
    _idle: asyncio.Event | None = None
    _commits: set[asyncio.Task[None]] = attrs.field(factory=set)
    # Tasks whose outcome the writer thread is committing, by id: their owner. A
    # long-poll counts them pending until they are announced.
    _writing: dict[str, str] = attrs.field(factory=dict)
    _fresh: OrderedDict[str, bytes] = attrs.field(factory=OrderedDict)
    _fresh_bytes: int = 0

    # -- outcomes in --------------------------------------------------------------------

    def on_result(self, record: InFlightTask, header: Mapping[str, Any], payload: bytes) -> None:
        """A result of a task in flight (called by the registry in the event loop)."""
        outcome = outcome_of(record.task_id, header, payload, self.max_result_bytes)
        self._queue([(outcome, record)])

    def on_lost(self, records: Sequence[InFlightTask], reason: str) -> None:
        """Tasks that will not finish (their user endpoint is gone)."""
        self._queue([(Outcome(r.task_id, "failed", {"reason": reason}), r) for r in records])

    def fail(self, task_ids: Sequence[str], reason: str) -> None:
        """End tasks now, whether or not they are in flight (failed dispatch, cancel)."""
        outcome = "cancelled" if reason == "task.cancelled" else "failed"
        self.finish([(Outcome(t, outcome, {"reason": reason}), None) for t in task_ids])

    def _queue(self, items: Sequence[tuple[Outcome, InFlightTask | None]]) -> None:
        self._outbox.extend(items)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Coalesce every result that arrives in this turn of the event loop into one
            # transaction (and one audit write).
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Commit what is waiting, through the store's writer thread (the event loop
        goes on meanwhile); waiters are woken once it is committed."""
        self._flush_scheduled = False
        batch, self._outbox = self._outbox, []
        if batch:
            known, others = self._split(batch)
            if not known:  # cancels and late answers only: checked row by row, now
                self._keep(self._finish_others([], others, time.time()))
                return
            # Queued with the writer now, so that a store closed right after still
            # commits it; announced once committed.
            now = time.time()
            self._writing.update((r.task_id, r.owner) for _, r in known)
            events = {o.task_id: _finished_event(o, r.account, r.function_id) for o, r in known}
            written = self.store.queue_outcomes(
                [o for o, _ in known],
                now,
                # In the writer thread, right after the commit: the audit log has the
                # results before anyone can read them, and the loop does not write it.
                after=lambda changed: self._record([events[t] for t in changed]),
            )
            if written.done():  # committed inline: announce now, not a turn later
                self._written(written, known, others, now)
                return
            commit = asyncio.get_running_loop().create_task(
                self._announce_when_written(written, known, others, now)
            )
            self._commits.add(commit)
            commit.add_done_callback(self._commits.discard)

    def _keep(self, items: Sequence[tuple[Outcome, InFlightTask | None]]) -> None:
        # Nothing is lost: outcomes the store refused wait here (their tasks already left
        # the in-flight table) and are written when it accepts writes again.
        self._outbox[:0] = items
        if self._outbox and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(STORE_RETRY_SECONDS, self.flush)

    async def _announce_when_written(
        self,
        written: asyncio.Future[list[str]],
        known: list[tuple[Outcome, InFlightTask]],
        others: dict[str, Outcome],
        now: float,
    ) -> None:
        with contextlib.suppress(Exception):  # read again below, by _written
            await written
        self._written(written, known, others, now)

    def _written(
        self,
        written: asyncio.Future[list[str]],
        known: list[tuple[Outcome, InFlightTask]],
        others: dict[str, Outcome],
        now: float,
    ) -> None:
        for _, record in known:
            self._writing.pop(record.task_id, None)
        try:
            changed = set(written.result())
        except Exception as exc:  # StoreError, or the writer's own failure: kept
            log.error("store.write_failed", detail=str(exc), outcomes=len(known))
            self._keep([*known, *((o, None) for o in others.values())])
            return
        # A task finished meanwhile by someone else (a cancel) keeps that outcome; it
        # was announced by whoever finished it.
        known = [(o, r) for o, r in known if o.task_id in changed]
        for outcome, _ in known:
            if outcome.result is not None and len(outcome.result) >= FRESH_RESULT_MIN:
                self._remember(outcome.task_id, outcome.result)
        self._keep(self._finish_others(known, others, now, audited=True))

    def _remember(self, task_id: str, result: bytes) -> None:
        self._fresh[task_id] = result
        self._fresh_bytes += len(result)
        while self._fresh_bytes > FRESH_RESULT_BYTES and self._fresh:
            self._fresh_bytes -= len(self._fresh.popitem(last=False)[1])

    def records(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        """The stored records of ``task_ids``, the result bytes of those finished just
        now taken from memory rather than read back."""
        fresh = [t for t in task_ids if t in self._fresh]
        if not fresh:
            return self.store.get_many(task_ids)
        stale = [t for t in task_ids if t not in self._fresh]
        found = self.store.get_many(stale) if stale else []
        for record in self.store.get_many(fresh, results=False):
            result = self._fresh.get(record.task_id)
            found.append(record if not record.is_final else attrs.evolve(record, result=result))
        return found

    async def settled(self) -> None:
        """Until the commits under way are done."""
        while self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)

    # -- committing ---------------------------------------------------------------------

    def finish(self, items: Sequence[tuple[Outcome, InFlightTask | None]]) -> None:
        """Commit outcomes now; ``StoreError`` if the store cannot take them."""
        left = self._commit(items)
        if left:
            self._outbox.extend(left)
            raise StoreError("store.unavailable", "outcomes kept for a later write")

    def _split(
        self, items: Sequence[tuple[Outcome, InFlightTask | None]]
    ) -> tuple[list[tuple[Outcome, InFlightTask]], dict[str, Outcome]]:
        """Outcomes of tasks handed over with (or still holding) their in-flight record,
        which are open for sure, and the others, to be checked row by row."""
        known: list[tuple[Outcome, InFlightTask]] = []
        others: dict[str, Outcome] = {}
        for outcome, record in items:
            record = record or self.in_flight.take(outcome.task_id)
            if record is None:
                others[outcome.task_id] = outcome
            else:
                known.append((outcome, record))
        return known, others

    def _commit(
        self, items: Sequence[tuple[Outcome, InFlightTask | None]]
    ) -> list[tuple[Outcome, InFlightTask | None]]:
        """Commit outcomes now, on the event loop; wake waiters; audit. Returns what
        the store refused. (Cancels and failed dispatches: few and small.)"""
        known, others = self._split(items)
        now = time.time()
        try:
            self.store.finish([o for o, _ in known], now, known_open=True)
        except StoreError as exc:
            log.error("store.write_failed", detail=exc.detail, outcomes=len(items))
            return [*known, *((o, None) for o in others.values())]
        return self._finish_others(known, others, now)

    def _finish_others(
        self,
        known: Sequence[tuple[Outcome, InFlightTask]],
        others: Mapping[str, Outcome],
        now: float,
        *,
        audited: bool = False,
    ) -> list[tuple[Outcome, InFlightTask | None]]:
        """After ``known`` is committed (and ``audited`` already, when the writer
        thread did it): commit ``others`` row by row, then announce all. Returns what
        the store refused."""
        finished = [(o, r.account, r.function_id) for o, r in known]
        skip = len(finished) if audited else 0
        for _, record in known:
            self.metrics.task_seconds.observe(now - record.since)
        left: list[tuple[Outcome, InFlightTask | None]] = []
        if others:
            try:
                changed = self.store.finish(list(others.values()), now)
            except StoreError as exc:
                log.error("store.write_failed", detail=exc.detail, outcomes=len(others))
                changed, left = [], [(o, None) for o in others.values()]
            for rec in self.store.get_many(changed):
                finished.append((others[rec.task_id], rec.account, rec.function_id))
        self._announce(finished, skip)
        if not self.in_flight and self._idle is not None:
            self._idle.set()
        return left

    def _announce(self, finished: Sequence[tuple[Outcome, str, str]], audited: int = 0) -> None:
        """Count and wake the waiters of ``finished``; audit all but the first
        ``audited`` (written by the writer thread already)."""
        for o, _, _ in finished:
            self.metrics.tasks.inc(state=o.state)
            for waiter in self._waiters.get(o.task_id, ()):
                waiter.fired.add(o.task_id)
                waiter.event.set()
        self._record([_finished_event(*item) for item in finished[audited:]])

    def _record(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        try:
            self.audit.record_many(events)
        except AuditUnavailable as exc:
            log.error("audit.write_failed", detail=exc.detail)

    # -- outcomes out -------------------------------------------------------------------

    def owned(self, caller: Caller, record: TaskRecord | None) -> TaskRecord:
        # Someone else's task looks exactly like a missing one: ids do not leak.
        if record is None or record.owner != caller.owner:
            raise TaskError("task.not_found", "no such task for this caller")
        return record

    async def wait(
        self,
        caller: Caller,
        ids: Sequence[str],
        timeout: float,
        frames: list[bytes] | None = None,
    ) -> WaitAnswer:
        """Until one of ``ids`` is final or ``timeout`` passes; every id is answered
        (results into ``frames`` when given: ``task_view``)."""
        waiter = _Waiter()
        for task_id in ids:
            self._waiters.setdefault(task_id, set()).add(waiter)
        try:
            deadline = time.monotonic() + timeout
            return await self._wait(caller.owner, ids, waiter, deadline, frames)
        finally:
            for task_id in ids:
                waiting = self._waiters.get(task_id)
                if waiting is not None:
                    waiting.discard(waiter)
                    if not waiting:
                        del self._waiters[task_id]

    async def _wait(
        self,
        owner: str,
        ids: Sequence[str],
        waiter: _Waiter,
        deadline: float,
        frames: list[bytes] | None,
    ) -> WaitAnswer:
        done: list[dict[str, Any]] = []
        unknown: set[str] = set()
        pending = set(ids)

        def absorb(read: Sequence[str]) -> None:
            records = {r.task_id: r for r in self.records(read)}
            for task_id in read:
                rec = records.get(task_id)
                if rec is None or rec.owner != owner:
                    unknown.add(task_id)
                    pending.discard(task_id)
                elif rec.is_final:
                    done.append(task_view(rec, frames))
                    pending.discard(task_id)

        # The caller's own tasks in flight (or being written) are pending without
        # reading the database.
        absorb([t for t in ids if not self._in_flight_for(t, owner)])
        while not done and pending and (remaining := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), remaining)
            waiter.event.clear()
            fired, waiter.fired = waiter.fired, set()
            absorb([t for t in ids if t in fired and t in pending])
        return WaitAnswer(done, [t for t in ids if t in pending], [t for t in ids if t in unknown])

    def _in_flight_for(self, task_id: str, owner: str) -> bool:
        if self._writing.get(task_id) == owner:
            return True
        record = self.in_flight.get(task_id)
        return record is not None and record.owner == owner

    async def until_idle(self, timeout: float) -> int:
        """Wait (bounded) until nothing is in flight; returns how many remain."""
        self.flush()
        if self.in_flight:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        self.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settled(), timeout)
        return len(self.in_flight)


def task_view(record: TaskRecord, frames: list[bytes] | None = None) -> dict[str, Any]:
    """The public JSON of a task (its result never deserialized): base64 in ``result``,
    or, given ``frames``, the result bytes appended there and their index in
    ``result_frame`` (the HTTP layer sends them raw or base64-encodes them)."""
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
        _attach(view, record.result or b"", frames)
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
            _attach(view, record.result, frames)
    return view


def _attach(view: dict[str, Any], result: bytes, frames: list[bytes] | None) -> None:
    if frames is None:
        view["result"] = base64.b64encode(result).decode()
    else:
        view["result_frame"] = len(frames)
        frames.append(result)
