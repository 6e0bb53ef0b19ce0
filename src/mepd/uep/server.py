"""The user endpoint's main loop: start message, render, setup, serve, idle, teardown.

Runs as the mapped account, after ``identity.privilege_problem()`` found nothing. One
thread reads frames from the channel (with a timeout that drives the heartbeat); task
results are completed by the executor's threads and coalesced into result frames by a
writer thread (it flushes whenever its queue runs empty or a batch is full, so a burst
of 10k results costs a handful of frames, and a lone result is not delayed).

Everything from the daemon is checked before use (shape, types, bounds); the rendered
configuration comes from ``mepcore.config`` and the tasks run in ``mepcore.tasks``.
This module deliberately does not deserialize anything itself.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from mepcore.errors import ChannelError, MepError
from mepd.channel import BlockingChannel, Frame, batch_frames, check_items
from mepd.uep.identity import introspect
from mepd.uep.log import EndpointLog, run_logged_script

if TYPE_CHECKING:
    # Imported when the start message asks for re-adoption (most starts do not).
    from mepd.uep.orphan import AdoptionInfo, ResultBuffer

START_WAIT = 120.0
MAX_RESULT_BATCH = 4096
DEFAULT_SCRIPT_TIMEOUT = 300.0
# The site environment (user_environment.yaml) may move Parsl run directories here.
RUN_DIR_VARIABLE = "MEP_RUN_DIR"
ENDPOINT_LOG = "endpoint.log"
MAX_ENDPOINT_LOG = 1024 * 1024
# Engine events the daemon hears about (its log), as the error reason they are about.
_REPORTED_EVENTS = {"provider_failed": "task.provider_failed", "worker_lost": "task.worker_lost"}
_STOP = object()


def run_dir_base(configured: Any, endpoint: str, home: str) -> str:
    """Where a Parsl engine keeps its run directories (each engine a ``<tag>`` directory
    inside, removed when it ends): the template's ``engine.run_dir``, else
    ``$MEP_RUN_DIR/<endpoint>``, else ``~/.mep/run/<endpoint>`` — under the home
    directory, which compute nodes see, unlike a node-local ``/tmp``."""
    if isinstance(configured, str) and configured:
        return os.path.expanduser(configured)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", endpoint)[:64].lstrip(".") or "endpoint"
    site = os.environ.get(RUN_DIR_VARIABLE)
    if site:
        return os.path.join(os.path.expanduser(site), name)
    return os.path.join(home, ".mep", "run", name)


def append_endpoint_log(directory: str, kind: str, fields: Mapping[str, Any]) -> None:
    """One JSON line in the user's ``endpoint.log`` (kept to about 1 MiB, one backup)."""
    path = os.path.join(directory, ENDPOINT_LOG)
    line = json.dumps({"time": time.time(), "event": kind, **fields}, default=str) + "\n"
    with contextlib.suppress(OSError):
        if os.path.getsize(path) > MAX_ENDPOINT_LOG:
            os.replace(path, path + ".1")
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(line)


def client_python(user_runtime: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """The client's (major, minor) Python from its ``user_runtime`` (the field Globus
    Compute's SDK sends too: ``python.version_tuple``), when it sent a valid one."""
    python = (user_runtime or {}).get("python")
    version = python.get("version_tuple") if isinstance(python, Mapping) else None
    if (
        isinstance(version, list | tuple)
        and len(version) >= 2
        and all(type(part) is int and 0 <= part < 1000 for part in version[:2])
    ):
        return int(version[0]), int(version[1])
    return None


class StartRefused(Exception):
    """A failure before ``ready``, reported in an ``error`` frame."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__(fields.get("detail") or fields.get("reason"))
        self.fields = dict(fields)


def error_fields(exc: BaseException) -> dict[str, Any]:
    """The ``error`` frame of an exception (MepErrors keep reason, message, violations)."""
    if isinstance(exc, MepError):
        return {
            "reason": exc.reason,
            "message": exc.public_message,
            "detail": exc.detail,
            "violations": [v.to_dict() for v in exc.violations],
            "expose_violations": bool(exc.expose_violations),
            "error_class": type(exc).__name__,
        }
    return {
        "reason": "spawn.start_failed",
        "message": "the user endpoint could not be started",
        "detail": f"{type(exc).__name__}: {exc}",
        "violations": [],
        "expose_violations": False,
        "error_class": "SpawnError",
    }


def _refuse(reason: str, detail: str) -> StartRefused:
    return StartRefused({"reason": reason, "detail": detail, "error_class": "SpawnError"})


def _require(start: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = start.get(key)
    if not isinstance(value, kind):
        raise _refuse("spawn.start_failed", f"start message: {key} has the wrong type")
    return value


@attrs.frozen
class StartMessage:
    """The validated ``start`` frame."""

    template_name: str
    template_text: str
    includes: Mapping[str, str]
    variables: Mapping[str, Any]
    identity: Mapping[str, Any] | None
    user_runtime: Mapping[str, Any] | None
    account: Mapping[str, Any]
    endpoint: str
    config_key: str
    setup_timeout: float
    teardown_timeout: float
    executor_limits: Mapping[str, Any]
    variable_limits: Mapping[str, Any]
    # The endpoint's settings a template may read (_GC.parent_config).
    parent_config: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> StartMessage:
        includes = _require(header, "includes", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in includes.items()):
            raise _refuse("spawn.start_failed", "start message: includes must map str to str")
        identity = header.get("identity")
        runtime = header.get("user_runtime")
        if identity is not None and not isinstance(identity, dict):
            raise _refuse("spawn.start_failed", "start message: identity must be an object")
        if runtime is not None and not isinstance(runtime, dict):
            raise _refuse("spawn.start_failed", "start message: user_runtime must be an object")
        parent_config = header.get("parent_config") or {}
        if not isinstance(parent_config, dict):
            raise _refuse("spawn.start_failed", "start message: parent_config must be an object")
        timeouts = [
            header.get("setup_timeout", DEFAULT_SCRIPT_TIMEOUT),
            header.get("teardown_timeout", DEFAULT_SCRIPT_TIMEOUT),
        ]
        for value in timeouts:
            if type(value) not in (int, float) or not 0 < value <= 86400:
                raise _refuse("spawn.start_failed", "start message: bad script timeout")
        return cls(
            template_name=_require(header, "template_name", str),
            template_text=_require(header, "template_text", str),
            includes=includes,
            variables=_require(header, "variables", dict),
            identity=identity,
            user_runtime=runtime,
            account=_require(header, "account", dict),
            endpoint=_require(header, "endpoint", str),
            config_key=_require(header, "config_key", str),
            setup_timeout=float(timeouts[0]),
            teardown_timeout=float(timeouts[1]),
            executor_limits=header.get("executor_limits") or {},
            variable_limits=header.get("variable_limits") or {},
            parent_config=parent_config,
        )


@attrs.define
class UserEndpoint:
    """One user endpoint's lifecycle over ``channel``."""

    channel: BlockingChannel
    channel_fd: int
    inherited_fds: list[int] = attrs.field(factory=list)
    start: StartMessage | None = None
    config: Any = None
    executor: Any = None
    in_flight: int = 0
    draining: bool = False
    exit_reason: str = ""
    log: EndpointLog | None = None
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _results: queue.SimpleQueue[Any] = attrs.field(factory=queue.SimpleQueue)
    _writer: threading.Thread | None = None
    _tasks_seen: int = 0
    _results_seen: int = 0
    _drained: threading.Event = attrs.field(factory=threading.Event)
    # Re-adoption (mepd.uep.orphan), when the daemon asked for it in the start message:
    # the ids of the tasks running here, and the results not (surely) delivered.
    adoption: AdoptionInfo | None = None
    _running: set[str] = attrs.field(factory=set)
    _buffer: ResultBuffer | None = None
    _out_lock: threading.Lock = attrs.field(factory=threading.Lock)
    _serving: bool = False

    # ----------------------------------------------------------------- start

    def run(self) -> int:
        # SIGTERM (the daemon's stop ladder, or anyone) ends the endpoint through its
        # cleanup: the engine cancels its blocks and removes its run directory.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._start()
        except StartRefused as refused:
            self._send_quietly("error", self._with_log(refused.fields))
            return 2
        except EOFError:
            return 0
        except Exception as exc:  # the daemon gets a reason code, not a traceback
            self._send_quietly("error", self._with_log(error_fields(exc)))
            return 2
        try:
            self._serving = True
            self._serve()
        finally:
            self._serving = False
            self._finish()
        return 0

    def _start(self) -> None:
        frame = self.channel.recv(timeout=START_WAIT)
        if frame is None or frame.kind != "start":
            raise _refuse("spawn.start_failed", "no start message")
        start = StartMessage.from_header(frame.header)
        self.start = start
        self._prepare_adoption(frame.header)
        if start.account.get("uid") != os.getuid():
            raise _refuse("spawn.privilege_drop", "start message names another account")
        self._open_log(start)
        kept = self._configure(frame.header.get("rendered"))
        self.config = kept if kept is not None else self._render(start)
        if self.log is not None:
            how = "as rendered before from the same inputs" if kept is not None else "rendered"
            self.log.write("config", f"{how} ({start.template_name})")
        # Off since the interpreter started (mepd.uep.__main__): on again before the
        # setup script, the executor and its workers (forked ones inherit the setting).
        gc.enable()
        setup = getattr(self.config, "endpoint_setup", None)
        if setup:
            status, last = run_logged_script(
                "endpoint_setup", setup, timeout=start.setup_timeout, cwd=os.getcwd(), log=self.log
            )
            if status != 0:
                what = "timed out" if status is None else f"exited with status {status}"
                refused = _refuse("spawn.start_failed", f"endpoint_setup {what}")
                refused.fields["tail"] = [*last, f"endpoint_setup {what}"]
                raise refused
        self.executor = self._make_executor(start)
        self._writer = threading.Thread(target=self._write_results, name="uep-results", daemon=True)
        self._writer.start()
        ready = {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "heartbeat_period": self.config.heartbeat_period,
            "idle_heartbeats_soft": self.config.idle_heartbeats_soft,
            "idle_heartbeats_hard": self.config.idle_heartbeats_hard,
            "engine": self._engine_dict().get("type"),
        }
        if kept is None:  # rendered here: the daemon may hand it to the next start
            ready["rendered"] = self.config.to_document()
        self.channel.send("ready", ready)
        if self.log is not None:
            self.log.write("ready", f"engine {self._engine_dict().get('type')}")

    def _prepare_adoption(self, header: Mapping[str, Any]) -> None:
        if header.get("adoption") is None:
            return  # the daemon does not adopt: mepd.uep.orphan is not needed
        from mepd.uep.orphan import AdoptionInfo, ResultBuffer, clear_parent_death_signal

        try:
            self.adoption = AdoptionInfo.from_start(header)
        except ValueError as exc:
            raise _refuse("spawn.start_failed", f"start message: {exc}") from exc
        if self.adoption is not None:
            if not clear_parent_death_signal():
                raise _refuse("spawn.start_failed", "could not clear the parent-death signal")
            self._buffer = ResultBuffer(self.adoption.result_buffer_bytes)

    def _await_adoption(self) -> bool:
        """The daemon is gone: keep the tasks running, buffer their results, and try the
        adoption socket (growing pauses) until the grace period ends. True once a new
        daemon adopted this endpoint (its wanted results are sent again first)."""
        info, buffer = self.adoption, self._buffer
        if info is None or buffer is None:
            return False
        from mepd.uep.orphan import reconnect

        with self._out_lock:
            buffer.connected = False
            with contextlib.suppress(OSError):
                self.channel.sock.close()
        if self.log is not None:
            self.log.write("orphaned", f"the daemon is gone; waiting {info.grace_period:.0f} s")
        deadline = time.monotonic() + info.grace_period
        pause = 0.05
        while time.monotonic() < deadline and not self.exit_reason:
            with self._lock, self._out_lock:
                held = sorted(self._running | buffer.ids())
            got = reconnect(info, held)
            if got is not None and self._adopted(*got):
                return True
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)
        if not self.exit_reason:
            self.exit_reason = "orphaned: no daemon adopted it within the grace period"
        return False

    def _adopted(self, channel: BlockingChannel, want: set[str]) -> bool:
        assert self._buffer is not None
        with self._out_lock:
            replay = self._buffer.take(want)
            try:
                self._send_results(channel, replay)
            except OSError:
                self._buffer.hold(replay)
                return False
            self._buffer.sent(replay)
            self._buffer.connected = True
            self.channel = channel
            self.channel_fd = channel.sock.fileno()
        with self._lock:
            unwanted = sorted(self._running - want)
        if unwanted and self.executor is not None:
            self.executor.cancel(unwanted)  # ended at the daemon meanwhile (cancelled)
        if self.log is not None:
            self.log.write("adopted", f"by a new daemon; {len(replay)} results sent again")
        return True

    def _send_results(self, channel: BlockingChannel, batch: list[Any]) -> None:
        items = [(r.to_header(), r.payload) for r in batch]
        if not items:
            return
        limits = channel.limits
        for buffers in batch_frames("result", items, limits=limits, max_items=MAX_RESULT_BATCH):
            channel.send_buffers(buffers)

    def _deliver(self, batch: list[Any]) -> bool:
        """Send a batch of results; False when the daemon is gone and nothing waits for
        a next one. With adoption, results are buffered instead while it is away."""
        buffer = self._buffer
        if buffer is None:
            try:
                self._send_results(self.channel, batch)
            except OSError:
                return False
            return True
        with self._out_lock:
            if buffer.connected:
                try:
                    self._send_results(self.channel, batch)
                    buffer.sent(batch)
                    return True
                except OSError:
                    buffer.connected = False
            buffer.hold(batch)
        return True

    def _open_log(self, start: StartMessage) -> None:
        """The user's own endpoint log (``mepd.uep.log``), from here on."""
        home = str(start.account.get("home") or os.getcwd())
        tag = f"[pid {os.getpid()} config {start.config_key[:12]}]"
        self.log = EndpointLog.open(home, start.endpoint, tag)
        self.log.capture_stdio()
        self.log.write(
            "started",
            f"user endpoint of {start.endpoint!r} as {start.account.get('name')} "
            f"(uid {os.getuid()}), Python {sys.version.split()[0]}",
        )
        client = client_python(start.user_runtime)
        if client is not None and client != sys.version_info[:2]:
            self.log.write(
                "python",
                f"the client runs Python {client[0]}.{client[1]}, this endpoint "
                f"{sys.version_info[0]}.{sys.version_info[1]}: functions sent as bytecode "
                'are refused (task.version_mismatch); send them by source (serializer="source")',
            )

    def _with_log(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A start failure, written to the user's log; the error names the log and
        carries its last lines (the user's own data, for the user)."""
        if self.log is None:
            return fields
        fields = dict(fields)
        reason, detail = fields.get("reason", ""), fields.get("detail") or ""
        self.log.write("start_failed", f"{reason}: {detail}")
        last = fields.pop("tail", None)
        if not isinstance(last, list):
            last = self.log.tail()
        fields["log_tail"] = [line[:500] for line in last]
        fields["log_path"] = self.log.path
        return fields

    def _configure(self, rendered: Any) -> Any:
        """The configuration an earlier user endpoint of this account rendered from the
        same inputs, which the daemon kept and handed back (``mepd.registry``: the
        render cache); None when there is none or it is no longer valid (another mep
        version, say): then it is rendered again. Validated like a rendered one; no
        jinja2 or yaml is imported for it."""
        if not isinstance(rendered, dict):
            return None
        from mepcore.config.endpoint import EndpointConfig
        from mepcore.errors import ConfigError

        try:
            return EndpointConfig.from_mapping(rendered)
        except ConfigError:
            return None

    def _render(self, start: StartMessage) -> Any:
        # Rendering happens here, as the user, never in the daemon (DESIGN.md §3.5).
        from mepcore.config import MappedIdentity, VariableLimits, render_endpoint_config
        from mepcore.types import Account, Identity

        acc = start.account
        try:
            account = Account(
                name=str(acc["name"]),
                uid=int(acc["uid"]),
                gid=int(acc["gid"]),
                home=str(acc["home"]),
                shell=str(acc["shell"]),
                group_ids=tuple(int(g) for g in acc.get("group_ids", ())),
                group_names=tuple(str(g) for g in acc.get("groups", ())),
                gecos=str(acc.get("gecos", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _refuse("spawn.start_failed", f"start message: bad account: {exc}") from exc
        identity = None if start.identity is None else Identity.from_mapping(start.identity)
        try:
            variable_limits = VariableLimits(**dict(start.variable_limits))
        except TypeError as exc:
            raise _refuse("spawn.start_failed", f"start message: variable_limits: {exc}") from exc
        return render_endpoint_config(
            start.template_text,
            start.variables,
            mapped=MappedIdentity(account=account, identity=identity),
            user_runtime=start.user_runtime,
            includes=start.includes,
            template_name=start.template_name,
            variable_limits=variable_limits,
            # _GC.parent_config and _GC.env, as Globus Compute offers them.
            parent_config=start.parent_config,
            environment=dict(os.environ),
        )

    def _engine_dict(self) -> dict[str, Any]:
        return dict(self.config.engine.to_dict())

    def _make_executor(self, start: StartMessage) -> Any:
        # Seam: tasks are served by mepcore.tasks' Executor (imported here so that a
        # user endpoint that fails to render never pays for it).
        from mepcore.tasks import Executor, ExecutorLimits

        limits = ExecutorLimits(**dict(start.executor_limits))
        engine = self._engine_dict()
        if engine.get("type") in ("GlobusComputeEngine", "GlobusMPIEngine"):
            home = str(start.account.get("home") or os.getcwd())
            engine["run_dir"] = run_dir_base(engine.get("run_dir"), start.endpoint, home)
        executor = Executor.from_engine_config(
            engine,
            limits=limits,
            allowed_functions=getattr(self.config, "allowed_functions", None),
            client_python=client_python(start.user_runtime),
        )
        if hasattr(executor.engine, "on_event"):
            log_dir = str(engine.get("run_dir"))
            executor.engine.on_event = lambda kind, fields: self._engine_event(
                log_dir, kind, fields
            )
        executor.start()
        return executor

    def _engine_event(self, log_dir: str, kind: str, fields: Mapping[str, Any]) -> None:
        """Blocks refused or lost: into the user's endpoint log, and to the daemon (its
        log names the account) when tasks fail because of it."""
        append_endpoint_log(log_dir, kind, fields)
        if self.log is not None:
            self.log.write(f"engine {kind}", str(fields.get("message", fields))[:4000])
        reason = _REPORTED_EVENTS.get(kind)
        # Before ``ready`` an error frame would fail the start: a refusal of the initial
        # blocks is reported with the first task it fails instead.
        if reason is not None and self._serving:
            detail = str(fields.get("message", ""))[:4000]
            self._send_quietly(
                "error",
                {"reason": reason, "detail": f"{kind}: {detail}", "error_class": "TaskError"},
            )

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        if self.exit_reason.startswith("signal"):
            return  # cleanup is under way
        self.exit_reason = "signal SIGTERM"
        if self._serving:  # interrupt the wait for the next frame; _finish follows
            raise SystemExit(0)

    # ----------------------------------------------------------------- serve

    def _serve(self) -> None:
        period = float(self.config.heartbeat_period)
        soft = int(self.config.idle_heartbeats_soft)
        hard = int(self.config.idle_heartbeats_hard)
        idle_ticks = 0
        stuck_ticks = 0
        seen_tasks = seen_results = 0
        next_tick = time.monotonic() + period
        while not self.exit_reason:
            try:
                frame = self.channel.recv(timeout=max(0.0, next_tick - time.monotonic()))
            except (EOFError, ConnectionError) as exc:
                if self._await_adoption():
                    continue
                self.exit_reason = self.exit_reason or (
                    "channel_closed" if isinstance(exc, EOFError) else f"channel_invalid: {exc}"
                )
                break
            except (ChannelError, OSError) as exc:
                self.exit_reason = f"channel_invalid: {exc}"
                break
            if frame is not None:
                self._handle(frame)
            if self.draining and self._drained.is_set():
                self.exit_reason = "drained"
            now = time.monotonic()
            if now < next_tick:
                continue
            next_tick = max(next_tick + period, now)
            with self._lock:
                busy = self.in_flight
                tasks, results = self._tasks_seen, self._results_seen
            activity = tasks != seen_tasks or results != seen_results
            idle_ticks = 0 if (busy or tasks != seen_tasks) else idle_ticks + 1
            stuck_ticks = 0 if activity else stuck_ticks + 1
            seen_tasks, seen_results = tasks, results
            self._send_quietly(
                "heartbeat", {"idle": idle_ticks, "no_progress": stuck_ticks, "in_flight": busy}
            )
            if idle_ticks >= soft:
                self.exit_reason = "idle"
            elif stuck_ticks >= hard:
                self.exit_reason = "idle_hard"

    def _handle(self, frame: Frame) -> None:
        kind = frame.kind
        if kind == "task":
            self._submit(frame)
        elif kind == "function":
            items = check_items(frame, id_field="function_id")
            for header, payload in zip(items, frame.parts(), strict=True):
                try:
                    self.executor.register_function(header["function_id"], payload)
                except MepError:
                    continue  # tasks naming it fail with task.function_unknown
        elif kind == "introspect":
            self.channel.send(
                "introspect",
                {
                    "request_id": frame.header.get("request_id"),
                    "answer": introspect(
                        channel_fd=self.channel_fd, inherited_fds=self.inherited_fds
                    ),
                },
            )
        elif kind == "cancel":
            self._cancel(frame.header.get("task_ids"))
        elif kind == "drain":
            self.draining = True
            with self._lock:
                if self.in_flight == 0:
                    self._drained.set()
        elif kind == "stop":
            reason = frame.header.get("reason")
            self.exit_reason = f"stopped: {reason}" if isinstance(reason, str) else "stopped"
        else:
            self.exit_reason = f"channel_invalid: unexpected {kind} frame"

    def _submit(self, frame: Frame) -> None:
        from mepcore.tasks import TaskEnvelope

        items = check_items(frame)
        parts = frame.parts()
        with self._lock:
            self.in_flight += len(items)
            if self._buffer is not None:
                self._running.update(h["task_id"] for h in items)
            self._tasks_seen += len(items)
        tasks = []
        for header, payload in zip(items, parts, strict=True):
            if self.draining:
                self._fail(header["task_id"], "task.cancelled", "the user endpoint is draining")
                continue
            try:
                tasks.append(TaskEnvelope.from_header(header, payload))
            except MepError as exc:
                self._fail(header["task_id"], exc.reason, exc.public_message)
        if not tasks:
            return
        try:
            futures = self.executor.submit_many(tasks)
        except Exception as exc:
            for task in tasks:
                self._fail(task.task_id, "task.engine_failed", type(exc).__name__)
            return
        for future in futures:
            future.add_done_callback(self._completed)

    def _cancel(self, task_ids: Any) -> None:
        """Stop tasks wherever they are in the engine; each answers ``task.cancelled``
        through the usual result path (a task already finished is not changed)."""
        if not isinstance(task_ids, list) or not all(
            isinstance(t, str) and 0 < len(t) <= 256 for t in task_ids
        ):
            raise ChannelError("channel.frame_invalid", "cancel frame without task_ids")
        if self.executor is not None and task_ids:
            self.executor.cancel(task_ids)

    def _fail(self, task_id: str, reason: str, message: str) -> None:
        from mepcore.tasks import RemoteError, ResultEnvelope

        now = time.time()
        self._results.put(
            ResultEnvelope(
                task_id=task_id,
                status="failed",
                error=RemoteError.of(
                    reason if reason.startswith("task.") else "task.failed", message
                ),
                received=now,
                started=now,
                finished=now,
            )
        )

    def _completed(self, future: Any) -> None:
        try:
            result = future.result()
        except BaseException:  # a bug in an engine: the task is lost, the daemon hears it
            return
        self._results.put(result)

    def _write_results(self) -> None:
        while True:
            first = self._results.get()
            if first is _STOP:
                return
            batch = [first]
            stop_after = False
            while len(batch) < MAX_RESULT_BATCH:
                try:
                    item = self._results.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                batch.append(item)
            if not self._deliver(batch):
                return  # the daemon is gone; the main loop sees EOF
            with self._lock:
                self._running.difference_update(r.task_id for r in batch)
                self.in_flight -= len(batch)
                self._results_seen += len(batch)
                if self.in_flight <= 0 and self.draining:
                    self._drained.set()
            if stop_after:
                return

    # ----------------------------------------------------------------- exit

    def _finish(self) -> None:
        graceful = self.exit_reason in ("idle", "drained")
        if self.executor is not None:
            with contextlib.suppress(Exception):
                self.executor.shutdown(wait=graceful)
        self._results.put(_STOP)
        if self._writer is not None:
            self._writer.join(timeout=5.0)
        teardown = getattr(self.config, "endpoint_teardown", None)
        if teardown and self.start is not None:
            status, _ = run_logged_script(
                "endpoint_teardown",
                teardown,
                timeout=self.start.teardown_timeout,
                cwd=os.getcwd(),
                log=self.log,
            )
            if status != 0 and self.log is not None:
                self.log.write("endpoint_teardown", f"failed (status {status})")
        with self._lock:
            lost = self.in_flight
        if self.log is not None:
            self.log.write("exiting", f"{self.exit_reason} ({lost} tasks unfinished)")
            self.log.release_stdio()
        self._send_quietly("exiting", {"reason": self.exit_reason, "in_flight": lost})

    def _send_quietly(self, kind: str, fields: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError, ChannelError):
            self.channel.send(kind, fields)
