"""The task store's writer thread: group commits off the event loop.

The request path hands its writes (a submit's tasks and payloads, a registered
function, a batch of results) to one thread as *jobs* and awaits them. The thread takes
every job that is waiting, runs them in one SQLite transaction — each in its own
savepoint, so one job's error fails that job alone — commits once, and only then
completes each job's future in the job's event loop. So a caller is answered after its
data is committed (the daemon's promise that nothing accepted is lost holds), a
megabyte of payload is written (to its file, ``mepd.blobs``) without holding up the
event loop,
and many small writes arriving together cost one commit.

Small work (a few rows) is committed at once on the event loop instead when the
thread is idle and the write lock free — never waiting for it — since the two thread
hand-offs would cost more than such a commit. Every write transaction of the store,
the writer's and those made on the event loop (``TaskStore._transaction``, small
work), holds the store's write lock, so they never
interleave on the one write connection; a write on the event loop waits at most for
the batch being committed.

WAL checkpoints (copying committed pages into the database file, with an fsync) are
taken by a second thread, ``Checkpointer``, on a connection of its own, in ``PASSIVE``
mode, which never blocks a writer: a commit is not made to wait for the copy of the
megabytes committed before it, as SQLite's automatic checkpoint on the committing
connection would.

Deliberately not here: SQL of its own (the store hands over the work), reads (the
store reads through its own connection on the event loop), retries (the callers
decide: ``mepd.delivery`` keeps refused outcomes for a later write).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import structlog

from mepcore.errors import StoreError

log = structlog.get_logger("mepd.writer")

T = TypeVar("T")
# Jobs in one transaction at most: bounds how long a write on the event loop can wait.
MAX_BATCH = 256


@attrs.define(eq=False)
class _Job:
    work: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    after: Callable[[Any], None] | None = None


def _settle_from_thread(job: _Job, value: Any, error: BaseException | None) -> None:
    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
        job.loop.call_soon_threadsafe(_settle, job.future, value, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # its caller stopped waiting; the write stands
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


@attrs.define(eq=False)
class StoreWriter:
    """One thread committing the jobs of ``db`` under ``lock``. ``failed`` turns a
    SQLite error into the store's ``StoreError`` (and marks the store unavailable);
    ``succeeded`` is told after each commit. The thread starts with the first job and
    ends at ``stop()``."""

    db: sqlite3.Connection
    lock: threading.Lock
    failed: Callable[[sqlite3.Error], StoreError]
    succeeded: Callable[[], None]
    checkpointer: Checkpointer | None = None
    _queue: queue.SimpleQueue[_Job | None] = attrs.field(factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _start_lock: threading.Lock = attrs.field(factory=threading.Lock)

    async def run(self, work: Callable[[sqlite3.Connection], T], *, small: bool = False) -> T:
        """``work(db)`` inside a committed transaction; its value once committed."""
        return await self.submit(work, small=small)

    def submit(
        self,
        work: Callable[[sqlite3.Connection], T],
        after: Callable[[T], None] | None = None,
        *,
        small: bool = False,
    ) -> asyncio.Future[T]:
        """Queue ``work`` now (``stop()`` commits it even if nobody awaits); the
        future completes, in the running loop, once it is committed. ``after`` runs
        in this thread with the work's value right after the commit (and before the
        future completes); its errors are logged.

        ``small`` work (a few rows, no megabytes) is committed at once on the caller's
        thread when nothing is queued and nobody holds the write lock: two thread
        hand-offs cost more than such a commit. It never waits for the lock."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(work, loop, future, after)
        if small and self._queue.empty() and self.lock.acquire(blocking=False):
            try:
                ((value, error),) = self._commit_locked([job])
            finally:
                self.lock.release()
            self._finish(job, value, error, lambda: _settle(future, value, error))
            return future
        self._start()
        self._queue.put(job)
        return future

    @staticmethod
    def _finish(
        job: _Job, value: Any, error: BaseException | None, settle: Callable[[], None]
    ) -> None:
        if error is None and job.after is not None:
            try:
                job.after(value)
            except Exception:
                log.exception("store.after_commit_failed")
        settle()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="mepd-store-writer", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then end the thread."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
        if self.checkpointer is not None:
            self.checkpointer.stop(timeout)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            try:
                with self.lock:
                    results = self._commit_locked(batch)
            except Exception as exc:  # never leave a caller waiting on a dead thread
                log.exception("store.writer_failed")
                failure = StoreError("store.unavailable", f"store writer failed: {exc!r}")
                results = [(None, failure)] * len(batch)
            for each, (value, error) in zip(batch, results, strict=True):
                self._finish(each, value, error, partial(_settle_from_thread, each, value, error))

    def _commit_locked(self, batch: list[_Job]) -> list[tuple[Any, BaseException | None]]:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            self.db.execute("BEGIN IMMEDIATE")
            for job in batch:
                results.append(self._one(job))
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            error = self.failed(exc)
            return [(None, error)] * len(batch)
        self.succeeded()
        if self.checkpointer is not None:
            self.checkpointer.wake()
        return results

    def _one(self, job: _Job) -> tuple[Any, BaseException | None]:
        self.db.execute("SAVEPOINT job")
        try:
            value = job.work(self.db)
        except Exception as exc:
            # Undo this job alone; a failure to undo it fails the whole batch.
            self.db.execute("ROLLBACK TO job")
            self.db.execute("RELEASE job")
            if isinstance(exc, sqlite3.OperationalError):
                return None, self.failed(exc)
            return None, exc
        self.db.execute("RELEASE job")
        return value, None


@attrs.define(eq=False)
class Checkpointer:
    """Takes ``PASSIVE`` WAL checkpoints of the database at ``path`` in a thread of its
    own, at most every ``interval`` seconds, when woken after a commit (the committing
    connection then runs with ``wal_autocheckpoint=0``).

    A passive checkpoint copies the WAL into the database but never makes the WAL start
    over, and under writes that never pause nothing else does: the file grew to hundreds
    of megabytes in a long batched run. So when more than ``restart_frames`` frames are
    in it, the checkpointer takes the store's write ``lock`` (no commit starts
    meanwhile; it waits at most ``lock_wait`` and tries again after the next commit if
    it cannot) and runs a ``RESTART`` checkpoint, after which the next commit writes
    from the WAL's start (the store's ``journal_size_limit`` then truncates the file)."""

    path: Path
    interval: float = 0.2
    lock: threading.Lock | None = None
    restart_frames: int = 16384
    lock_wait: float = 0.05
    _wake: threading.Event = attrs.field(factory=threading.Event)
    _stopping: bool = False
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._serve, name="mepd-store-checkpoint", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _serve(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # A RESTART waits for readers of the old WAL (reads are short): bounded.
        db.execute("PRAGMA busy_timeout=500")
        try:
            while not self._stopping:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    self._checkpoint(db)
                except sqlite3.Error as exc:  # the next commit wakes it again
                    log.warning("store.checkpoint_failed", error=str(exc))
                time.sleep(self.interval)  # a pause between copies, not a wait for work
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        _busy, frames, _copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames <= self.restart_frames or self.lock is None:
            return
        if not self.lock.acquire(timeout=self.lock_wait):
            return  # writes are busy: the next wake tries again
        try:
            db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        finally:
            self.lock.release()
