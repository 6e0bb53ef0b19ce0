"""Re-adoption without root: the checks a connection must pass, the store's records and
tasks held for adoption, the user endpoint's result buffer and its start fields."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from mepcore.tasks import ResultEnvelope
from mepd.adoption import (
    Hello,
    Peer,
    ProcessFacts,
    hello_problem,
    open_verified_pidfd,
    peer_problem,
    process_problem,
    read_process,
    secret_hash,
    survey,
)
from mepd.store import EndpointRecord, NewTask, TaskStore
from mepd.uep.orphan import REPLAY_SECONDS, AdoptionInfo, ResultBuffer

SECRET = "a" * 64


def record(**changes: Any) -> EndpointRecord:
    base = EndpointRecord(
        endpoint_id="alice/0123456789abcdef/3",
        account="alice",
        uid=2001,
        gid=2001,
        pid=4242,
        start_time=123456,
        exe="/usr/bin/python3.11",
        secret_sha256=secret_hash(SECRET),
        config_key="k" * 64,
        endpoint="hpc",
    )
    return attrs.evolve(base, **changes)


def facts(**changes: Any) -> ProcessFacts:
    base = ProcessFacts(4242, (2001,) * 4, (2001,) * 4, 123456, "/usr/bin/python3.11")
    return attrs.evolve(base, **changes)


PEER = Peer(4242, 2001, 2001)


def test_the_recorded_process_and_peer_with_the_secret_are_adopted() -> None:
    assert process_problem(record(), facts()) is None
    assert peer_problem(record(), PEER, facts(), SECRET) is None


@pytest.mark.parametrize(
    ("found", "why"),
    [
        (None, "no longer exists"),
        (facts(start_time=123457), "start time differs"),
        (facts(uids=(2001, 0, 2001, 2001)), "uids"),
        (facts(uids=()), "uids"),
        (facts(gids=(2001, 2002, 2001, 2001)), "gids"),
        (facts(exe="/tmp/evil"), "executes /tmp/evil"),
    ],
)
def test_a_process_that_is_not_the_recorded_one_is_refused(
    found: ProcessFacts | None, why: str
) -> None:
    problem = process_problem(record(), found)
    assert problem is not None and why in problem
    assert peer_problem(record(), PEER, found, SECRET) == problem


@pytest.mark.parametrize(
    ("peer", "secret", "why"),
    [
        (Peer(4242, 2002, 2002), SECRET, "peer uid/gid"),  # another account's process
        (Peer(4242, 2001, 0), SECRET, "peer uid/gid"),
        (Peer(4243, 2001, 2001), SECRET, "peer pid"),  # the same account, another process
        (PEER, "b" * 64, "wrong secret"),
        (PEER, "", "wrong secret"),
    ],
)
def test_a_peer_that_is_not_the_recorded_endpoint_is_refused(
    peer: Peer, secret: str, why: str
) -> None:
    problem = peer_problem(record(), peer, facts(), secret)
    assert problem is not None and why in problem


def test_hello_frames_are_checked() -> None:
    good = {"kind": "adopt", "endpoint_id": "a/b/1", "secret": SECRET, "held": ["t1", "t2"]}
    assert hello_problem(good) == Hello("a/b/1", SECRET, ("t1", "t2"))
    for bad in (
        {**good, "kind": "ready"},
        {**good, "endpoint_id": ""},
        {**good, "endpoint_id": "a\nb"},
        {**good, "endpoint_id": 3},
        {**good, "secret": None},
        {**good, "secret": "x" * 300},
        {**good, "held": "t1"},
        {**good, "held": ["t1", 2]},
        {**good, "held": ["x" * 300]},
    ):
        assert isinstance(hello_problem(bad), str), bad


def test_read_process_describes_a_live_process_and_not_a_gone_one() -> None:
    me = read_process(os.getpid())
    assert me is not None
    assert me.uids[0] == os.getuid() and me.gids[0] == os.getgid()
    assert me.exe == os.path.realpath(sys.executable)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert read_process(child.pid) is None


def live_record(pid: int, **changes: Any) -> EndpointRecord:
    found = read_process(pid)
    assert found is not None
    return record(
        pid=pid,
        uid=found.uids[0],
        gid=found.gids[0],
        start_time=found.start_time,
        exe=found.exe,
        **changes,
    )


def test_survey_keeps_live_endpoints_and_drops_reused_pids(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store = TaskStore.open(tmp_path / "db")
        live = live_record(sleeper.pid, endpoint_id="u/k/1")
        reused = attrs.evolve(live, endpoint_id="u/k/2", start_time=live.start_time - 1)
        store.put_endpoint(live)
        store.put_endpoint(reused)
        store.add_tasks(
            [
                NewTask(f"t{n}", "o", "hpc", "u", "s", "f" * 64, b"p", None, uep_id=eid)
                for n, eid in ((1, "u/k/1"), (2, "u/k/2"), (3, None))
            ],
            state="dispatched",
            now=1.0,
        )
        found = survey(store)
        assert found.keep == {"u/k/1"}
        assert [(r.endpoint_id, "reused" in why) for r, why in found.dropped] == [("u/k/2", True)]
        recovery = store.recover(2.0, found.keep)
        assert [h.task_id for h in recovery.held] == ["t1"]
        assert sorted(recovery.lost) == ["t2", "t3"]
        assert [r.endpoint_id for r in store.endpoint_records()] == ["u/k/1"]
        assert [p.task_id for p in store.pending_payloads(["t1", "t2"])] == ["t1"]
        for pending in found.pending:
            os.close(pending.pidfd)
        store.close()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert isinstance(open_verified_pidfd(live), str)  # gone now


def test_a_version_1_store_gains_the_endpoint_columns(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = TaskStore.open(path)
    store.close()
    with sqlite3.connect(path) as db:  # the shape version 1 had
        db.execute("DROP TABLE endpoints")
        db.execute("ALTER TABLE tasks DROP COLUMN uep_id")
        db.execute("PRAGMA user_version=1")
    store = TaskStore.open(path)
    store.add_tasks(
        [NewTask("t1", "o", "hpc", "u", "s", "f" * 64, b"p", None, uep_id="u/k/1")],
        state="dispatched",
        now=1.0,
    )
    store.put_endpoint(record())
    assert store.endpoint_records() == [record()]
    store.close()


def result(task_id: str, size: int) -> ResultEnvelope:
    return ResultEnvelope(
        task_id=task_id,
        status="success",
        payload=b"x" * size,
        received=1.0,
        started=1.0,
        finished=1.0,
    )


def test_the_result_buffer_is_bounded_and_replays_what_is_wanted() -> None:
    buffer = ResultBuffer(limit=100)
    buffer.sent([result("sent-old", 10)], now=0.0)
    buffer.sent([result("sent-new", 10)], now=REPLAY_SECONDS + 1)  # the old one ages out
    buffer.hold([result("held-1", 60), result("held-2", 60)])  # the second is over the bound
    assert buffer.ids() == {"sent-new", "held-1", "held-2"}
    taken = {r.task_id: r for r in buffer.take({"held-1", "held-2", "sent-new"})}
    assert set(taken) == {"held-1", "held-2", "sent-new"}
    assert taken["held-1"].payload == b"x" * 60
    full = taken["held-2"]
    assert full.status == "failed" and full.error is not None
    assert full.error.reason == "task.result_buffer_full"
    assert buffer.ids() == set()
    buffer.hold([result("not-wanted", 1)])
    assert buffer.take(set()) == []


def test_adoption_fields_of_the_start_message() -> None:
    assert AdoptionInfo.from_start({}) is None
    fields = {
        "endpoint_id": "u/k/1",
        "socket": "/var/lib/mep/state/adopt/adopt.sock",
        "secret": SECRET,
        "daemon_uid": 0,
        "grace_period": 300,
        "result_buffer_bytes": 1024,
    }
    info = AdoptionInfo.from_start({"adoption": fields})
    assert info is not None and info.grace_period == 300.0
    for bad in ({**fields, "socket": "relative"}, {**fields, "grace_period": 0}, {"x": 1}, []):
        with pytest.raises(ValueError):
            AdoptionInfo.from_start({"adoption": bad})
