"""Large task payloads and results, as files beside the task store.

A task's payload or result of at least ``FILE_BYTES`` is not kept in its SQLite row but
in a file of its own in ``<store file>.blobs/`` (``<task id>.payload``,
``<task id>.result``), and the row says so (``tasks.blobs``: ``PAYLOAD``, ``RESULT``).
SQLite rewrites a whole row on every update of it, and copies every committed page
twice (into the WAL, then into the database file): a megabyte kept in a row costs
several milliseconds per state change, a megabyte in a file one write.

Order of writes, so that a crash at any point loses nothing committed and leaves
nothing that is not cleaned up: the file is written (and, with ``durability="full"``,
fsynced with its directory) before the transaction that names it commits; a file is
removed only after the transaction that stops naming it has committed. A file no row
names — a transaction that failed or was cut short by a crash — is removed when the
store is opened (``BlobFiles.open``). A row that names a file that is gone (removed by
hand) reads back as a damaged record (``task.record_damaged``).

The directory is the daemon's (mode 0700, inside its verified state directory); files
are created 0600 with ``O_NOFOLLOW``. Deliberately not here: SQL (the store says which
files its rows name).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

import attrs

PAYLOAD = 1
RESULT = 2
# A payload or result at least this big is kept in a file rather than in its row.
FILE_BYTES = 64 * 1024

_SUFFIX = {PAYLOAD: ".payload", RESULT: ".result"}
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def in_file(data: bytes | None) -> bool:
    """Whether a payload or result is kept in a file rather than in its row."""
    return data is not None and len(data) >= FILE_BYTES


def blob_directory(store_path: Path) -> Path:
    """Where the store at ``store_path`` keeps its large payloads and results."""
    return store_path.with_name(store_path.name + ".blobs")


def file_name(task_id: str, kind: int) -> str:
    """A task's file name: its id when that is a plain name (mepd's ids are UUIDs),
    else the id's sha256 (a name never comes from a caller's bytes)."""
    stem = task_id if _PLAIN_ID.fullmatch(task_id) else hashlib.sha256(task_id.encode()).hexdigest()
    return stem + _SUFFIX[kind]


@attrs.define(eq=False)
class BlobFiles:
    """The files of one store. ``open`` prepares the directory and removes what no row
    names; a ``BlobFiles`` made without it only reads (``mepd check --store``)."""

    directory: Path
    sync: bool = False
    # Tasks whose payload is in a file: the file goes once the task has finished.
    _payloads: set[str] = attrs.field(factory=set)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    @classmethod
    def open(
        cls, directory: Path, stored: Iterable[tuple[str, int]] | None, *, sync: bool = False
    ) -> BlobFiles:
        """The files of a store whose rows name ``stored`` ((task id, flags) of every
        row with ``blobs`` set); files no row names are removed. ``stored`` None (a
        damaged store whose rows cannot all be read): every file is kept."""
        directory.mkdir(mode=0o700, exist_ok=True)
        named: set[str] = set()
        payloads: set[str] = set()
        for task_id, flags in stored or ():
            for kind in (PAYLOAD, RESULT):
                if flags & kind:
                    named.add(file_name(task_id, kind))
            if flags & PAYLOAD:
                payloads.add(task_id)
        with os.scandir(directory) as entries:
            for entry in entries:
                if stored is None and entry.name.endswith(_SUFFIX[PAYLOAD]):
                    payloads.add(entry.name.removesuffix(_SUFFIX[PAYLOAD]))
                elif stored is not None and entry.name not in named:
                    with contextlib.suppress(OSError):  # gone already, or not a file
                        os.unlink(entry.path)
        found = cls(directory, sync)
        found._payloads = payloads
        return found

    def write(self, task_id: str, kind: int, data: bytes) -> None:
        """Write a task's payload or result (replacing a file of the same name)."""
        self._write_file(self.directory / file_name(task_id, kind), data)
        if kind == PAYLOAD:
            with self._lock:
                self._payloads.add(task_id)

    def _write_file(self, path: Path, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.sync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):  # a partial file is no file
                os.unlink(path)
            raise
        finally:
            os.close(fd)

    def synced(self) -> None:
        """With ``sync``: make the names of the files just written durable."""
        if not self.sync:
            return
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def stage(self, task_id: str, kind: int, data: bytes) -> tuple[str, int, Path]:
        """Write a file under a temporary name, for ``settle`` to name or drop once the
        transaction knows whether it is wanted."""
        temporary = self.directory / f"{file_name(task_id, kind)}.{os.urandom(6).hex()}.tmp"
        self._write_file(temporary, data)
        return task_id, kind, temporary

    def settle(self, staged: Iterable[tuple[str, int, Path]], wanted: set[str]) -> None:
        """Give the staged files of the ``wanted`` tasks their names; remove the others
        (a file no row names is removed at the next ``open`` anyway)."""
        renamed = False
        for task_id, kind, temporary in staged:
            if task_id in wanted:
                os.replace(temporary, self.directory / file_name(task_id, kind))
                renamed = True
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
        if renamed:
            self.synced()

    def read(self, task_id: str, kind: int) -> bytes | None:
        """A task's payload or result; None when its file is gone."""
        path = self.directory / file_name(task_id, kind)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with os.fdopen(fd, "rb") as fh:
            return fh.read()

    def remove(self, task_ids: Iterable[str], kind: int) -> None:
        """Remove these tasks' files of ``kind`` (those there are)."""
        for task_id in task_ids:
            if kind == PAYLOAD:
                with self._lock:
                    self._payloads.discard(task_id)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / file_name(task_id, kind))

    def drop_payloads(self, task_ids: Iterable[str]) -> None:
        """The payload files of these tasks, which have finished (committed)."""
        with self._lock:
            if not self._payloads:
                return
            mine = [t for t in task_ids if t in self._payloads]
        if mine:
            self.remove(mine, PAYLOAD)
