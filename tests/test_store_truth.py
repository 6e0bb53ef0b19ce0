"""The task store tells the truth: a versioned schema, bad files refused at start, damaged
records failing alone, a full disk answered with 503 and nothing accepted lost.

Real SQLite throughout: a full disk is SQLite's own ``SQLITE_FULL`` (reached with
``PRAGMA max_page_count``), damage is real bytes overwritten in the file.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mepcore.errors import StoreError
from mepd.store import SCHEMA_VERSION, NewTask, Outcome, TaskStore
from tests.daemon_harness import PipelineKit, b64
from tests.test_api_pipeline import run


def task(i: int, owner: str = "alice") -> NewTask:
    return NewTask(f"t{i}", owner, "hpc", "alice", "s1", "f" * 64, f"p{i}".encode(), None)


def version_of(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_a_new_store_records_its_schema_version(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    store.close()
    assert version_of(tmp_path / "db") == SCHEMA_VERSION


def test_a_store_from_before_versions_is_migrated_and_keeps_its_tasks(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    store.add_tasks([task(1)], state="dispatched", now=1.0)
    store.close()
    with sqlite3.connect(tmp_path / "db") as db:
        db.execute("PRAGMA user_version=0")
    store = TaskStore.open(tmp_path / "db")
    assert store.get("t1") is not None
    store.close()
    assert version_of(tmp_path / "db") == SCHEMA_VERSION


@pytest.mark.parametrize("kind", ["empty", "garbage", "foreign", "newer"])
def test_an_unusable_file_is_refused_and_kept_unless_fresh(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "tasks.sqlite3"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a database at all" * 100)
    elif kind == "foreign":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE photos (id INTEGER)")
    else:
        TaskStore.open(path).close()
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    with pytest.raises(StoreError) as refused:
        TaskStore.open(path)
    assert refused.value.reason == "store.invalid"
    assert str(path) in refused.value.detail and "--fresh-store" in refused.value.detail
    assert path.read_bytes() == before  # nothing was changed or lost

    store = TaskStore.open(path, fresh=True)
    store.add_tasks([task(1)], state="dispatched", now=1.0)
    assert store.get("t1") is not None
    store.close()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.endswith(".bad")]
    assert aside.read_bytes() == before


def test_a_damaged_record_fails_alone(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    store.add_tasks([task(i) for i in range(5)], state="dispatched", now=1.0)
    store.finish([Outcome(f"t{i}", "success", None, b"r") for i in range(5)], now=2.0)
    store._db.execute("UPDATE tasks SET error='{not json' WHERE id='t2'")
    store._db.execute("UPDATE tasks SET state='exploded' WHERE id='t3'")
    records = {r.task_id: r for r in store.get_many([f"t{i}" for i in range(5)])}
    assert len(records) == 5
    for damaged in ("t2", "t3"):
        assert records[damaged].state == "failed"
        assert records[damaged].error == {"reason": "task.record_damaged"}
        assert records[damaged].owner == "alice"
    assert records["t1"].state == "success" and records["t1"].result == b"r"
    assert store.damaged_records() == ["t2", "t3"]


def test_damaged_pages_are_found_at_open_and_reads_go_on(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.add_tasks([task(i) for i in range(40)], state="dispatched", now=1.0)
    store.finish(
        [Outcome(f"t{i}", "success", None, bytes([i]) * 20_000) for i in range(40)], now=2.0
    )
    store.close()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8192] = b"\xa5" * 8192  # two pages of garbage, mid-file
    path.write_bytes(bytes(data))

    store = TaskStore.open(path)
    assert store.problems  # PRAGMA integrity_check saw it
    ids = [f"t{i}" for i in range(40)]
    records = store.get_many(ids)  # never an exception for the whole batch
    readable = [r for r in records if r.state == "success"]
    assert (readable and len(readable) < 40) or store.damaged_records()


def fill(store: TaskStore) -> None:
    """Make the database full, as a full disk does (SQLITE_FULL)."""
    pages = int(store._db.execute("PRAGMA page_count").fetchone()[0])
    store._db.execute(f"PRAGMA max_page_count={pages}")


def unfill(store: TaskStore) -> None:
    store._db.execute("PRAGMA max_page_count=1073741823")


def test_a_full_store_refuses_writes_and_recovers(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    fill(store)
    # Payloads kept in the rows (below FILE_BYTES), enough of them to need new pages.
    big = [
        NewTask(f"big{i}", "o", "hpc", "alice", "s1", "f" * 64, b"x" * 60_000, None)
        for i in range(4)
    ]
    with pytest.raises(StoreError) as full:
        store.add_tasks(big, state="dispatched", now=1.0)
    assert full.value.reason == "store.unavailable" and not store.available
    assert store.get("big0") is None  # rolled back whole
    unfill(store)
    store.add_tasks(big, state="dispatched", now=1.0)
    assert store.available and store.get("big0") is not None


def test_a_full_disk_is_a_503_and_results_wait_for_it(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        alice = {"Authorization": f"Bearer {kit.token('alice@example.org')}"}
        fid = (
            await client.post("/v1/functions", headers=alice, json={"function": b64(b"fn")})
        ).json()["function_id"]
        kit.endpoints.hold = True
        body = {"tasks": [{"function_id": fid, "args": b64(b"held")}]}
        task_id = (await client.post("/v1/endpoints/hpc/submit", headers=alice, json=body)).json()[
            "task_ids"
        ][0]
        store = kit.pipeline.store
        fill(store)
        # Kept in the rows (each below FILE_BYTES), enough to need new pages.
        big = {"tasks": [{"function_id": fid, "args": b64(b"x" * 60_000)} for _ in range(5)]}
        r = await client.post("/v1/endpoints/hpc/submit", headers=alice, json=big)
        assert r.status_code == 503 and r.json()["error"]["reason"] == "store.unavailable"
        assert r.headers["retry-after"]
        assert (await client.get("/healthz")).status_code == 503

        # A result arrives while the disk is full: it waits, it is not lost. (The
        # result needs new pages, so the write fails.)
        (handle,) = kit.endpoints.handles.values()
        held = handle.held[0]
        handle.result(held.task_id, {"task_id": held.task_id, "status": "success"}, b"r" * 60_000)
        for _ in range(20):
            await asyncio.sleep(0)
        view = (await client.get(f"/v1/tasks/{task_id}", headers=alice)).json()
        assert view["state"] == "running"

        unfill(store)
        w = await client.post(
            "/v1/tasks/wait", headers=alice, json={"task_ids": [task_id], "timeout": 10}
        )
        (done,) = w.json()["tasks"]
        assert done["state"] == "success"
        assert base64.b64decode(done["result"]) == b"r" * 60_000
        assert (await client.get("/healthz")).status_code == 200

    run(tmp_path, scenario)


def test_mepd_serve_refuses_an_empty_store_and_fresh_store_starts(tmp_path: Path) -> None:
    from tests.daemon_harness import start_daemon, write_deployment

    config = write_deployment(tmp_path / "site", python=sys.executable)
    state = tmp_path / "site" / "state"
    state.mkdir(mode=0o700)
    (state / "tasks.sqlite3").write_bytes(b"")
    refused = subprocess.run(
        [sys.executable, "-m", "mepd", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "tasks.sqlite3" in refused.stderr and "--fresh-store" in refused.stderr
    assert (state / "tasks.sqlite3").stat().st_size == 0

    daemon = start_daemon(config, state, extra_args=["--fresh-store"])
    try:
        assert daemon.client(daemon.token("x@example.org")).get("/healthz").status_code == 200
    finally:
        daemon.stop()
    (aside,) = [p for p in state.iterdir() if p.name.endswith(".bad")]
    assert aside.stat().st_size == 0
    assert (state / "tasks.sqlite3").stat().st_size > 0


def check_store(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepd", "check", "--config", str(config), "--store"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mepd_check_store_reports_damaged_records_and_writes_nothing(tmp_path: Path) -> None:
    from tests.daemon_harness import write_deployment

    config = write_deployment(tmp_path / "site", python=sys.executable)
    state = tmp_path / "site" / "state"
    state.mkdir(mode=0o700)
    missing = check_store(config)
    assert missing.returncode == 0, missing.stderr
    assert "no store yet" in missing.stdout and not (state / "tasks.sqlite3").exists()

    store = TaskStore.open(state / "tasks.sqlite3")
    store.add_tasks([task(i) for i in range(4)], state="dispatched", now=1.0)
    store.finish([Outcome("t0", "success", None, b"r")], now=2.0)
    store.close()
    healthy = check_store(config)
    assert healthy.returncode == 0, healthy.stderr
    assert "tasks: 3 dispatched, 1 success" in healthy.stdout

    with sqlite3.connect(state / "tasks.sqlite3") as db:
        db.execute("UPDATE tasks SET state='exploded' WHERE id='t2'")
    db.close()
    before = (state / "tasks.sqlite3").read_bytes()
    damaged = check_store(config)
    assert damaged.returncode == 2
    assert "store: " in damaged.stderr and "task t2: record damaged" in damaged.stderr
    # Only t2 is named (not "t1" alone: the random test directory's name may hold it).
    assert [line for line in damaged.stderr.splitlines() if "task t" in line] == [
        line for line in damaged.stderr.splitlines() if "task t2: record damaged" in line
    ]
    assert "task t1" not in damaged.stderr and "task t3" not in damaged.stderr
    assert (state / "tasks.sqlite3").read_bytes() == before  # read-only


@pytest.mark.parametrize("kind", ["empty", "foreign", "newer"])
def test_mepd_check_store_names_a_file_the_daemon_would_refuse(tmp_path: Path, kind: str) -> None:
    from tests.daemon_harness import write_deployment

    config = write_deployment(tmp_path / "site", python=sys.executable)
    state = tmp_path / "site" / "state"
    state.mkdir(mode=0o700)
    path = state / "tasks.sqlite3"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE photos (id INTEGER)")
        db.close()
    else:
        TaskStore.open(path).close()
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        db.close()
    before = path.read_bytes()
    refused = check_store(config)
    assert refused.returncode == 2
    expected = {"empty": "empty", "foreign": "foreign database", "newer": "is newer than"}
    assert expected[kind] in refused.stderr and str(path) in refused.stderr
    assert path.read_bytes() == before
    without = subprocess.run(
        [sys.executable, "-m", "mepd", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert without.returncode == 0, without.stderr  # the store is checked only when asked
