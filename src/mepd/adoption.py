"""Re-adoption: user endpoints that outlived their daemon, verified and taken back.

With ``restart.adopt_endpoints`` a user endpoint does not die with the daemon (no
parent-death signal). Its start message carries the path of the adoption socket and a
random per-endpoint secret (never argv or the environment); the daemon keeps an
``EndpointRecord`` in its store: endpoint id, account, uid, gid, pid, process start time
(``/proc/<pid>/stat`` field 22), executable (``/proc/<pid>/exe``) and the sha256 of the
secret. When its channel ends, the endpoint keeps running its tasks, buffers their
results and connects to the socket until the grace period ends (``mepd.uep.server``).

A restarting daemon (``Adoption``):
- reads the records; one whose process is gone, or whose start time, uids, gids or
  executable differ (the pid was reused) is dropped and its dispatched tasks are lost
  (``task.endpoint_lost``, as without adoption); for a live one a pidfd is opened and the
  start time checked again (so the pidfd is that process), and its dispatched tasks stay
  in flight, bound to it;
- while endpoints await adoption, listens on ``<state_dir>/adopt/adopt.sock`` (the
  directory root's, 0711; the socket 0666: who may connect is decided by peer
  credentials and the secret, not the mode; at most ``MAX_HANDSHAKES`` connections in
  their hello at once, ``MAX_HANDSHAKES_PER_UID`` of one uid).
  The first frame of a connection must be ``adopt`` with the endpoint id, the secret and
  the ids of the tasks the endpoint still holds. The peer's ``SO_PEERCRED`` (pid, uid,
  gid) must be the record's, the process must still be the recorded one, and the
  secret's hash must match (``hmac.compare_digest``); only then the registry builds a
  handle on that connection (``Registry.adopt``), the daemon answers ``adopt`` with the
  held task ids it still wants results for, and sends again the tasks of the record the
  endpoint does not hold (their payloads are in the store). Anything else is closed;
  refusals about an awaited endpoint are audited as ``endpoint.adoption_refused`` with
  the reason (the others are logged: any local user can connect);
- a verified-live endpoint that has not connected when the grace period ends is stopped
  through its pidfd (SIGTERM, then SIGKILL) and its tasks are lost.

Deliberately not here: the user endpoint's side (``mepd.uep.server``), process launch
(``mepd.registry``), the task tables (``mepd.store``). The checks (``process_problem``,
``peer_problem``, ``hello_problem``) are pure functions of their inputs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import attrs
import structlog

from mepcore.errors import ChannelError, MepError
from mepcore.spawn import LaunchedProcess, kill_session
from mepcore.types import Account
from mepd.audit import AuditLog, AuditUnavailable
from mepd.channel import ChannelLimits, FrameDecoder
from mepd.inflight import DispatchTask, InFlight, InFlightTask
from mepd.settings import RestartSettings
from mepd.store import EndpointRecord, HeldTask, TaskStore

if TYPE_CHECKING:
    from mepd.handle import UserEndpointHandle
    from mepd.registry import Registry

log = structlog.get_logger("mepd.adoption")

SOCKET_DIR = "adopt"
SOCKET_NAME = "adopt.sock"
HELLO_TIMEOUT = 10.0
# Connections in their hello at once: a local user cannot hold the daemon's descriptors.
MAX_HANDSHAKES = 64
# ... and per uid, so that one account cannot keep the others' endpoints out.
MAX_HANDSHAKES_PER_UID = 8
MAX_HELD = 1_000_000
_HELLO_LIMITS = ChannelLimits(max_frame=64 * 1024 * 1024, max_header=64 * 1024 * 1024)
_ID = re.compile(r"^[^\x00-\x1f]{1,256}$")


# -- the pure part: what a process and a peer must be ------------------------------------


@attrs.frozen
class ProcessFacts:
    """What ``/proc`` says about a process now."""

    pid: int
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]
    start_time: int  # clock ticks after boot (stat field 22)
    exe: str


@attrs.frozen
class Peer:
    """The credentials the kernel gives for a Unix socket's other end (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def read_process(pid: int, proc: str = "/proc") -> ProcessFacts | None:
    """The facts of ``pid``, or None when there is no such process (or it is a zombie)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"{proc}/{pid}/status", "rb") as fh:
            status = fh.read().decode("ascii", "replace")
        exe = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last
    # ')'; the first of them is field 3 (state), so field 22 is at index 19.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    ids: dict[str, tuple[int, ...]] = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = tuple(int(v) for v in value.split())
    return ProcessFacts(pid, ids.get("Uid", ()), ids.get("Gid", ()), int(fields[19]), exe)


def process_problem(record: EndpointRecord, facts: ProcessFacts | None) -> str | None:
    """Why the process is not the recorded user endpoint (None: it is)."""
    if facts is None:
        return "the process no longer exists"
    if facts.start_time != record.start_time:
        return "the process start time differs (the pid was reused)"
    if not facts.uids or set(facts.uids) != {record.uid}:
        return f"the process runs as uids {list(facts.uids)}, not {record.uid}"
    if not facts.gids or set(facts.gids) != {record.gid}:
        return f"the process runs as gids {list(facts.gids)}, not {record.gid}"
    if facts.exe != record.exe:
        return f"the process executes {facts.exe}, not {record.exe}"
    return None


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_hex(32)


def peer_problem(
    record: EndpointRecord, peer: Peer, facts: ProcessFacts | None, secret: str
) -> str | None:
    """Why a connection is not the recorded user endpoint (None: adopt it). The kernel's
    credentials first, then the process, then the secret."""
    if peer.uid != record.uid or peer.gid != record.gid:
        return f"peer uid/gid {peer.uid}/{peer.gid} is not {record.uid}/{record.gid}"
    if peer.pid != record.pid:
        return f"peer pid {peer.pid} is not the recorded {record.pid}"
    problem = process_problem(record, facts)
    if problem is not None:
        return problem
    if not hmac.compare_digest(secret_hash(secret), record.secret_sha256):
        return "wrong secret"
    return None


@attrs.frozen
class Hello:
    """The validated first frame of an adoption connection."""

    endpoint_id: str
    secret: str
    held: tuple[str, ...]


def hello_problem(header: Mapping[str, Any]) -> Hello | str:
    """The hello of ``header``, or why it is not one."""
    if header.get("kind") != "adopt":
        return f"first frame is {str(header.get('kind'))[:32]!r}, not adopt"
    endpoint_id, secret, held = header.get("endpoint_id"), header.get("secret"), header.get("held")
    if not isinstance(endpoint_id, str) or not _ID.match(endpoint_id):
        return "adopt frame without a valid endpoint_id"
    if not isinstance(secret, str) or not 0 < len(secret) <= 256:
        return "adopt frame without a valid secret"
    if not isinstance(held, list) or len(held) > MAX_HELD:
        return "adopt frame without a bounded held list"
    if not all(isinstance(t, str) and 0 < len(t) <= 256 for t in held):
        return "adopt frame: held task ids must be short strings"
    return Hello(endpoint_id, secret, tuple(held))


# -- the process of an adopted endpoint -------------------------------------------------


@attrs.define
class AdoptedProcess(LaunchedProcess):
    """A user endpoint this daemon did not start: not its child, so it cannot ``wait()``
    for it. It is watched and signalled through a pidfd opened after its start time was
    verified; ``reap`` waits for the pidfd, then ends what is left of its session (a
    session id cannot be reused while any member holds it)."""

    adopted_pid: int = 0

    @property
    def pid(self) -> int:
        return self.adopted_pid

    def signal_group(self, sig: int) -> bool:
        if self.returncode is not None or self.has_exited():
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            signal.pidfd_send_signal(self.pidfd, sig)
        # The leader is alive, so its group id is still its own: the group too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.adopted_pid, sig)
        return True

    def reap(self, *, deadline: float = 2.0) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if not self.has_exited():
            self.signal_group(signal.SIGKILL)
            if not self.wait_exit(deadline):
                return None
        kill_session(self.adopted_pid, deadline=deadline)
        self.returncode = -1  # its exit status went to its own parent
        self.close()
        return self.returncode


def adopted_process(pid: int, pidfd: int) -> AdoptedProcess:
    # popen and plan are never read: pid, signal_group and reap are this class's own.
    return AdoptedProcess(popen=cast(Any, None), plan=cast(Any, None), pidfd=pidfd, adopted_pid=pid)


def open_verified_pidfd(record: EndpointRecord) -> int | str:
    """A pidfd of the recorded process, or why not: the facts are read again after the
    pidfd is open, so it refers to the verified process, not to a reuse of its pid."""
    try:
        pidfd = os.pidfd_open(record.pid)
    except OSError as exc:
        return f"pidfd_open failed: {exc.strerror or exc}"
    problem = process_problem(record, read_process(record.pid))
    if problem is not None:
        os.close(pidfd)
        return problem
    return pidfd


# -- records of the endpoints this daemon starts ------------------------------------------


@attrs.define
class EndpointRecords:
    """The registry's adoption port: a record per adoptable endpoint while it lives."""

    store: TaskStore
    settings: RestartSettings
    socket_path: Path
    clock: Callable[[], float] = time.time

    def launched(self, handle: UserEndpointHandle) -> dict[str, Any]:
        """Record a just-launched user endpoint; the fields its start message carries."""
        pid = handle.pid
        facts = None if pid is None else read_process(pid)
        if pid is None or facts is None:
            raise ChannelError("channel.closed", f"user endpoint {handle.id} is already gone")
        secret = new_secret()
        account = handle.account
        self.store.put_endpoint(
            EndpointRecord(
                endpoint_id=handle.id,
                account=account.name,
                uid=account.uid,
                gid=account.gid,
                pid=pid,
                start_time=facts.start_time,
                exe=facts.exe,
                secret_sha256=secret_hash(secret),
                config_key=handle.config_key,
                endpoint=handle.endpoint,
                account_json=json.dumps(account.to_dict(), sort_keys=True),
                created=self.clock(),
            )
        )
        return {
            "endpoint_id": handle.id,
            "socket": str(self.socket_path),
            "secret": secret,
            "daemon_uid": os.geteuid(),
            "grace_period": self.settings.grace_period,
            "result_buffer_bytes": self.settings.result_buffer_bytes,
        }

    def ended(self, handle: UserEndpointHandle) -> None:
        """The user endpoint ended normally (stopped, idle, crashed): nothing to adopt."""
        try:
            self.store.delete_endpoint(handle.id)
        except MepError as exc:
            log.warning("adoption.record_not_removed", uep=handle.id, detail=exc.detail)


def account_of(record: EndpointRecord) -> Account:
    data = json.loads(record.account_json or "{}")
    return Account(
        name=record.account,
        uid=record.uid,
        gid=record.gid,
        home=str(data.get("home", "/")),
        shell=str(data.get("shell", "")),
        group_ids=tuple(int(g) for g in data.get("group_ids", ())),
        group_names=tuple(str(g) for g in data.get("groups", ())),
        gecos=str(data.get("gecos", "")),
    )


# -- the restarting daemon's side ----------------------------------------------------------


@attrs.define(eq=False)
class Pending:
    """A verified-live endpoint of the previous daemon, not yet connected."""

    record: EndpointRecord
    pidfd: int


@attrs.frozen
class Survey:
    """What ``survey`` found: endpoints to wait for, and why the others were dropped."""

    pending: tuple[Pending, ...]
    dropped: tuple[tuple[EndpointRecord, str], ...]

    @property
    def keep(self) -> frozenset[str]:
        return frozenset(p.record.endpoint_id for p in self.pending)


def survey(store: TaskStore) -> Survey:
    """Read the records the previous daemon left: which endpoints still live as recorded
    (a pidfd is opened for each), which are gone (their records are removed)."""
    pending: list[Pending] = []
    dropped: list[tuple[EndpointRecord, str]] = []
    for record in store.endpoint_records():
        opened = open_verified_pidfd(record)
        if isinstance(opened, str):
            dropped.append((record, opened))
            store.delete_endpoint(record.endpoint_id)
        else:
            pending.append(Pending(record, opened))
    return Survey(tuple(pending), tuple(dropped))


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


@attrs.define
class Adoption:
    """The restarting daemon's adoption: the socket, the checks, the grace period."""

    store: TaskStore
    registry: Registry
    audit: AuditLog
    settings: RestartSettings
    socket_path: Path
    _pending: dict[str, Pending] = attrs.field(factory=dict)
    _listener: socket.socket | None = None
    _accepting: asyncio.Task[None] | None = None
    _handshakes: collections.Counter[int] = attrs.field(factory=collections.Counter)
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set)
    _started: float = 0.0
    adopted: int = 0

    @property
    def in_flight(self) -> InFlight:
        return self.registry.in_flight

    def take_survey(self, found: Survey, held: Sequence[HeldTask]) -> None:
        """Bind the tasks of the live endpoints to them (in flight, awaiting adoption)
        and audit the records dropped."""
        for record, why in found.dropped:
            self._refused(record.endpoint_id, why, pid=record.pid)
        self._pending = {p.record.endpoint_id: p for p in found.pending}
        now = time.time()
        self.in_flight.add(
            InFlightTask(h.task_id, h.owner, h.account, h.function_id, h.uep_id, now) for h in held
        )
        self.registry.reserve_ids(self._pending)
        self.registry.awaiting = {(p.record.account, p.record.config_key) for p in found.pending}

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the socket while endpoints await adoption; expire those left after
        the grace period. Without any, nothing listens (the next daemon will)."""
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        grace = 0.0  # not adoptable now: what the last daemon left is stopped at once
        if self.settings.adopt_endpoints and self._pending:
            self._listener = _listen(self.socket_path)
            self._accepting = loop.create_task(self._accept_loop())
            grace = self.settings.grace_period
        if self._pending:
            self._spawn(self._expire_later(grace))

    def _stop_listening(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    async def close(self) -> None:
        """Stop listening; pending endpoints keep waiting (for the next daemon)."""
        self._stop_listening()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for key in list(self.registry.awaiting):
            self.registry.adoption_settled(key)
        for pending in self._pending.values():
            with contextlib.suppress(OSError):
                os.close(pending.pidfd)
        self._pending.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # EMFILE and the like: back off, keep listening
                log.warning("adoption.accept_failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            try:
                peer = peer_of(conn)
            except OSError:
                conn.close()
                continue
            if (
                sum(self._handshakes.values()) >= MAX_HANDSHAKES
                or self._handshakes[peer.uid] >= MAX_HANDSHAKES_PER_UID
            ):
                log.warning("adoption.too_many_handshakes", uid=peer.uid, pid=peer.pid)
                conn.close()
                continue
            # Counted here, not in the task: accepting from a full backlog does not yield.
            self._handshakes[peer.uid] += 1
            self._spawn(self._connection(conn, peer))

    async def _connection(self, conn: socket.socket, peer: Peer) -> None:
        try:
            await self._handshake(conn, peer)
        finally:
            self._handshakes[peer.uid] -= 1
            if self._handshakes[peer.uid] <= 0:
                del self._handshakes[peer.uid]
            if not self._pending:
                self._stop_listening()  # everyone is adopted (or given up)

    async def _handshake(self, conn: socket.socket, peer: Peer) -> None:
        # Connections naming no awaited endpoint are logged, not audited: any local user
        # can make them, and the audit log is not theirs to fill.
        conn.setblocking(False)
        try:
            hello = await asyncio.wait_for(_read_hello(conn), HELLO_TIMEOUT)
        except (OSError, TimeoutError, ChannelError, EOFError) as exc:
            log.warning("endpoint.adoption_refused", why=f"no valid hello: {exc!r}")
            conn.close()
            return
        pending = None if isinstance(hello, str) else self._pending.get(hello.endpoint_id)
        if isinstance(hello, str) or pending is None:
            why = hello if isinstance(hello, str) else "no endpoint of that id awaits adoption"
            log.warning("endpoint.adoption_refused", why=why, pid=peer.pid, uid=peer.uid)
            conn.close()
            return
        problem = peer_problem(pending.record, peer, read_process(peer.pid), hello.secret)
        if problem is not None:
            self._refused(hello.endpoint_id, problem, pid=peer.pid, uid=peer.uid)
            conn.close()
            return
        del self._pending[hello.endpoint_id]
        try:
            await self._adopt(pending, conn, hello)
        except Exception as exc:  # the endpoint is then stopped, its tasks lost
            log.exception("adoption.failed", uep=hello.endpoint_id)
            self._refused(hello.endpoint_id, f"adoption failed: {exc}")
            conn.close()
            await self._give_up(pending, "adoption failed")

    async def _adopt(self, pending: Pending, conn: socket.socket, hello: Hello) -> None:
        record = pending.record
        handle = await self.registry.adopt(
            record.endpoint_id,
            account_of(record),
            record.config_key,
            record.endpoint,
            adopted_process(record.pid, pending.pidfd),
            conn,
        )
        eid = record.endpoint_id
        ours = [r.task_id for r in self.in_flight if r.endpoint_id == eid]
        held = set(hello.held)
        want = [t for t in ours if t in held]
        missing = [t for t in ours if t not in held]
        handle.welcome(want)
        resent = self._send_again(handle, missing)
        self.registry.settle_adopted(handle)
        self.adopted += 1
        seconds = round(asyncio.get_running_loop().time() - self._started, 3)
        log.info(
            "endpoint.adopted",
            uep=eid,
            pid=record.pid,
            held=len(want),
            resent=resent,
            seconds=seconds,
        )
        with contextlib.suppress(AuditUnavailable):
            self.audit.record(
                "endpoint.adopted",
                uep=eid,
                account=record.account,
                uid=record.uid,
                pid=record.pid,
                config_key=record.config_key,
                held=len(want),
                resent=resent,
                seconds=seconds,
            )

    def _send_again(self, handle: UserEndpointHandle, task_ids: Sequence[str]) -> int:
        """Dispatch again what the endpoint never received (it was in the old daemon's
        buffers when it died); functions are sent when the endpoint lacks them."""
        if not task_ids:
            return 0
        payloads = self.store.pending_payloads(task_ids)
        found = {p.task_id for p in payloads}
        gone = [r for r in (self.in_flight.take(t) for t in task_ids if t not in found) if r]
        if gone:
            self.registry.on_lost(gone, "task.endpoint_lost")
        for function_id in handle.missing_functions(list({p.function_id for p in payloads})):
            body = self.store.get_function(function_id)
            if body is not None:
                handle.register_function(function_id, body)
        handle.dispatch(
            [
                DispatchTask(p.task_id, p.owner, p.function_id, p.payload, p.walltime, p.resources)
                for p in payloads
            ]
        )
        return len(payloads)

    async def _expire_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        left = list(self._pending.values())
        self._pending.clear()
        await asyncio.gather(
            *(self._give_up(p, "not connected within the grace period") for p in left)
        )
        self._stop_listening()

    async def _give_up(self, pending: Pending, why: str) -> None:
        """Stop a verified endpoint that will not be adopted; its tasks are lost."""
        record = pending.record
        self._refused(record.endpoint_id, why, pid=record.pid)
        process = adopted_process(record.pid, pending.pidfd)
        process.signal_group(signal.SIGTERM)
        if not await process.wait_exit_async(self.registry.limits.stop_grace):
            process.signal_group(signal.SIGKILL)
            await process.wait_exit_async(2.0)
        await asyncio.to_thread(process.reap, deadline=2.0)
        self.registry.adoption_settled((record.account, record.config_key))
        lost = self.in_flight.take_endpoint(record.endpoint_id)
        if lost:
            self.registry.on_lost(lost, "task.endpoint_lost")
        with contextlib.suppress(MepError):
            self.store.delete_endpoint(record.endpoint_id)

    def _refused(self, endpoint_id: str | None, why: str, **fields: Any) -> None:
        log.warning("endpoint.adoption_refused", uep=endpoint_id, why=why, **fields)
        with contextlib.suppress(AuditUnavailable):
            self.audit.record("endpoint.adoption_refused", uep=endpoint_id, reason=why, **fields)


def _listen(path: Path) -> socket.socket:
    """The adoption socket: its directory root's (0711, so users can reach the socket
    without listing anything), the socket 0666 (peers are checked, not file modes)."""
    path.parent.mkdir(mode=0o711, exist_ok=True)
    st = path.parent.lstat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OSError(f"{path.parent}: not owned by the daemon or writable by others")
    path.parent.chmod(0o711)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o666)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_hello(conn: socket.socket) -> Hello | str:
    loop = asyncio.get_running_loop()
    decoder = FrameDecoder(_HELLO_LIMITS)
    while True:
        data = await loop.sock_recv(conn, 1 << 20)
        if not data:
            raise EOFError("closed before a hello")
        frames = decoder.feed(data)
        if frames:
            return hello_problem(frames[0].header)
