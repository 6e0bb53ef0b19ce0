"""The SQLite task store: durability, restart semantics, retention, on a real file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from mepcore.types import Identity
from mepd.spec import EndpointSpec
from mepd.store import NewTask, Outcome, TaskStore


def task(i: int, owner: str = "alice", spec: str = "s1") -> NewTask:
    return NewTask(f"t{i}", owner, "hpc", "alice", spec, "f" * 64, f"p{i}".encode(), 10.0)


def test_functions_are_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    assert store.put_function("a" * 64, b"body", "f", "def f(): ...", 1.0)
    assert not store.put_function("a" * 64, b"body", "f", None, 2.0)
    assert store.get_function("a" * 64) == b"body"
    assert store.known_functions(["a" * 64, "b" * 64]) == {"a" * 64}
    store.close()
    assert (tmp_path / "db").stat().st_mode & 0o777 == 0o600


def test_batch_is_durable_across_reopen_and_states_move(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    store.add_tasks([task(i) for i in range(100)], state="dispatched", now=5.0)
    changed = store.finish(
        [Outcome("t1", "success", None, b"r1"), Outcome("t2", "failed", {"reason": "task.failed"})],
        now=6.0,
    )
    assert changed == ["t1", "t2"]
    # A second outcome for a final task is ignored (the first one stands).
    assert store.finish([Outcome("t1", "failed", {"reason": "task.endpoint_lost"})], 7.0) == []
    store.close()
    store = TaskStore.open(tmp_path / "db")
    rec = store.get("t1")
    assert rec is not None and rec.state == "success" and rec.result == b"r1"
    assert rec.finished == 6.0 and rec.is_final
    assert store.counts_by_state() == {"dispatched": 98, "success": 1, "failed": 1}
    assert len(store.get_many([f"t{i}" for i in range(100)] + ["zz"])) == 100


def test_recover_fails_dispatched_and_returns_queued(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    store.add_tasks([task(1), task(2)], state="dispatched", now=1.0)
    store.add_tasks([task(3), task(4)], state="queued", now=2.0)
    store.finish([Outcome("t2", "success", None, b"ok")], 3.0)
    store.close()
    store = TaskStore.open(tmp_path / "db")
    recovery = store.recover(now=10.0)
    assert recovery.lost == ("t1",)
    assert [q.task_id for q in recovery.queued] == ["t3", "t4"]
    assert recovery.queued[0].payload == b"p3"
    lost = store.get("t1")
    assert lost is not None and lost.state == "failed"
    assert lost.error == {"reason": "task.endpoint_lost"}
    ok = store.get("t2")
    assert ok is not None and ok.result == b"ok"
    store.mark_dispatched(["t3"])
    assert store.recover(now=11.0).lost == ("t3",)


def test_commit_survives_kill_9_of_the_writer(tmp_path: Path) -> None:
    """A child commits a batch then dies by SIGKILL without closing: nothing is lost."""
    script = textwrap.dedent(f"""
        import os, signal
        from mepd.store import NewTask, TaskStore
        store = TaskStore.open(__import__("pathlib").Path({str(tmp_path / "db")!r}))
        store.add_tasks([NewTask(f"t{{i}}", "o", "hpc", "a", "s", "f" * 64, b"x", None)
                         for i in range(5000)], state="queued", now=1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    store = TaskStore.open(tmp_path / "db")
    assert len(store.recover(now=2.0).queued) == 5000


def test_specs_round_trip_and_sweep_removes_old_results(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    spec = EndpointSpec(
        "hpc", "alice", {"workers": 2}, {"python": "3.11"}, Identity("x", {"id": "x"})
    )
    store.put_spec(spec, 1.0)
    assert store.get_spec(spec.spec_id) == spec
    store.add_tasks([task(i, spec=spec.spec_id) for i in (1, 2, 3)], state="dispatched", now=1.0)
    store.finish([Outcome("t1", "success", None, b"a")], now=100.0)
    store.finish([Outcome("t2", "success", None, b"b")], now=200.0)
    assert store.sweep(older_than=150.0) == 1
    assert store.get("t1") is None
    assert store.get("t2") is not None
    assert store.get_spec(spec.spec_id) is not None  # still referenced by t2, t3
    store.finish([Outcome("t3", "cancelled", {"reason": "task.cancelled"})], now=200.0)
    assert store.sweep(older_than=1000.0) == 2
    assert store.get_spec(spec.spec_id) is None
