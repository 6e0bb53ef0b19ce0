"""Large payloads and results live in files beside the store (mepd.blobs): written before
the row that names them commits, removed after the row stops naming them, orphans removed
at open, a missing file reported as a damaged record, never a lost or mixed-up result."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from mepcore.errors import StoreError
from mepd import blobs
from mepd.blobs import FILE_BYTES, blob_directory, file_name
from mepd.store import NewTask, Outcome, TaskStore, set_aside

BIG = FILE_BYTES  # the smallest size kept in a file
SMALL = FILE_BYTES - 1


def task(task_id: str, payload: bytes) -> NewTask:
    return NewTask(task_id, "owner", "hpc", "alice", "s1", "f" * 64, payload, None)


def files(store_path: Path) -> set[str]:
    return set(os.listdir(blob_directory(store_path)))


def row(store_path: Path, task_id: str) -> tuple[bytes | None, bytes | None, int]:
    db = sqlite3.connect(store_path)
    try:
        found = db.execute(
            "SELECT payload, result, blobs FROM tasks WHERE id=?", (task_id,)
        ).fetchone()
    finally:
        db.close()
    return found[0], found[1], found[2]


def test_a_large_payload_and_result_live_in_files_and_go_with_their_task(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    store = TaskStore.open(path)
    payload, result = os.urandom(BIG), os.urandom(BIG + 1)
    store.add_tasks([task("big", payload), task("small", b"p" * SMALL)], state="queued", now=1.0)
    assert files(path) == {"big.payload"}
    assert row(path, "big") == (None, None, blobs.PAYLOAD)
    assert row(path, "small")[0] == b"p" * SMALL  # below the size: in the row
    assert (blob_directory(path) / "big.payload").read_bytes() == payload
    assert oct(os.stat(blob_directory(path) / "big.payload").st_mode & 0o777) == "0o600"
    assert oct(os.stat(blob_directory(path)).st_mode & 0o777) == "0o700"

    assert store.finish([Outcome("big", "success", None, result)], now=2.0) == ["big"]
    assert files(path) == {"big.result"}  # the payload's file went with the finish
    assert row(path, "big") == (None, None, blobs.RESULT)
    (record,) = store.get_many(["big"])
    assert record.result == result and record.state == "success"
    assert store.get_many(["big"], results=False)[0].result is None

    assert store.sweep(older_than=3.0) == 1
    assert files(path) == set()
    store.close()


def test_a_finished_task_keeps_its_first_result_file(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks([task("t", b"x")], state="dispatched", now=1.0)
    first, late = b"1" * BIG, b"2" * BIG
    assert store.finish([Outcome("t", "success", None, first)], now=2.0) == ["t"]
    # A second outcome for the same task (a late answer) changes nothing.
    assert store.finish([Outcome("t", "failed", None, late)], now=3.0) == []
    assert store.get("t").result == first  # type: ignore[union-attr]
    assert files(path) == {"t.result"}  # no temporary file left behind
    store.close()


def test_open_removes_files_no_row_names_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks([task("kept", b"k" * BIG)], state="dispatched", now=1.0)
    store.close()
    directory = blob_directory(path)
    # What a crash between a file's write and its commit leaves, and a staged result.
    (directory / "never-committed.payload").write_bytes(b"x")
    (directory / "t.result.0123456789ab.tmp").write_bytes(b"x")
    store = TaskStore.open(path)
    assert files(path) == {"kept.payload"}
    # The reopened store still knows the payload is in a file: the finish removes it.
    store.finish([Outcome("kept", "success", None, b"r")], now=2.0)
    assert files(path) == set()
    store.close()


def test_a_result_file_gone_reads_as_a_damaged_record(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks([task("t", b"x"), task("u", b"y")], state="dispatched", now=1.0)
    store.finish(
        [Outcome("t", "success", None, b"r" * BIG), Outcome("u", "success", None, b"s" * BIG)],
        now=2.0,
    )
    os.unlink(blob_directory(path) / "t.result")
    records = {r.task_id: r for r in store.get_many(["t", "u"])}
    assert records["t"].state == "failed"
    assert records["t"].error == {"reason": "task.record_damaged"}
    assert records["u"].result == b"s" * BIG  # the other one is unharmed
    assert store.damaged_records() == ["t"]
    store.close()


def test_recovery_reads_queued_payloads_from_files_and_fails_a_missing_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks(
        [task("a", b"a" * BIG), task("b", b"b" * BIG), task("c", b"c")], state="queued", now=1.0
    )
    store.add_tasks([task("d", b"d" * BIG)], state="dispatched", now=1.0)
    store.close()
    os.unlink(blob_directory(path) / "b.payload")

    store = TaskStore.open(path)
    recovery = store.recover(now=2.0)
    assert [(q.task_id, q.payload) for q in recovery.queued] == [("a", b"a" * BIG), ("c", b"c")]
    assert recovery.damaged == ("b",)
    assert recovery.lost == ("d",)
    assert store.get("b").error == {"reason": "task.record_damaged"}  # type: ignore[union-attr]
    assert files(path) == {"a.payload"}  # d's payload went with its loss
    store.close()


def test_pending_payloads_come_from_files(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks([task("a", b"a" * BIG), task("b", b"b")], state="dispatched", now=1.0)
    found = store.pending_payloads(["b", "a", "missing"])
    assert [(p.task_id, p.payload) for p in found] == [("b", b"b"), ("a", b"a" * BIG)]
    os.unlink(blob_directory(path) / "a.payload")
    assert [p.task_id for p in store.pending_payloads(["a", "b"])] == ["b"]
    store.close()


def test_a_failed_file_write_refuses_the_batch_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of the batch
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StoreError) as refused:
        store.add_tasks([task("a", b"a" * BIG), task("b", b"b" * BIG)], state="queued", now=1.0)
    assert refused.value.reason == "store.unavailable" and not store.available
    assert store.get_many(["a", "b"]) == []  # nothing of the batch committed
    assert files(path) == set()  # and no file left of it
    monkeypatch.setattr(os, "write", real_write)
    store.add_tasks([task("a", b"a" * BIG)], state="queued", now=1.0)
    assert store.available and files(path) == {"a.payload"}
    store.close()


def test_full_durability_syncs_each_file_and_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    path = tmp_path / "db"
    store = TaskStore.open(path, durability="full")
    monkeypatch.setattr(os, "fsync", fsync)
    store.add_tasks([task("a", b"a" * BIG)], state="queued", now=1.0)
    directory = str(blob_directory(path))
    assert synced == [f"{directory}/a.payload", directory]
    store.close()


def test_set_aside_takes_the_files_along(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks([task("a", b"a" * BIG)], state="queued", now=1.0)
    store.close()
    aside = set_aside(path, clock=lambda: 1234.0)
    assert (aside.parent / f"{aside.name}.blobs" / "a.payload").read_bytes() == b"a" * BIG
    assert not blob_directory(path).exists()


def test_file_names_never_come_from_odd_ids() -> None:
    assert file_name("0b7e-uuid", blobs.RESULT) == "0b7e-uuid.result"
    for odd in ("../x", ".hidden", "a/b", "", "x" * 200):
        name = file_name(odd, blobs.PAYLOAD)
        assert "/" not in name and not name.startswith(".")
        assert name == f"{name.removesuffix('.payload')}.payload"
        assert len(name.removesuffix(".payload")) == 64


def test_a_failed_result_file_refuses_the_outcomes_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks([task("a", b"a"), task("b", b"b")], state="dispatched", now=1.0)
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the second result's file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    outcomes = [Outcome(t, "success", None, t.encode() * BIG) for t in ("a", "b")]
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StoreError) as refused:
        store.finish(outcomes, now=2.0)
    monkeypatch.setattr(os, "write", real_write)
    assert refused.value.reason == "store.unavailable"
    assert [r.state for r in store.get_many(["a", "b"])] == ["dispatched", "dispatched"]
    assert files(path) == set()  # the first result's staged file went too
    assert store.finish(outcomes, now=3.0) == ["a", "b"]  # kept by the caller, written later
    assert files(path) == {"a.result", "b.result"}
    store.close()
