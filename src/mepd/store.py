"""The task store: SQLite in WAL mode, in the daemon's state directory.

It holds registered functions (content-addressed by sha256), the *specs* needed to
start a user endpoint again after a restart (endpoint, account, variables, identity,
runtime), and tasks with their opaque payloads and results. Payloads and results are
BLOBs: the daemon never deserializes them (DESIGN.md §3.4).

Durability: every write is one transaction, committed before the caller returns; a
batch of tasks is one ``executemany`` in one transaction. The database runs with
``journal_mode=WAL`` and ``synchronous=NORMAL``: a committed transaction survives the
daemon's crash or ``kill -9`` (the WAL is in the OS page cache and is replayed on the
next open), but the last transactions before a *power loss or kernel crash* may be
lost, because NORMAL does not fsync on every commit. ``durability="full"`` switches to
``synchronous=FULL`` for sites that prefer that guarantee over throughput.

States: ``queued`` (accepted, not yet handed to a user endpoint — after a restart),
``dispatched`` (handed to a user endpoint), and the final ``success``, ``failed``,
``cancelled``. ``recover()`` turns what was dispatched when the daemon died into
``failed``/``task.endpoint_lost`` and returns what is still queued.

Deliberately not here: HTTP, authorization, waking waiters (the pipeline does that).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from mepcore.types import Identity
from mepd.spec import EndpointSpec

FINAL_STATES = ("success", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    name TEXT,
    source TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS specs (
    id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    account TEXT NOT NULL,
    variables TEXT NOT NULL,
    user_runtime TEXT NOT NULL,
    identity TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    account TEXT NOT NULL,
    spec_id TEXT NOT NULL,
    function_id TEXT NOT NULL,
    payload BLOB,
    walltime REAL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    error TEXT,
    result BLOB
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished) WHERE finished IS NOT NULL;
"""


@attrs.frozen
class NewTask:
    task_id: str
    owner: str
    endpoint: str
    account: str
    spec_id: str
    function_id: str
    payload: bytes
    walltime: float | None


@attrs.frozen
class TaskRecord:
    task_id: str
    owner: str
    endpoint: str
    account: str
    spec_id: str
    function_id: str
    state: str
    created: float
    finished: float | None
    error: dict[str, Any] | None
    result: bytes | None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


@attrs.frozen
class Outcome:
    """The end of one task: ``state`` is success, failed or cancelled."""

    task_id: str
    state: str
    error: dict[str, Any] | None = None
    result: bytes | None = None


@attrs.frozen
class QueuedTask:
    task_id: str
    owner: str
    account: str
    spec_id: str
    function_id: str
    payload: bytes
    walltime: float | None


@attrs.frozen
class Recovery:
    lost: tuple[str, ...]
    queued: tuple[QueuedTask, ...]


_RECORD_COLUMNS = (
    "id, owner, endpoint, account, spec_id, function_id, state, created, finished, error, result"
)


def _record(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(
        task_id=row[0],
        owner=row[1],
        endpoint=row[2],
        account=row[3],
        spec_id=row[4],
        function_id=row[5],
        state=row[6],
        created=row[7],
        finished=row[8],
        error=json.loads(row[9]) if row[9] else None,
        result=row[10],
    )


@attrs.define
class TaskStore:
    """The SQLite store. Create with ``TaskStore.open(path)``; close with ``close()``."""

    path: Path
    _db: sqlite3.Connection

    @classmethod
    def open(cls, path: Path, *, durability: str = "normal") -> TaskStore:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        path.chmod(0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=" + ("FULL" if durability == "full" else "NORMAL"))
        db.execute("PRAGMA foreign_keys=OFF")
        db.executescript(_SCHEMA)
        return cls(path, db)

    def close(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()

    # -- functions -------------------------------------------------------------------

    def put_function(
        self, function_id: str, body: bytes, name: str | None, source: str | None, now: float
    ) -> bool:
        """Store a function; False when the same id was already there (idempotent)."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO functions(id, body, name, source, created) VALUES (?,?,?,?,?)",
            (function_id, body, name, source, now),
        )
        return cur.rowcount == 1

    def get_function(self, function_id: str) -> bytes | None:
        row = self._db.execute("SELECT body FROM functions WHERE id=?", (function_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def known_functions(self, function_ids: Iterable[str]) -> set[str]:
        ids = list(set(function_ids))
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT id FROM functions WHERE id IN ({marks})", chunk)  # noqa: S608
            found.update(r[0] for r in rows)
        return found

    # -- specs -----------------------------------------------------------------------

    def put_spec(self, spec: EndpointSpec, now: float) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO specs(id, endpoint, account, variables, user_runtime,"
            " identity, created) VALUES (?,?,?,?,?,?,?)",
            (
                spec.spec_id,
                spec.endpoint,
                spec.account,
                json.dumps(spec.variables, sort_keys=True),
                json.dumps(spec.user_runtime, sort_keys=True),
                json.dumps(spec.identity.to_dict() if spec.identity else {}, sort_keys=True),
                now,
            ),
        )

    def get_spec(self, spec_id: str) -> EndpointSpec | None:
        row = self._db.execute(
            "SELECT id, endpoint, account, variables, user_runtime, identity FROM specs WHERE id=?",
            (spec_id,),
        ).fetchone()
        if row is None:
            return None
        identity = json.loads(row[5])
        return EndpointSpec(
            endpoint=row[1],
            account=row[2],
            variables=json.loads(row[3]),
            user_runtime=json.loads(row[4]),
            identity=Identity.from_mapping(identity) if identity else None,
        )

    # -- tasks -----------------------------------------------------------------------

    def add_tasks(self, tasks: Sequence[NewTask], *, state: str, now: float) -> None:
        """Insert a batch in one transaction; committed when this returns."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO tasks(id, owner, endpoint, account, spec_id, function_id, payload,"
                " walltime, state, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        t.task_id,
                        t.owner,
                        t.endpoint,
                        t.account,
                        t.spec_id,
                        t.function_id,
                        t.payload,
                        t.walltime,
                        state,
                        now,
                    )
                    for t in tasks
                ],
            )

    def mark_dispatched(self, task_ids: Sequence[str]) -> None:
        with self._transaction():
            self._db.executemany(
                "UPDATE tasks SET state='dispatched' WHERE id=? AND state='queued'",
                [(t,) for t in task_ids],
            )

    def finish(
        self, outcomes: Sequence[Outcome], now: float, *, known_open: bool = False
    ) -> list[str]:
        """Record final outcomes in one transaction; returns the ids that changed. A task
        already final (cancelled, or lost then reported) keeps its first outcome.

        ``known_open``: the caller knows every task is still open (the pipeline's own
        in-flight tasks), which allows one ``executemany``; the state guard stays."""
        sql = (
            "UPDATE tasks SET state=?, error=?, result=?, finished=?, payload=NULL"
            " WHERE id=? AND state IN ('queued','dispatched')"
        )
        rows = [
            (
                o.state,
                json.dumps(o.error) if o.error is not None else None,
                o.result,
                now,
                o.task_id,
            )
            for o in outcomes
        ]
        with self._transaction():
            if known_open:
                self._db.executemany(sql, rows)
                return [o.task_id for o in outcomes]
            changed: list[str] = []
            for row in rows:
                if self._db.execute(sql, row).rowcount:
                    changed.append(row[4])
            return changed

    def get(self, task_id: str) -> TaskRecord | None:
        row = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM tasks WHERE id=?",  # noqa: S608
            (task_id,),
        ).fetchone()
        return None if row is None else _record(row)

    def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        out: list[TaskRecord] = []
        ids = list(task_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM tasks WHERE id IN ({marks})",  # noqa: S608
                chunk,
            )
            out.extend(_record(r) for r in rows)
        return out

    def recover(self, now: float) -> Recovery:
        """After a restart: what was dispatched is lost; what was queued is returned."""
        error = json.dumps({"reason": "task.endpoint_lost"})
        with self._transaction():
            lost = [r[0] for r in self._db.execute("SELECT id FROM tasks WHERE state='dispatched'")]
            self._db.execute(
                "UPDATE tasks SET state='failed', error=?, finished=?, payload=NULL"
                " WHERE state='dispatched'",
                (error, now),
            )
        queued = tuple(
            QueuedTask(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), r[6])
            for r in self._db.execute(
                "SELECT id, owner, account, spec_id, function_id, payload, walltime FROM tasks"
                " WHERE state='queued' ORDER BY created, rowid"
            )
        )
        return Recovery(tuple(lost), queued)

    def counts_by_state(self) -> dict[str, int]:
        return {
            r[0]: int(r[1])
            for r in self._db.execute("SELECT state, count(*) FROM tasks GROUP BY state")
        }

    def sweep(self, older_than: float) -> int:
        """Remove final tasks finished before ``older_than``; returns how many."""
        with self._transaction():
            cur = self._db.execute(
                "DELETE FROM tasks WHERE finished IS NOT NULL AND finished < ?", (older_than,)
            )
            self._db.execute(
                "DELETE FROM specs WHERE id NOT IN (SELECT DISTINCT spec_id FROM tasks)"
            )
        return cur.rowcount

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


@attrs.define
class _Transaction:
    db: sqlite3.Connection

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
