"""The store's writer thread (``mepd.writer``) over a real SQLite store: group commits,
one job's failure failing that job alone, work committed before its caller hears of it,
and the store's synchronous writes never interleaving with the thread's."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from mepcore.errors import StoreError
from mepd.store import NewTask, Outcome, TaskStore

LATE = b"late" * 30_000  # over SMALL_WRITE_BYTES: through the writer thread


def task(i: int, payload: bytes = b"x") -> NewTask:
    return NewTask(f"t{i}", "owner", "hpc", "alice", "s1", "f" * 64, payload, None)


def test_concurrent_writes_are_committed_together_and_each_caller_answered(
    tmp_path: Path,
) -> None:
    store = TaskStore.open(tmp_path / "db")

    async def main() -> list[bool]:
        # Small ones (committed inline while the thread is idle) and large ones (the
        # thread's group commits) at once.
        writes = [
            store.commit_tasks(
                [task(i, bytes([i]) * i * (1 + 2000 * (i % 2)))], state="dispatched", now=1.0
            )
            for i in range(50)
        ]
        await asyncio.gather(*writes)
        return await asyncio.gather(
            store.commit_function("a" * 64, b"fn", "f", None, 1.0),
            store.commit_function("a" * 64, b"fn", "f", None, 2.0),
        )

    created = asyncio.run(main())
    assert sorted(created) == [False, True]  # the same function once
    # Read back through a connection of its own: committed, not just visible.
    other = TaskStore.open(tmp_path / "db")
    try:
        assert other.counts_by_state() == {"dispatched": 50}
        kept = {p.task_id: p.payload for p in other.pending_payloads([f"t{i}" for i in range(50)])}
        assert kept == {f"t{i}": bytes([i]) * i * (1 + 2000 * (i % 2)) for i in range(50)}
        assert other.get_function("a" * 64) == b"fn"
    finally:
        other.close()
        store.close()


def test_a_failing_job_fails_alone(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")

    async def main() -> tuple[BaseException | None, list[str]]:
        await store.commit_tasks([task(1)], state="dispatched", now=1.0)
        duplicate = store.commit_tasks([task(1)], state="dispatched", now=1.0)
        fine = store.commit_tasks([task(2)], state="dispatched", now=1.0)
        results = await asyncio.gather(duplicate, fine, return_exceptions=True)
        changed = await store.queue_outcomes(
            [Outcome("t1", "success", None, b"r"), Outcome("t9", "success", None, b"r")], 2.0
        )
        error = results[0] if isinstance(results[0], BaseException) else None
        return error, changed

    error, changed = asyncio.run(main())
    assert isinstance(error, sqlite3.IntegrityError)
    assert changed == ["t1"]  # t9 does not exist; only what changed is reported
    assert store.counts_by_state() == {"success": 1, "dispatched": 1}
    store.close()


def test_after_runs_once_committed_and_a_full_store_refuses(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    seen: list[tuple[list[str], dict[str, int]]] = []

    def after(changed: list[str]) -> None:
        # In the writer thread, after the commit: a second connection sees the result.
        reader = sqlite3.connect(tmp_path / "db")
        states = dict(reader.execute("SELECT state, count(*) FROM tasks GROUP BY state"))
        reader.close()
        seen.append((changed, states))

    async def main() -> None:
        await store.commit_tasks([task(1), task(2)], state="dispatched", now=1.0)
        await store.queue_outcomes([Outcome("t1", "success", None, b"r")], 2.0, after)
        pages = int(store._db.execute("PRAGMA page_count").fetchone()[0])
        store._db.execute(f"PRAGMA max_page_count={pages}")
        # Rows that need new pages (payloads kept inline, below FILE_BYTES).
        many = [task(3 + i, bytes(60_000)) for i in range(4)]
        with pytest.raises(StoreError) as full:
            await store.commit_tasks(many, state="dispatched", now=3.0)
        assert full.value.reason == "store.unavailable" and not store.available
        store._db.execute("PRAGMA max_page_count=1073741823")
        await store.commit_tasks([task(3)], state="dispatched", now=3.0)
        assert store.available

    asyncio.run(main())
    assert seen == [(["t1"], {"success": 1, "dispatched": 1})]
    store.close()


def test_close_commits_what_is_queued_and_sync_writes_wait_their_turn(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        big = [task(i, bytes(50_000)) for i in range(40)]
        write = asyncio.ensure_future(store.commit_tasks(big, state="dispatched", now=1.0))
        # A synchronous write meanwhile (from another thread here) takes the lock in turn.
        await loop.run_in_executor(None, store.put_function, "b" * 64, b"g", None, None, 1.0)
        await write
        # Queued and never awaited: the loop ends first; close() must still commit it.
        store.queue_outcomes([Outcome("t0", "success", None, LATE)], 2.0)

    asyncio.run(main())
    store.close()
    again = TaskStore.open(tmp_path / "db")
    try:
        assert again.counts_by_state() == {"dispatched": 39, "success": 1}
        record = again.get("t0")
        assert record is not None and record.result == LATE
        assert again.get_function("b" * 64) == b"g"
    finally:
        again.close()


def test_a_long_wal_is_restarted_unless_the_store_is_writing(tmp_path: Path) -> None:
    # A passive checkpoint never makes the WAL start over; under writes that never
    # pause nothing else does. Past restart_frames the checkpointer takes the write lock
    # and runs a RESTART, but never waits long for a busy store.
    from mepd.writer import Checkpointer

    path = tmp_path / "db"
    store = TaskStore.open(path)
    store._db.execute("PRAGMA wal_autocheckpoint=0")
    for i in range(40):
        store.add_tasks([task(i, bytes(8_000))], state="dispatched", now=1.0)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        Checkpointer(path, lock=store._write_lock, restart_frames=10_000)._checkpoint(db)
        assert statements == ["PRAGMA wal_checkpoint(PASSIVE)"]  # a short WAL: passive
        statements.clear()
        checkpointer = Checkpointer(path, lock=store._write_lock, restart_frames=100)
        with store._write_lock:  # the store is writing
            checkpointer._checkpoint(db)
        assert statements == ["PRAGMA wal_checkpoint(PASSIVE)"]
        statements.clear()
        checkpointer._checkpoint(db)
        assert statements == ["PRAGMA wal_checkpoint(PASSIVE)", "PRAGMA wal_checkpoint(RESTART)"]
    finally:
        db.close()
    assert store._write_lock.acquire(blocking=False)  # given back
    store._write_lock.release()
    store.add_tasks([task(100)], state="dispatched", now=1.0)
    assert len(store.get_many(["t0", "t39", "t100"])) == 3
    store.close()
