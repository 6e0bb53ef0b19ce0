"""The task store: SQLite in WAL mode, in the daemon's state directory.

It holds registered functions (content-addressed by sha256), the *specs* needed to
start a user endpoint again after a restart (endpoint, account, variables, identity,
runtime), and tasks with their opaque payloads and results. Payloads and results are
BLOBs, or files beside the store from ``mepd.blobs.FILE_BYTES`` up (``mepd.blobs``: the
row's ``blobs`` flags say which): the daemon never deserializes them (DESIGN.md §3.4).

Durability: every write is one transaction, committed before the caller returns; a
batch of tasks is one ``executemany`` in one transaction. The writes of the request path
— a submit's tasks with their payloads, a registered function, results — go through
the writer thread (``mepd.writer``: ``commit_tasks``, ``commit_function``,
``queue_outcomes``), which commits what is waiting together (a group commit) and answers
each caller only after the commit; the event loop reads through a connection of its own
(``_reader``), which sees committed data only. The other writes (specs at restart,
endpoints, cancels, sweeps) are made on the caller's thread under the same write lock.
The database runs with ``journal_mode=WAL`` and ``synchronous=NORMAL``: a committed
transaction survives the daemon's crash or ``kill -9`` (the WAL is in the OS page cache
and is replayed on the next open), but the last transactions before a *power loss or
kernel crash* may be lost, because NORMAL does not fsync on every commit.
``durability="full"`` switches to ``synchronous=FULL`` for sites that prefer that
guarantee over throughput.

Retention (``retain``): a finished task is removed when it finished longer ago than the
retention period (by time), or earlier when its account keeps more finished tasks or
more result bytes than its bounds — then the account's oldest finished tasks go first
(by size). Each finished row records the bytes it keeps (``result_bytes``: its result,
in the row or in its file, and its error record), so an account's totals come from the
index ``tasks_retained`` without reading rows or files. A sweep is long on a big store:
it runs on its caller's thread (the daemon's is not the event loop's), removes at most
``SWEEP_BATCH`` rows per write transaction and lets other writers in between batches.

States: ``queued`` (accepted, not yet handed to a user endpoint — after a restart),
``dispatched`` (handed to a user endpoint), and the final ``success``, ``failed``,
``cancelled``. ``recover()`` turns what was dispatched when the daemon died into
``failed``/``task.endpoint_lost`` and returns what is still queued — except the tasks of
user endpoints that outlived the daemon and may be re-adopted (``mepd.adoption``): each
dispatched task names its user endpoint (``uep_id``), and the ``endpoints`` table keeps
what the next daemon verifies before it adopts one (process, account, secret's hash).

The file tells the truth about itself: its schema version is ``PRAGMA user_version``
(forward migrations in ``_MIGRATIONS``); an empty, foreign, newer or unreadable file is
refused at open with ``store.invalid`` — the daemon does not start on it unless told to
set it aside and begin a fresh store (``fresh=True``, ``mepd serve --fresh-store``); and
``PRAGMA integrity_check`` runs at every open, its findings kept in ``problems``. A
failed write (disk full, I/O error) raises ``store.unavailable`` and marks the store
unavailable until a write succeeds again. A row that cannot be read back fails only
itself: it is returned as a failed task with ``task.record_damaged``.

Deliberately not here: HTTP, authorization, waking waiters (the pipeline does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from mepcore.errors import StoreError
from mepcore.types import Identity
from mepd.blobs import PAYLOAD, RESULT, BlobFiles, blob_directory, file_name, in_file
from mepd.spec import EndpointSpec
from mepd.writer import Checkpointer, StoreWriter

_T = TypeVar("_T")
FINAL_STATES = ("success", "failed", "cancelled")
# Writes up to this many payload bytes (and a few rows) may be committed on the event
# loop when the writer thread is idle (``mepd.writer.StoreWriter.submit``).
SMALL_WRITE_BYTES = 64 * 1024
SCHEMA_VERSION = 5
_TABLES = frozenset({"functions", "specs", "tasks"})
# Rows removed by one write transaction of a sweep at most: bounds how long a submit
# waits for the write lock while a sweep runs. Measured over 200,000 finished rows of
# 20 accounts: a batch of 1,000 held the lock 15 ms (oldest first) to 66 ms (one
# account's rows, spread over the table); 5,000 held it up to 260 ms.
SWEEP_BATCH = 1000
# After each batch a sweep leaves the write lock free for as long as the batch held it
# (at most this long), so that writers waiting for it get in: a thread lock is not fair,
# and a sweep that took it again at once could hold off the writer thread for its whole run.
SWEEP_PAUSE_MAX = 0.1

_SCHEMA = (
    """
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
    result BLOB,
    uep_id TEXT,
    resources TEXT,
    blobs INTEGER NOT NULL DEFAULT 0,
    result_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished) WHERE finished IS NOT NULL;
"""
    + """
CREATE TABLE IF NOT EXISTS endpoints (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    exe TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    config_key TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    account_json TEXT NOT NULL,
    created REAL NOT NULL
);
"""
)


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Version 2: each task names its user endpoint; live user endpoints are recorded
    (restart with re-adoption). Written to run on a file that already has either."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
    if "uep_id" not in columns:
        db.execute("ALTER TABLE tasks ADD COLUMN uep_id TEXT")
    db.executescript(_SCHEMA)


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """Version 3: a task keeps its ``resource_specification`` (JSON), so that a task
    sent again (re-adoption, a queued task) still asks for its nodes and ranks."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
    if "resources" not in columns:
        db.execute("ALTER TABLE tasks ADD COLUMN resources TEXT")


def _resources(text: str | None) -> dict[str, Any] | None:
    """A stored ``resource_specification`` (checked again where the task runs)."""
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    """Version 4: large payloads and results may live in files (``mepd.blobs``); the
    row's ``blobs`` flags say which. Rows written before keep theirs inline (0)."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
    if "blobs" not in columns:
        db.execute("ALTER TABLE tasks ADD COLUMN blobs INTEGER NOT NULL DEFAULT 0")


# Each account's finished tasks, oldest first, with the bytes each keeps: the totals per
# account (retention by size) are read from this index alone, never from the rows.
_RETAINED_INDEX = (
    "CREATE INDEX IF NOT EXISTS tasks_retained ON tasks(account, finished, result_bytes)"
    " WHERE finished IS NOT NULL"
)


def _migrate_4_to_5(db: sqlite3.Connection) -> None:
    """Version 5: a finished task records the bytes it keeps (``result_bytes``), and the
    index ``tasks_retained`` answers each account's totals. Rows finished before get
    the size of their result (from the row, or from its file's size: 0 when the file is
    gone) and of their error record. One transaction: a crash leaves version 4, and the
    step runs again."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
    db.execute("BEGIN IMMEDIATE")
    try:
        if "result_bytes" not in columns:
            db.execute("ALTER TABLE tasks ADD COLUMN result_bytes INTEGER NOT NULL DEFAULT 0")
        db.execute(
            "UPDATE tasks SET result_bytes = coalesce(length(result), 0)"
            " + coalesce(length(error), 0) WHERE finished IS NOT NULL"
        )
        directory = _blob_directory_of(db)
        in_files = db.execute(
            "SELECT id FROM tasks WHERE finished IS NOT NULL AND blobs & ? != 0", (RESULT,)
        ).fetchall()
        db.executemany(
            "UPDATE tasks SET result_bytes = result_bytes + ? WHERE id=?",
            [(_file_size(directory, task_id), task_id) for (task_id,) in in_files],
        )
        db.execute(_RETAINED_INDEX)
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def _blob_directory_of(db: sqlite3.Connection) -> Path | None:
    """The files' directory of the store ``db`` has open (None: no file, in memory)."""
    for _seq, name, file in db.execute("PRAGMA database_list"):
        if name == "main" and file:
            return blob_directory(Path(file))
    return None


def _file_size(directory: Path | None, task_id: str) -> int:
    if directory is None:
        return 0
    try:
        return os.lstat(directory / file_name(task_id, RESULT)).st_size
    except OSError:
        return 0


# Version n → n+1. Version 0 with mep's tables is a store written before versions were
# recorded: its tables are version 1's, so the step only records the number.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: lambda db: None,
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
    4: _migrate_4_to_5,
}


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
    # What an MPI task asks for (ResourceSpecification.to_dict()), kept as JSON.
    resources: dict[str, Any] | None = attrs.field(default=None, hash=False)
    # The user endpoint it is dispatched to (``UserEndpointHandle.id``), for re-adoption.
    uep_id: str | None = attrs.field(default=None, hash=False)


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
    resources: dict[str, Any] | None = attrs.field(default=None, hash=False)


@attrs.frozen
class HeldTask:
    """A task dispatched to a user endpoint that outlived the daemon: it stays dispatched
    while that endpoint may still be re-adopted."""

    task_id: str
    owner: str
    account: str
    function_id: str
    uep_id: str


@attrs.frozen
class PendingPayload:
    """What it takes to send a dispatched task again (to an adopted user endpoint that
    never received it)."""

    task_id: str
    owner: str
    function_id: str
    payload: bytes
    walltime: float | None
    resources: dict[str, Any] | None = attrs.field(default=None, hash=False)


@attrs.frozen
class EndpointRecord:
    """A user endpoint that may outlive this daemon, as the next daemon verifies it."""

    endpoint_id: str
    account: str
    uid: int
    gid: int
    pid: int
    start_time: int
    exe: str
    secret_sha256: str
    config_key: str
    endpoint: str
    account_json: str = "{}"
    created: float = 0.0


@attrs.frozen
class Recovery:
    lost: tuple[str, ...]
    queued: tuple[QueuedTask, ...]
    held: tuple[HeldTask, ...] = ()
    # Queued tasks whose payload file was gone: failed with ``task.record_damaged``.
    damaged: tuple[str, ...] = ()


_RECORD_COLUMNS = (
    "id, owner, endpoint, account, spec_id, function_id, state, created, finished, error, result,"
    " blobs"
)
_RECORD_COLUMNS_WITHOUT_RESULT = _RECORD_COLUMNS.replace("result", "NULL")


_DAMAGED = {"reason": "task.record_damaged"}


def _damaged(task_id: str, owner: str | None) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        owner=owner or "",
        endpoint="",
        account="",
        spec_id="",
        function_id="",
        state="failed",
        created=0.0,
        finished=None,
        error=dict(_DAMAGED),
        result=None,
    )


def _record(row: Sequence[Any]) -> TaskRecord:
    """A row as a record; a row whose fields cannot be read is a damaged record."""
    try:
        return _decode(row)
    except (ValueError, TypeError, KeyError, IndexError):
        task_id = row[0] if row and isinstance(row[0], str) else ""
        owner = row[1] if len(row) > 1 and isinstance(row[1], str) else None
        return _damaged(task_id, owner)


def _decode(row: Sequence[Any]) -> TaskRecord:
    error = json.loads(row[9]) if row[9] else None
    if error is not None and not isinstance(error, dict):
        raise ValueError("error is not an object")
    if row[6] not in (*FINAL_STATES, "queued", "dispatched"):
        raise ValueError(f"unknown state {row[6]!r}")
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
        error=error,
        result=None if row[10] is None else bytes(row[10]),
    )


_INSERT_TASK = (
    "INSERT INTO tasks(id, owner, endpoint, account, spec_id, function_id, payload,"
    " walltime, state, created, uep_id, resources, blobs) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_SPEC = (
    "INSERT OR IGNORE INTO specs(id, endpoint, account, variables, user_runtime,"
    " identity, created) VALUES (?,?,?,?,?,?,?)"
)
# The task's id is the last parameter, the finish time the fifth.
_FINISH = (
    "UPDATE tasks SET state=?, error=?, result=?, blobs=?, finished=?, result_bytes=?,"
    " payload=NULL WHERE id=? AND state IN ('queued','dispatched')"
)


def _task_rows(tasks: Sequence[NewTask], state: str, now: float) -> list[tuple[Any, ...]]:
    return [
        (
            t.task_id,
            t.owner,
            t.endpoint,
            t.account,
            t.spec_id,
            t.function_id,
            None if in_file(t.payload) else t.payload,
            t.walltime,
            state,
            now,
            t.uep_id,
            None if t.resources is None else json.dumps(t.resources),
            PAYLOAD if in_file(t.payload) else 0,
        )
        for t in tasks
    ]


def _spec_row(spec: EndpointSpec, now: float) -> tuple[Any, ...]:
    return (
        spec.spec_id,
        spec.endpoint,
        spec.account,
        json.dumps(spec.variables, sort_keys=True),
        json.dumps(spec.user_runtime, sort_keys=True),
        json.dumps(spec.identity.to_dict() if spec.identity else {}, sort_keys=True),
        now,
    )


def _outcome_rows(outcomes: Sequence[Outcome], now: float) -> list[tuple[Any, ...]]:
    rows = []
    for o in outcomes:
        kept = in_file(o.result)
        error = json.dumps(o.error) if o.error is not None else None
        result = None if kept else o.result
        size = len(o.result or b"") + len(error or "")
        rows.append((o.state, error, result, RESULT if kept else 0, now, size, o.task_id))
    return rows


def _finish_rows(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """Final outcomes: the ids whose task was still open (those it changed). One
    ``executemany``; only when it changed fewer rows than given (a task finished
    first by a cancel) are the changed ones looked up: they carry this write's time."""
    if not rows:
        return []
    changed = db.executemany(_FINISH, rows).rowcount
    if changed == len(rows):
        return [row[-1] for row in rows]
    now = rows[0][4]
    mine: set[str] = set()
    for start in range(0, len(rows), 500):
        chunk = [row[-1] for row in rows[start : start + 500]]
        marks = ",".join("?" * len(chunk))
        found = db.execute(
            f"SELECT id FROM tasks WHERE finished=? AND id IN ({marks})",  # noqa: S608
            [now, *chunk],
        )
        mine.update(r[0] for r in found)
    return [row[-1] for row in rows if row[-1] in mine]


def _insert_function(db: sqlite3.Connection, row: tuple[Any, ...]) -> bool:
    cur = db.execute(
        "INSERT OR IGNORE INTO functions(id, body, name, source, created) VALUES (?,?,?,?,?)",
        row,
    )
    return cur.rowcount == 1


@attrs.frozen
class Eviction:
    """Finished tasks of one account removed before their time because the account
    kept more than its bounds (retention by size): how many, and the bytes they kept."""

    account: str
    tasks: int
    bytes: int


@attrs.frozen
class SweepReport:
    """What one ``TaskStore.retain`` removed: by time, and by size per account."""

    expired: int = 0
    evicted: tuple[Eviction, ...] = ()


# A batch of rows to remove, as (rowid, id, blobs, result_bytes): those whose time is
# up, or one account's oldest finished ones (both read from an index, in its order).
_EXPIRED_BATCH = (
    "SELECT rowid, id, blobs, result_bytes FROM tasks"
    " WHERE finished IS NOT NULL AND finished < ? ORDER BY finished LIMIT ?"
)
_OLDEST_BATCH = (
    "SELECT rowid, id, blobs, result_bytes FROM tasks"
    " WHERE account=? AND finished IS NOT NULL ORDER BY finished LIMIT ?"
)
# The accounts over a bound, with their totals: answered from ``tasks_retained`` alone.
_OVER_BOUNDS = (
    "SELECT account, count(*), sum(result_bytes) FROM tasks WHERE finished IS NOT NULL"
    " GROUP BY account HAVING count(*) > ? OR sum(result_bytes) > ?"
)
# No bound: larger than any count or size (SQLite's largest integer).
_UNBOUNDED = 2**63 - 1


def _bound(value: int | None) -> int:
    return _UNBOUNDED if value is None else min(value, _UNBOUNDED)


def _oldest_first(rows: list[Any], *, tasks: int, size: int) -> list[Any]:
    """The first of ``rows`` (oldest first) that make at least ``tasks`` rows and
    ``size`` bytes (their ``result_bytes``, the fourth column)."""
    chosen: list[Any] = []
    taken = 0
    for row in rows:
        if len(chosen) >= tasks and taken >= size:
            break
        chosen.append(row)
        taken += row[3]
    return chosen


@attrs.frozen
class FunctionInfo:
    """A registered function as an administrator sees it: id, name, registration time."""

    function_id: str
    name: str | None
    registered: float


@attrs.define
class TaskStore:
    """The SQLite store. Create with ``TaskStore.open(path)``; close with ``close()``."""

    path: Path
    _db: sqlite3.Connection
    problems: tuple[str, ...] = ()
    available: bool = True
    # Reads on the event loop go through their own connection: they see committed data
    # only and never wait for the writer thread (WAL). None: reads use ``_db``.
    _reader: sqlite3.Connection | None = None
    # Held by every write transaction (the writer thread's and ``_transaction``'s).
    _write_lock: threading.Lock = attrs.field(factory=threading.Lock)
    _writer: StoreWriter | None = None
    # Set (under the write lock) by ``close``: a write transaction begun after it fails.
    _closed: bool = False
    # Held by a sweep (``retain``): one at a time.
    _sweeping: threading.Lock = attrs.field(factory=threading.Lock)
    # Tasks finished since the last sweep began, and their bytes (under the write lock).
    _finished_since_sweep: tuple[int, int] = (0, 0)
    # Large payloads and results (``mepd.blobs``); prepared by ``open``.
    _blobs: BlobFiles = attrs.field(
        default=attrs.Factory(lambda self: BlobFiles(blob_directory(self.path)), takes_self=True)
    )

    @property
    def _read(self) -> sqlite3.Connection:
        return self._reader if self._reader is not None else self._db

    def _writer_thread(self) -> StoreWriter:
        if self._writer is None:
            checkpointer = Checkpointer(self.path, lock=self._write_lock)
            with self._write_lock:
                # The checkpointer copies the WAL from now on, off the committing thread;
                # a WAL that starts over is cut back to 64 MiB.
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                self._db.execute("PRAGMA journal_size_limit=67108864")
            checkpointer.start()
            self._writer = StoreWriter(
                self._db, self._write_lock, self._write_failed, self._wrote, checkpointer
            )
        return self._writer

    def _wrote(self) -> None:
        self.available = True

    @classmethod
    def open(cls, path: Path, *, durability: str = "normal", fresh: bool = False) -> TaskStore:
        """Open (or create) the store at ``path``; ``StoreError("store.invalid")`` when the
        file there is not a usable mep store. With ``fresh``, such a file is renamed to
        ``<name>.<unix time>.bad`` (with its WAL) and a new store is created."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if fresh and path.exists():
            set_aside(path)
        db: sqlite3.Connection | None = None
        try:
            db = _connect(path)
            # Checked before anything is written: a refused file is left as it was.
            _check_and_migrate(path, db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=" + ("FULL" if durability == "full" else "NORMAL"))
            problems = _integrity(db)
            reader = _connect(path)
            stored = _blob_rows(db)
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            raise StoreError(
                "store.invalid",
                f"{path}: not a usable task store ({exc}); keep it for inspection and start "
                "with --fresh-store to set it aside and begin a new one",
            ) from exc
        blobs = BlobFiles.open(blob_directory(path), stored, sync=durability == "full")
        return cls(path, db, problems, reader=reader, blobs=blobs)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
        # Waits for a sweep's batch under way (another thread); its next one is refused.
        with self._write_lock:
            self._closed = True
        if self._reader is not None:
            self._reader.close()
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()

    # -- writes off the event loop (``mepd.writer``): committed when they return ------

    async def commit_function(
        self, function_id: str, body: bytes, name: str | None, source: str | None, now: float
    ) -> bool:
        """``put_function`` through the writer thread."""
        row = (function_id, body, name, source, now)
        small = len(body) + len(source or "") <= SMALL_WRITE_BYTES
        return await self._writer_thread().run(lambda db: _insert_function(db, row), small=small)

    async def commit_tasks(
        self,
        tasks: Sequence[NewTask],
        *,
        state: str,
        now: float,
        spec: EndpointSpec | None = None,
    ) -> None:
        """``put_spec`` (when given) and ``add_tasks`` through the writer thread, in one
        transaction: committed, possibly with other callers' writes, when this returns."""
        await self.queue_tasks(tasks, state=state, now=now, spec=spec)

    def queue_tasks(
        self,
        tasks: Sequence[NewTask],
        *,
        state: str,
        now: float,
        spec: EndpointSpec | None = None,
    ) -> asyncio.Future[None]:
        """``commit_tasks``, queued now: the future is done once committed — at once
        for a small batch committed inline (``mepd.writer.StoreWriter.submit``)."""
        rows = _task_rows(tasks, state, now)
        spec_row = None if spec is None else _spec_row(spec, now)

        def work(db: sqlite3.Connection) -> None:
            with self._payload_files(tasks):
                if spec_row is not None:
                    db.execute(_INSERT_SPEC, spec_row)
                db.executemany(_INSERT_TASK, rows)

        small = sum(len(t.payload) for t in tasks) <= SMALL_WRITE_BYTES and len(tasks) <= 64
        return self._writer_thread().submit(work, small=small)

    def queue_outcomes(
        self,
        outcomes: Sequence[Outcome],
        now: float,
        after: Callable[[list[str]], None] | None = None,
    ) -> asyncio.Future[list[str]]:
        """``finish`` through the writer thread, queued now: the future has the ids
        that changed (a task someone else finished first keeps that outcome);
        ``after`` is called with them in the writer thread once they are committed."""
        rows = _outcome_rows(outcomes, now)
        small = len(rows) <= 64 and sum(len(o.result or b"") for o in outcomes) <= SMALL_WRITE_BYTES

        def committed(changed: list[str]) -> None:
            self._blobs.drop_payloads(changed)
            if after is not None:
                after(changed)

        return self._writer_thread().submit(
            lambda db: self._finish_work(db, outcomes, rows, known_open=False),
            committed,
            small=small,
        )

    # -- large payloads and results in files (``mepd.blobs``) ------------------------

    @contextlib.contextmanager
    def _payload_files(self, tasks: Sequence[NewTask]) -> Iterator[None]:
        """Inside a write transaction, around the inserts of ``tasks``: their large
        payloads written to files first, removed again if the inserts fail."""
        written: list[str] = []
        try:
            for t in tasks:
                if in_file(t.payload):
                    self._blobs.write(t.task_id, PAYLOAD, t.payload)
                    written.append(t.task_id)
            if written:
                self._blobs.synced()
        except OSError as exc:
            self._blobs.remove(written, PAYLOAD)
            raise self._files_failed(exc) from exc
        try:
            yield
        except BaseException:
            self._blobs.remove(written, PAYLOAD)
            raise

    def _finish_work(
        self,
        db: sqlite3.Connection,
        outcomes: Sequence[Outcome],
        rows: Sequence[tuple[Any, ...]],
        *,
        known_open: bool,
    ) -> list[str]:
        """Record outcomes (in a write transaction): large results written to files
        under a temporary name first, given their own name only for the tasks the
        update changed (a task already final keeps its first result and its file)."""
        staged: list[tuple[str, int, Path]] = []
        try:
            for o in outcomes:
                if in_file(o.result):
                    staged.append(self._blobs.stage(o.task_id, RESULT, o.result or b""))
        except OSError as exc:
            self._blobs.settle(staged, set())  # none of them is wanted now
            raise self._files_failed(exc) from exc
        try:
            if known_open:
                db.executemany(_FINISH, rows)
                changed = [o.task_id for o in outcomes]
            else:
                changed = _finish_rows(db, rows)
            self._blobs.settle(staged, set(changed))
        except BaseException:
            self._blobs.settle(staged, set())
            raise
        self._count_finished(rows, changed)
        return changed

    def _count_finished(self, rows: Sequence[tuple[Any, ...]], changed: list[str]) -> None:
        """(Under the write lock.) Add the tasks just finished, and the bytes they keep,
        to what finished since the last sweep began."""
        if len(changed) == len(rows):
            size = sum(row[5] for row in rows)
        else:
            mine = set(changed)
            size = sum(row[5] for row in rows if row[-1] in mine)
        tasks, total = self._finished_since_sweep
        self._finished_since_sweep = (tasks + len(changed), total + size)

    def finished_since_sweep(self) -> tuple[int, int]:
        """The tasks finished since the last sweep began, and the bytes they keep (an
        estimate: a transaction that failed after counting is counted too). A sweep by
        size is due early when these reach a good part of a per-account bound."""
        return self._finished_since_sweep

    def _files_failed(self, exc: OSError) -> StoreError:
        self.available = False
        return StoreError("store.unavailable", f"{self._blobs.directory}: write failed: {exc}")

    # -- functions -------------------------------------------------------------------

    def put_function(
        self, function_id: str, body: bytes, name: str | None, source: str | None, now: float
    ) -> bool:
        """Store a function; False when the same id was already there (idempotent)."""
        with self._transaction():
            return _insert_function(self._db, (function_id, body, name, source, now))

    def get_function(self, function_id: str) -> bytes | None:
        row = self._read.execute("SELECT body FROM functions WHERE id=?", (function_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def known_functions(self, function_ids: Iterable[str]) -> set[str]:
        ids = list(set(function_ids))
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._read.execute(f"SELECT id FROM functions WHERE id IN ({marks})", chunk)  # noqa: S608
            found.update(r[0] for r in rows)
        return found

    def list_functions(self, *, name: str | None = None, limit: int = 1000) -> list[FunctionInfo]:
        """The registered functions, newest first, without their bodies (``mepd functions
        list``); ``name``: only those whose name contains it."""
        rows = self._read.execute(
            "SELECT id, name, created FROM functions"
            " WHERE ?1 IS NULL OR instr(coalesce(name, ''), ?1) > 0"
            " ORDER BY created DESC, id LIMIT ?2",
            (name, limit),
        )
        return [FunctionInfo(r[0], r[1], float(r[2])) for r in rows]

    # -- specs -----------------------------------------------------------------------

    def put_spec(self, spec: EndpointSpec, now: float) -> None:
        with self._transaction():
            self._put_spec(spec, now)

    def _put_spec(self, spec: EndpointSpec, now: float) -> None:
        self._db.execute(_INSERT_SPEC, _spec_row(spec, now))

    def get_spec(self, spec_id: str) -> EndpointSpec | None:
        row = self._read.execute(
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
        with self._transaction(), self._payload_files(tasks):
            self._db.executemany(_INSERT_TASK, _task_rows(tasks, state, now))

    def mark_dispatched(self, task_ids: Sequence[str], uep_id: str | None = None) -> None:
        with self._transaction():
            self._db.executemany(
                "UPDATE tasks SET state='dispatched', uep_id=? WHERE id=? AND state='queued'",
                [(uep_id, t) for t in task_ids],
            )

    def finish(
        self, outcomes: Sequence[Outcome], now: float, *, known_open: bool = False
    ) -> list[str]:
        """Record final outcomes in one transaction; returns the ids that changed. A task
        already final (cancelled, or lost then reported) keeps its first outcome.

        ``known_open``: the caller knows every task is still open (the pipeline's own
        in-flight tasks), which allows one ``executemany``; the state guard stays."""
        rows = _outcome_rows(outcomes, now)
        with self._transaction():
            changed = self._finish_work(self._db, outcomes, rows, known_open=known_open)
        self._blobs.drop_payloads(changed)
        return changed

    def get(self, task_id: str) -> TaskRecord | None:
        return self._read_one(task_id)

    def get_many(self, task_ids: Sequence[str], *, results: bool = True) -> list[TaskRecord]:
        """The records of ``task_ids`` that exist; without ``results``, their result
        bytes are not read (None: the caller has them)."""
        out: list[TaskRecord] = []
        ids = list(task_ids)
        columns = _RECORD_COLUMNS if results else _RECORD_COLUMNS_WITHOUT_RESULT
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            try:
                rows = self._read.execute(
                    f"SELECT {columns} FROM tasks WHERE id IN ({marks})",  # noqa: S608
                    chunk,
                ).fetchall()
            except sqlite3.DatabaseError:
                # A damaged page: read row by row, so only the damaged rows fail.
                found = (self._read_one(t) for t in chunk)
                out.extend(r for r in found if r is not None)
                continue
            out.extend(self._resolved(r, results) for r in rows)
        return out

    def _resolved(self, row: Sequence[Any], results: bool = True) -> TaskRecord:
        """A row as a record, its result read from its file when it has one there; a
        result file that is gone makes it a damaged record."""
        record = _record(row)
        flags = row[11] if len(row) > 11 and isinstance(row[11], int) else 0
        if not (results and flags & RESULT) or record.error == _DAMAGED:
            return record
        data = self._blobs.read(record.task_id, RESULT)
        if data is None:
            return _damaged(record.task_id, record.owner)
        return attrs.evolve(record, result=data)

    def recover(self, now: float, keep: Iterable[str] = ()) -> Recovery:
        """After a restart: what was dispatched is lost — unless it went to one of the
        user endpoints in ``keep`` (alive, awaiting re-adoption: returned as ``held``);
        what was queued is returned."""
        try:
            return self._recover(now, frozenset(keep))
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                "store.invalid",
                f"{self.path}: cannot recover the tasks of the last run ({exc}); start with "
                "--fresh-store to set the store aside and begin a new one",
            ) from exc

    def _recover(self, now: float, keep: frozenset[str]) -> Recovery:
        error = json.dumps({"reason": "task.endpoint_lost"})
        held: list[HeldTask] = []
        lost: list[str] = []
        with self._transaction():
            rows = self._db.execute(
                "SELECT id, owner, account, function_id, uep_id FROM tasks"
                " WHERE state='dispatched' ORDER BY created, rowid"
            ).fetchall()
            for task_id, owner, account, function_id, uep_id in rows:
                if uep_id is not None and uep_id in keep:
                    held.append(HeldTask(task_id, owner, account, function_id, uep_id))
                else:
                    lost.append(task_id)
            self._db.executemany(
                "UPDATE tasks SET state='failed', error=?, finished=?, payload=NULL, blobs=0,"
                " result_bytes=? WHERE id=? AND state='dispatched'",
                [(error, now, len(error), t) for t in lost],
            )
            queued, damaged = self._queued_tasks(now)
        self._blobs.drop_payloads([*lost, *damaged])
        return Recovery(tuple(lost), tuple(queued), tuple(held), tuple(damaged))

    def _queued_tasks(self, now: float) -> tuple[list[QueuedTask], list[str]]:
        """(In ``_recover``'s transaction.) The queued tasks, in order; those whose
        payload file is gone are failed with ``task.record_damaged`` instead."""
        queued: list[QueuedTask] = []
        damaged: list[str] = []
        for r in self._db.execute(
            "SELECT id, owner, account, spec_id, function_id, payload, walltime, resources,"
            " blobs FROM tasks WHERE state='queued' ORDER BY created, rowid"
        ).fetchall():
            payload = self._payload_of(r[0], r[5], r[8])
            if payload is None:
                damaged.append(r[0])
                continue
            queued.append(QueuedTask(r[0], r[1], r[2], r[3], r[4], payload, r[6], _resources(r[7])))
        error = json.dumps(_DAMAGED)
        self._db.executemany(
            "UPDATE tasks SET state='failed', error=?, finished=?, payload=NULL, blobs=0,"
            " result_bytes=? WHERE id=?",
            [(error, now, len(error), t) for t in damaged],
        )
        return queued, damaged

    def _payload_of(self, task_id: str, inline: bytes | None, flags: int) -> bytes | None:
        if flags & PAYLOAD:
            return self._blobs.read(task_id, PAYLOAD)
        return None if inline is None else bytes(inline)

    # -- user endpoints that may outlive the daemon (mepd.adoption) -------------------

    def put_endpoint(self, record: EndpointRecord) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO endpoints(id, account, uid, gid, pid, start_time, exe,"
                " secret_sha256, config_key, endpoint, account_json, created)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                attrs.astuple(record),
            )

    def delete_endpoint(self, endpoint_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM endpoints WHERE id=?", (endpoint_id,))

    def endpoint_records(self) -> list[EndpointRecord]:
        rows = self._read.execute(
            "SELECT id, account, uid, gid, pid, start_time, exe, secret_sha256, config_key,"
            " endpoint, account_json, created FROM endpoints ORDER BY created, id"
        )
        return [EndpointRecord(*r) for r in rows]

    def pending_payloads(self, task_ids: Sequence[str]) -> list[PendingPayload]:
        """The payloads of dispatched tasks (to send them again), in the given order."""
        found: dict[str, PendingPayload] = {}
        ids = list(task_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._read.execute(
                "SELECT id, owner, function_id, payload, walltime, resources, blobs"  # noqa: S608
                f" FROM tasks WHERE state='dispatched' AND id IN ({marks})",
                chunk,
            )
            for r in rows:
                payload = self._payload_of(r[0], r[3], r[6])
                if payload is not None:  # else it cannot be sent again: the caller fails it
                    found[r[0]] = PendingPayload(r[0], r[1], r[2], payload, r[4], _resources(r[5]))
        return [found[t] for t in ids if t in found]

    def counts_by_state(self) -> dict[str, int]:
        return {
            r[0]: int(r[1])
            for r in self._read.execute("SELECT state, count(*) FROM tasks GROUP BY state")
        }

    # -- retention ------------------------------------------------------------------

    def sweep(self, older_than: float, *, batch: int = SWEEP_BATCH) -> int:
        """Remove final tasks finished before ``older_than``; returns how many
        (``retain`` by time alone)."""
        return self.retain(older_than, batch=batch).expired

    def retain(
        self,
        older_than: float,
        *,
        max_tasks: int | None = None,
        max_bytes: int | None = None,
        batch: int = SWEEP_BATCH,
    ) -> SweepReport:
        """Retention: remove the tasks that finished before ``older_than`` (by time);
        then, of each account keeping more than ``max_tasks`` finished tasks or
        ``max_bytes`` result bytes, its oldest finished tasks until it keeps no more
        (by size). Either way a task goes whole: its row, then (after the commit) its
        files; specs no open task names go too.

        Blocking, and long on a big store: call it off the event loop. A write
        transaction removes at most ``batch`` rows, and other writers get the write
        lock between two. Sweeps run one at a time. A store closed meanwhile ends the
        sweep with ``store.unavailable``."""
        with self._sweeping:
            with self._write_lock:
                self._finished_since_sweep = (0, 0)
            expired = self._expire(older_than, batch)
            evicted: list[Eviction] = []
            if max_tasks is not None or max_bytes is not None:
                evicted = self._evict(_bound(max_tasks), _bound(max_bytes), batch)
            self._drop_unused_specs()
        return SweepReport(expired, tuple(evicted))

    def _expire(self, older_than: float, batch: int) -> int:
        expired = 0
        while True:
            removed = self._remove_batch(_EXPIRED_BATCH, (older_than, batch))
            expired += len(removed)
            if len(removed) < batch:
                return expired

    def _evict(self, max_tasks: int, max_bytes: int, batch: int) -> list[Eviction]:
        """Retention by size: the accounts over a bound (their totals read from the
        index ``tasks_retained``, apart from the writers), each down to its bounds."""
        over = self._read_apart(
            lambda db: db.execute(_OVER_BOUNDS, (max_tasks, max_bytes)).fetchall()
        )
        evicted = []
        for account, tasks, size in over:
            found = self._evict_account(account, tasks - max_tasks, size - max_bytes, batch)
            if found.tasks:
                evicted.append(found)
        return evicted

    def _evict_account(self, account: str, tasks: int, size: int, batch: int) -> Eviction:
        """Remove ``account``'s oldest finished tasks until at least ``tasks`` of them
        and ``size`` bytes are gone (either may be 0 or less: no need)."""
        removed = Eviction(account, 0, 0)
        while removed.tasks < tasks or removed.bytes < size:
            choose = functools.partial(
                _oldest_first, tasks=tasks - removed.tasks, size=size - removed.bytes
            )
            rows = self._remove_batch(_OLDEST_BATCH, (account, batch), choose)
            if not rows:
                break
            removed = Eviction(
                account, removed.tasks + len(rows), removed.bytes + sum(r[3] for r in rows)
            )
        return removed

    def _remove_batch(
        self,
        query: str,
        params: tuple[Any, ...],
        choose: Callable[[list[Any]], list[Any]] | None = None,
    ) -> list[Any]:
        """One write transaction: the rows ``query`` selects ((rowid, id, blobs,
        result_bytes), one batch at most), or those of them ``choose`` picks, removed;
        their files removed once that is committed. Then the write lock is left free for
        as long as the transaction held it (``SWEEP_PAUSE_MAX`` at most)."""
        started = time.monotonic()
        with self._transaction():
            rows = self._db.execute(query, params).fetchall()
            if choose is not None:
                rows = choose(rows)
            self._db.executemany("DELETE FROM tasks WHERE rowid=?", [(r[0],) for r in rows])
        held = time.monotonic() - started
        self._blobs.remove([r[1] for r in rows if r[2] & RESULT], RESULT)
        self._blobs.remove([r[1] for r in rows if r[2] & PAYLOAD], PAYLOAD)
        if rows:
            time.sleep(min(held, SWEEP_PAUSE_MAX))  # a pause for other writers
        return rows

    def _drop_unused_specs(self) -> int:
        """Remove the specs no open task names (a queued task needs its spec to start
        its user endpoint again after a restart; a finished one never does). Which are
        named is read apart, without the write lock; under it, only tasks added since
        that read are checked again — a higher rowid, since nothing deletes tasks but
        a sweep, and this one is done deleting — so a spec a submit names again stays."""

        def read(db: sqlite3.Connection) -> tuple[int, list[str]]:
            last = int(db.execute("SELECT coalesce(max(rowid), 0) FROM tasks").fetchone()[0])
            named = {
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT spec_id FROM tasks WHERE state IN ('queued', 'dispatched')"
                )
            }
            return last, [r[0] for r in db.execute("SELECT id FROM specs") if r[0] not in named]

        last, unused = self._read_apart(read)
        if not unused:
            return 0
        with self._transaction():
            cur = self._db.executemany(
                "DELETE FROM specs WHERE id=?1"
                " AND NOT EXISTS (SELECT 1 FROM tasks WHERE rowid > ?2 AND spec_id = ?1)",
                [(spec_id, last) for spec_id in unused],
            )
        return cur.rowcount

    def _read_apart(self, read: Callable[[sqlite3.Connection], _T]) -> _T:
        """``read(db)`` in one read transaction (a snapshot) on a connection of its own:
        neither the write lock nor the event loop's reader is used."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("BEGIN")
            try:
                return read(db)
            finally:
                _rollback(db)
        finally:
            db.close()

    def rename_owners(self, old_prefix: str, new_prefix: str) -> int:
        """Give every task whose owner starts with ``old_prefix`` that prefix replaced
        by ``new_prefix`` (an issuer renamed: ownership is ``<issuer>|<subject>``);
        returns how many."""
        with self._transaction():
            cur = self._db.execute(
                "UPDATE tasks SET owner = ? || substr(owner, ?) WHERE substr(owner, 1, ?) = ?",
                (new_prefix, len(old_prefix) + 1, len(old_prefix), old_prefix),
            )
        return cur.rowcount

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    def _write_failed(self, exc: sqlite3.Error) -> StoreError:
        self.available = False
        return StoreError("store.unavailable", f"{self.path}: write failed: {exc}")

    def damaged_records(self) -> list[str]:
        """Ids of the task rows that cannot be read back (``mepd check --store``)."""
        damaged: list[str] = []
        ids = [r[0] for r in self._read.execute("SELECT id FROM tasks")]
        for task_id in ids:
            record = self._read_one(task_id)
            if record is not None and record.error == _DAMAGED:
                damaged.append(task_id)
        return damaged

    def _read_one(self, task_id: str) -> TaskRecord | None:
        try:
            row = self._read.execute(
                f"SELECT {_RECORD_COLUMNS} FROM tasks WHERE id=?",  # noqa: S608
                (task_id,),
            ).fetchone()
        except sqlite3.DatabaseError:
            return _damaged(task_id, self._owner_of(task_id))
        return None if row is None else self._resolved(row)

    def _owner_of(self, task_id: str) -> str | None:
        try:
            row = self._read.execute("SELECT owner FROM tasks WHERE id=?", (task_id,)).fetchone()
        except sqlite3.DatabaseError:
            return None
        return row[0] if row and isinstance(row[0], str) else None


@attrs.define
class _Transaction:
    """One write transaction; a failure to write marks the store unavailable."""

    store: TaskStore

    def __enter__(self) -> None:
        self.store._write_lock.acquire()
        if self.store._closed:
            self.store._write_lock.release()
            raise StoreError("store.unavailable", f"{self.store.path}: the store is closed")
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            self.store._write_lock.release()
            raise self.store._write_failed(exc) from exc

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._end(exc_type, exc)
        finally:
            self.store._write_lock.release()

    def _end(self, exc_type: object, exc: object) -> None:
        db = self.store._db
        if exc_type is None:
            try:
                db.execute("COMMIT")
            except sqlite3.Error as failure:
                _rollback(db)
                raise self.store._write_failed(failure) from failure
            self.store.available = True
            return
        _rollback(db)
        if isinstance(exc, sqlite3.OperationalError):
            raise self.store._write_failed(exc) from exc


def _rollback(db: sqlite3.Connection) -> None:
    # SQLite may already have ended the transaction on the error: nothing to roll back.
    with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")


def _connect(path: Path) -> sqlite3.Connection:
    existed = path.exists()
    if existed and path.stat().st_size == 0:
        raise sqlite3.DatabaseError("the file is empty (0 bytes)")
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if not existed:
        path.chmod(0o600)
    db.execute("PRAGMA foreign_keys=OFF")
    return db


def _check_and_migrate(path: Path, db: sqlite3.Connection) -> None:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this mep's {SCHEMA_VERSION}"
        )
    if not tables:
        db.executescript(_SCHEMA + _RETAINED_INDEX + ";")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return
    if not tables >= _TABLES:
        raise sqlite3.DatabaseError(f"foreign database: tables {sorted(tables)}")
    while version < SCHEMA_VERSION:
        _MIGRATIONS[version](db)
        version += 1
        db.execute(f"PRAGMA user_version={version}")


def _blob_rows(db: sqlite3.Connection) -> list[tuple[str, int]] | None:
    """(id, flags) of the rows with files; None when damage keeps them from being read
    (then no file is removed as unnamed)."""
    try:
        return db.execute("SELECT id, blobs FROM tasks WHERE blobs != 0").fetchall()
    except sqlite3.DatabaseError:
        return None


def _integrity(db: sqlite3.Connection) -> tuple[str, ...]:
    try:
        rows = [str(r[0]) for r in db.execute("PRAGMA integrity_check(20)")]
    except sqlite3.DatabaseError as exc:  # damage the check itself trips over
        return (f"integrity_check failed: {exc}",)
    return () if rows == ["ok"] else tuple(rows)


def set_aside(path: Path, clock: Callable[[], float] = time.time) -> Path:
    """Rename a store file (and its WAL and shared-memory files) out of the way."""
    aside = path.with_name(f"{path.name}.{int(clock())}.bad")
    for suffix in ("", "-wal", "-shm", ".blobs"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.replace(source, aside.with_name(aside.name + suffix))
    return aside


@attrs.frozen
class StoreReport:
    """What ``mepd check --store`` found in a store file, read without writing to it."""

    path: Path
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()
    counts: dict[str, int] = attrs.field(factory=dict)


def inspect_store(path: Path) -> StoreReport:
    """Open ``path`` read-only and report: a file the daemon would refuse (empty, foreign,
    newer, unreadable), ``PRAGMA integrity_check`` findings, the damaged task records and
    the tasks per state. Nothing is created, migrated or written."""
    if not path.exists():
        return StoreReport(path, notes=(f"{path}: no store yet (the first start creates it)",))
    if path.stat().st_size == 0:
        return StoreReport(path, problems=(f"{path}: the file is empty (0 bytes)",))
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return StoreReport(path, problems=(f"{path}: cannot be opened: {exc}",))
    try:
        return _inspect(path, db)
    except sqlite3.DatabaseError as exc:
        return StoreReport(path, problems=(f"{path}: not a usable task store: {exc}",))
    finally:
        db.close()


def _inspect(path: Path, db: sqlite3.Connection) -> StoreReport:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version > SCHEMA_VERSION:
        return StoreReport(
            path, problems=(f"{path}: schema version {version} is newer than {SCHEMA_VERSION}",)
        )
    if not tables >= _TABLES:
        return StoreReport(path, problems=(f"{path}: foreign database: tables {sorted(tables)}",))
    notes: tuple[str, ...] = ()
    if version < SCHEMA_VERSION:
        notes = (f"{path}: schema version {version}; the next start migrates it",)
    integrity = tuple(f"{path}: integrity: {line}" for line in _integrity(db))
    store = TaskStore(path, db)
    damaged = tuple(store.damaged_records())
    problems = (*integrity, *(f"{path}: task {t}: record damaged" for t in damaged))
    counts: dict[str, int] = {}
    with contextlib.suppress(sqlite3.DatabaseError):  # already among the problems
        counts = store.counts_by_state()
    return StoreReport(path, problems, notes, damaged, counts)
