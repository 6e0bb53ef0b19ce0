"""Retention by size next to retention by time: an account keeping more finished tasks
or result bytes than its bounds loses its oldest finished tasks early, exactly as the
retention period would remove them; sweeps remove in bounded batches, leave the write
lock free between them and run off the daemon's event loop.

Real SQLite and real files in temporary directories. What happens inside a sweep's
transactions is observed through the store connection's own hooks: a TEMP trigger that
calls back into the test for every deleted row, and SQLite's trace callback for
``BEGIN``/``COMMIT``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import httpx
import pytest

from mepcore.errors import StoreError
from mepd import store as store_module
from mepd.blobs import FILE_BYTES, blob_directory
from mepd.daemon import Daemon, sweep_due, sweep_store, sweep_wanted
from mepd.metrics import Metrics
from mepd.settings import Limits
from mepd.store import SCHEMA_VERSION, Eviction, NewTask, Outcome, SweepReport, TaskStore
from tests.daemon_harness import PipelineKit
from tests.test_api_pipeline import ALICE, assert_error, register, run, submit_body

BIG = FILE_BYTES  # the smallest result kept in a file


def task(task_id: str, account: str = "alice", payload: bytes = b"p") -> NewTask:
    return NewTask(task_id, f"owner-{account}", "hpc", account, "s1", "f" * 64, payload, None)


def finished(
    store: TaskStore, account: str, results: list[bytes], start: float = 10.0, prefix: str = ""
) -> list[str]:
    """Tasks of ``account`` finished one after the other (at ``start``, ``start + 1``…)
    with these results; their ids, oldest first."""
    ids = [f"{prefix or account}-{i}" for i in range(len(results))]
    store.add_tasks([task(t, account) for t in ids], state="dispatched", now=1.0)
    for i, (task_id, result) in enumerate(zip(ids, results, strict=True)):
        store.finish([Outcome(task_id, "success", None, result)], now=start + i)
    return ids


def present(store: TaskStore, ids: list[str]) -> list[str]:
    return [r.task_id for r in store.get_many(ids, results=False)]


def files(path: Path) -> set[str]:
    return set(os.listdir(blob_directory(path)))


@attrs.define
class Transaction:
    deleted: list[str] = attrs.field(factory=list)
    files_at_commit: set[str] | None = None


@attrs.define
class Transactions:
    """What the store's write connection does: per write transaction, the task rows it
    deleted and the files present at its COMMIT; ``at_delete`` is called for each row."""

    path: Path
    seen: list[Transaction] = attrs.field(factory=list)
    at_delete: Callable[[str], None] | None = None

    def install(self, store: TaskStore) -> None:
        db = store._db
        db.create_function("noted_delete", 1, self._deleted)
        db.execute(
            "CREATE TEMP TRIGGER noted AFTER DELETE ON main.tasks"
            " BEGIN SELECT noted_delete(old.id); END"
        )
        db.set_trace_callback(self._statement)

    def _statement(self, sql: str) -> None:
        if sql.startswith("BEGIN"):
            self.seen.append(Transaction())
        elif sql == "COMMIT":
            self.seen[-1].files_at_commit = files(self.path)

    def _deleted(self, task_id: str) -> None:
        self.seen[-1].deleted.append(task_id)
        if self.at_delete is not None:
            self.at_delete(task_id)

    def removals(self) -> list[Transaction]:
        """The transactions that deleted task rows."""
        return [t for t in self.seen if t.deleted]


# -- retention by size ---------------------------------------------------------------------


def test_the_count_bound_removes_the_oldest_of_that_account_only(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    alice = finished(store, "alice", [b"a" * (i + 1) for i in range(10)])
    bob = finished(store, "bob", [b"b"] * 5, start=0.0)  # older than all of alice's
    store.add_tasks([task("alice-open", "alice")], state="dispatched", now=1.0)

    report = store.retain(0.0, max_tasks=6)

    assert report == SweepReport(0, (Eviction("alice", 4, 1 + 2 + 3 + 4),))
    assert present(store, alice) == alice[4:]  # the six newest stay
    assert present(store, bob) == bob  # under the bound: untouched, though older
    assert present(store, ["alice-open"]) == ["alice-open"]
    assert store.retain(0.0, max_tasks=6) == SweepReport()  # within bounds now
    store.close()


def test_the_byte_bound_counts_results_in_rows_and_in_files(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    # Oldest first: a file, a row, a file, a row. Keeping 1 file + 1 row is allowed.
    results = [b"0" * BIG, b"1" * 1000, b"2" * BIG, b"3" * 1000]
    ids = finished(store, "alice", results)
    assert files(path) == {"alice-0.result", "alice-2.result"}

    report = store.retain(0.0, max_bytes=BIG + 1000)

    # Both the file and the row result had to go: each kind is counted.
    assert report.evicted == (Eviction("alice", 2, BIG + 1000),)
    assert present(store, ids) == ids[2:]
    assert files(path) == {"alice-2.result"}
    store.close()


def test_failed_tasks_count_their_error_record(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    store.add_tasks([task("old"), task("new")], state="dispatched", now=1.0)
    error = {"reason": "task.failed", "traceback": "x" * 500}
    store.finish([Outcome("old", "failed", error, None)], now=2.0)
    store.finish([Outcome("new", "success", None, b"r")], now=3.0)
    assert store.retain(0.0, max_bytes=100).evicted[0].tasks == 1
    assert present(store, ["old", "new"]) == ["new"]
    store.close()


def test_unfinished_tasks_are_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks(
        [task("queued", payload=b"q" * BIG), task("queued-small")], state="queued", now=0.5
    )
    store.add_tasks(
        [task("running", payload=b"r" * BIG), task("running-small")], state="dispatched", now=0.5
    )
    done = finished(store, "alice", [b"x" * 10] * 3)

    report = store.retain(0.0, max_tasks=1, max_bytes=1)

    assert report.evicted == (Eviction("alice", 3, 30),)
    open_ids = ["queued", "queued-small", "running", "running-small"]
    assert present(store, open_ids + done) == open_ids
    assert files(path) == {"queued.payload", "running.payload"}
    assert store.counts_by_state() == {"queued": 2, "dispatched": 2}
    store.close()


def test_files_of_removed_tasks_go_after_their_commit_never_before(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    expiring = finished(store, "bob", [b"e" * BIG] * 2, start=1.0)
    evicted = finished(store, "alice", [b"v" * BIG] * 3, start=100.0)
    seen = Transactions(path)
    missing: list[str] = []
    # At each row's delete (inside its transaction) its result file is still there.
    seen.at_delete = lambda t: missing.extend(
        [] if f"{t}.result" in files(path) else [f"{t}.result"]
    )
    seen.install(store)

    report = store.retain(50.0, max_tasks=1, batch=1)

    assert (report.expired, report.evicted) == (2, (Eviction("alice", 2, 2 * BIG),))
    removals = seen.removals()
    assert [t.deleted for t in removals] == [[t] for t in expiring + evicted[:2]]
    assert missing == []
    for t in removals:  # not removed before the commit that stops naming it
        assert t.files_at_commit is not None and f"{t.deleted[0]}.result" in t.files_at_commit
    assert files(path) == {f"{evicted[2]}.result"}  # and gone once committed
    store.close()


def test_a_sweep_removes_in_batches_and_leaves_the_lock_free_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TaskStore.open(tmp_path / "db")
    store.add_tasks([task(f"t{i}") for i in range(53)], state="dispatched", now=1.0)
    store.finish([Outcome(f"t{i}", "success", None, b"r") for i in range(53)], now=2.0)
    finished(store, "bob", [b"b"] * 25, start=100.0)
    seen = Transactions(tmp_path / "db")
    seen.install(store)
    pauses: list[bool] = []
    real_sleep = time.sleep

    def pause(seconds: float) -> None:
        # Between two batches another writer can take the write lock at once.
        free = store._write_lock.acquire(blocking=False)
        if free:
            store._write_lock.release()
        pauses.append(free)
        real_sleep(0)

    monkeypatch.setattr(store_module.time, "sleep", pause)

    report = store.retain(50.0, max_tasks=3, batch=10)

    assert report == SweepReport(53, (Eviction("bob", 22, 22),))
    sizes = [len(t.deleted) for t in seen.removals()]
    assert max(sizes) == 10 and sum(sizes) == 53 + 22
    assert len(sizes) == 6 + 3  # ceil(53 / 10) by time, ceil(22 / 10) by size
    assert pauses and all(pauses)
    assert store.counts_by_state() == {"success": 3}
    store.close()


def test_specs_go_once_no_open_task_names_them(tmp_path: Path) -> None:
    from mepd.spec import EndpointSpec

    store = TaskStore.open(tmp_path / "db")
    kept, dropped = EndpointSpec("hpc", "alice", {"w": 1}), EndpointSpec("hpc", "alice", {"w": 2})
    store.put_spec(kept, 1.0)
    store.put_spec(dropped, 1.0)
    store.add_tasks([attrs.evolve(task("open"), spec_id=kept.spec_id)], state="queued", now=1.0)
    store.add_tasks(
        [attrs.evolve(task("done"), spec_id=dropped.spec_id)], state="dispatched", now=1.0
    )
    store.finish([Outcome("done", "success", None, b"r")], now=2.0)
    store.retain(0.0)
    assert store.get_spec(kept.spec_id) == kept
    assert store.get_spec(dropped.spec_id) is None
    store.close()


def test_a_sweep_after_close_removes_nothing_more(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    finished(store, "alice", [b"x"] * 3)
    store.close()
    with pytest.raises(StoreError) as refused:
        store.retain(1000.0)
    assert refused.value.reason == "store.unavailable"
    store = TaskStore.open(path)
    assert store.counts_by_state() == {"success": 3}
    store.close()


# -- schema 5 ------------------------------------------------------------------------------


def as_version_4(path: Path) -> None:
    """Give a store the shape version 4 had (no ``result_bytes``, no retention index)."""
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX tasks_retained")
        db.execute("ALTER TABLE tasks DROP COLUMN result_bytes")
        db.execute("PRAGMA user_version=4")


def kept_bytes(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT id, result_bytes FROM tasks").fetchall())


def test_migration_4_to_5_fills_result_bytes_from_rows_and_files(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks(
        [task(t) for t in ("row", "file", "file-gone", "failed", "open")],
        state="dispatched",
        now=1.0,
    )
    error = {"reason": "task.failed", "message": "boom"}
    store.finish(
        [
            Outcome("row", "success", None, b"r" * 100),
            Outcome("file", "success", None, b"f" * (BIG + 5)),
            Outcome("file-gone", "success", None, b"g" * BIG),
            Outcome("failed", "failed", error, b"e" * 7),
        ],
        now=2.0,
    )
    store.close()
    expected = {
        "row": 100,
        "file": BIG + 5,
        "file-gone": 0,
        "failed": 7 + len('{"reason": "task.failed", "message": "boom"}'),
        "open": 0,
    }
    assert kept_bytes(path) == {**expected, "file-gone": BIG}  # as written by version 5
    (blob_directory(path) / "file-gone.result").unlink()
    as_version_4(path)

    for _ in range(2):  # a crash after the step, before the version: it runs again
        store = TaskStore.open(path)
        store.close()
        assert kept_bytes(path) == expected
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
            indexes = {r[1] for r in db.execute("PRAGMA index_list(tasks)")}
            db.execute("PRAGMA user_version=4")
        assert "tasks_retained" in indexes


# -- the daemon's sweeper ------------------------------------------------------------------


class RecordingStore(TaskStore):
    """The real store; each ``retain`` notes the thread it ran on."""

    threads: list[int]

    def retain(self, *args: Any, **kwargs: Any) -> SweepReport:
        self.threads.append(threading.get_ident())
        return super().retain(*args, **kwargs)


def recording_store(path: Path) -> RecordingStore:
    store = RecordingStore.open(path)
    assert isinstance(store, RecordingStore)
    store.threads = []
    return store


def test_sweep_store_runs_off_the_loop_and_logs_and_counts_evictions(tmp_path: Path) -> None:
    store = recording_store(tmp_path / "db")
    finished(store, "alice", [b"a" * 10] * 5)
    finished(store, "bob", [b"b"] * 2, start=1.0)
    metrics = Metrics()
    limits = Limits(result_retention=100.0, retained_tasks_per_user=3)

    async def main() -> tuple[SweepReport, int]:
        # At 103 with 100 s of retention, bob's tasks (finished at 1 and 2) are past it.
        report = await sweep_store(store, limits, metrics, now=103.0)
        return report, threading.get_ident()

    report, loop_thread = asyncio.run(main())
    assert store.threads and loop_thread not in store.threads
    assert report == SweepReport(2, (Eviction("alice", 2, 20),))
    text = metrics.render()
    assert 'mepd_results_evicted_total{account="alice"} 2.0' in text
    assert 'mepd_results_evicted_bytes_total{account="alice"} 20.0' in text
    assert "mepd_results_expired_total 2.0" in text
    store.close()


def test_the_daemon_sweeper_sweeps_in_a_worker_thread(tmp_path: Path) -> None:
    store = recording_store(tmp_path / "db")
    finished(store, "alice", [b"a"] * 4, start=time.time())  # within retention
    limits = Limits(retained_tasks_per_user=1)
    daemon = SimpleNamespace(
        settings=SimpleNamespace(limits=limits),
        store=store,
        pipeline=SimpleNamespace(metrics=Metrics()),
    )

    async def main() -> int:
        sweeper = asyncio.create_task(Daemon._sweeper(daemon))  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while store.counts_by_state() != {"success": 1} and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert store.counts_by_state() == {"success": 1}
    assert store.threads and loop_thread not in store.threads
    store.close()


def test_what_finished_since_the_last_sweep_is_counted(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    store.add_tasks([task("a"), task("b"), task("c")], state="dispatched", now=1.0)
    error = {"reason": "task.failed"}
    store.finish([Outcome("a", "success", None, b"r" * 10)], now=2.0)
    late = Outcome("a", "failed", None, b"late")  # "a" is final already: not counted
    store.finish([Outcome("b", "success", None, b"f" * BIG), late], now=3.0)
    store.finish([Outcome("c", "failed", error, None)], now=4.0, known_open=True)
    assert store.finished_since_sweep() == (3, 10 + BIG + len('{"reason": "task.failed"}'))
    store.retain(0.0)
    assert store.finished_since_sweep() == (0, 0)
    store.close()


def test_a_sweep_is_due_early_once_a_tenth_of_a_bound_has_finished(tmp_path: Path) -> None:
    limits = Limits(retained_tasks_per_user=100, retained_result_bytes_per_user=1000)
    assert not sweep_wanted((9, 99), limits)
    assert sweep_wanted((10, 0), limits) and sweep_wanted((0, 100), limits)
    assert sweep_wanted((1, 0), Limits(retained_tasks_per_user=5))  # a tenth of 5: 1

    store = TaskStore.open(tmp_path / "db")
    # The period is 300 s: only what finished can make the sweep due within the deadline.
    long = Limits(result_retention=10**6, retained_tasks_per_user=20)
    finished(store, "alice", [b"x"] * 2, start=time.time())

    async def main() -> None:
        await asyncio.wait_for(sweep_due(store, long, poll=0.01), timeout=60)

    asyncio.run(main())
    store.close()


# -- what a caller sees --------------------------------------------------------------------


def test_an_evicted_task_answers_exactly_as_an_expired_one(tmp_path: Path) -> None:
    async def finish_one(client: httpx.AsyncClient, kit: PipelineKit, fid: str) -> str:
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        (task_id,) = r.json()["task_ids"]
        w = await client.post(
            "/v1/tasks/wait", headers=kit.headers(ALICE), json={"task_ids": [task_id]}
        )
        assert w.json()["tasks"][0]["state"] == "success"
        return str(task_id)

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        first = await finish_one(client, kit, fid)
        second = await finish_one(client, kit, fid)
        store, metrics = kit.pipeline.store, kit.pipeline.metrics
        evict = Limits(retained_tasks_per_user=1)
        report = await sweep_store(store, evict, metrics)
        assert [e.tasks for e in report.evicted] == [1]
        evicted = await client.get(f"/v1/tasks/{first}", headers=kit.headers(ALICE))
        kept = await client.get(f"/v1/tasks/{second}", headers=kit.headers(ALICE))
        assert kept.json()["state"] == "success"

        expire = Limits(result_retention=1.0)
        assert (await sweep_store(store, expire, metrics, now=time.time() + 10)).expired == 1
        expired = await client.get(f"/v1/tasks/{second}", headers=kit.headers(ALICE))
        assert_error(evicted, 404, "task.not_found")
        assert_error(expired, 404, "task.not_found")
        assert evicted.json() == expired.json()
        waits = [
            await client.post(
                "/v1/tasks/wait", headers=kit.headers(ALICE), json={"task_ids": [t], "timeout": 0}
            )
            for t in (first, second)
        ]
        assert [w.json()["unknown"] for w in waits] == [[first], [second]]

    run(tmp_path, scenario)
