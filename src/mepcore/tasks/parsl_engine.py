"""The Parsl engine (``GlobusComputeEngine``): Parsl's HighThroughputExecutor, driven directly.

The executor is built and started here without Parsl's ``load()`` and its DataFlowKernel;
providers and launchers come from closed tables (``PROVIDER_TYPES``, ``LAUNCHER_TYPES``
of ``parsl_build``), their options checked against the chosen class's constructor, never
used to import anything by name.

Blocks (batch jobs, or local process groups) are managed by Parsl's own scaling
``Strategy`` (``strategy``: ``simple`` by default, ``htex_auto_scale`` or ``none``), run by
one poller thread of the engine every ``strategy_period``, as Parsl's ``JobStatusPoller``
does: it scales out up to ``max_blocks`` while tasks wait, scales in after ``max_idletime``
without tasks, and replaces a block that ended while tasks wait. Around it the engine adds
what Parsl leaves to its callers:

- tasks submitted while no block is pending or running wait in the engine (they reach
  Parsl's interchange only once a block is on its way), and the poller is woken at once;
- a refused submission (``sbatch`` exits non-zero) or blocks that end twice before their
  workers connect fail the waiting tasks with ``task.provider_failed`` and the
  scheduler's message, once no block is left to run them (an interchange that still
  holds such tasks is replaced, so a task reported failed can never run later);
- a task whose block is lost fails with ``task.worker_lost`` naming the block's job and
  its state (from the provider), within ``heartbeat_threshold`` (30 s by default, Parsl's
  is 120 s); ``max_retries_on_system_failure`` runs it again instead, that many times;
- walltime: each task arms SIGALRM in the Parsl worker; a caller-side watchdog reports
  ``task.timeout`` one second after the walltime *from the task's start* (the worker
  leaves a start marker in the run directory), so a task that never started is never
  reported as timed out.

Nothing outlives the engine's process: the interchange runs under a guard (parent-death
signal, and a pidfd on the engine's process) that kills it when the engine's process
dies; a local block's worker pool runs under a guard that kills the block's process group
in that case; every block's worker pool gets a private TMPDIR, removed when it ends. Batch
jobs are named after the engine's process (``OwnerTag`` of ``parsl_owner``: host, boot,
pid, start time), so that mepd can find and cancel the jobs of user endpoints that no
longer exist. The run
directory is ``<run_dir>/<tag>`` (``run_dir`` defaults to the system's temporary
directory; user endpoints pass one under the user's home), removed at shutdown; run
directories of this machine's dead engines found there are removed at start.

This module imports Parsl only inside functions: importing ``mepcore.tasks`` never
imports Parsl. It deliberately holds neither the guard (``parsl_guard``, run by path as
``python -I parsl_guard.py``, the standard library only) nor the checks and construction
of providers, launchers and settings (``parsl_build``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, ClassVar

import attrs
import structlog

from mepcore.errors import TaskError
from mepcore.tasks._run import Outcome, failure, load_function, run_task
from mepcore.tasks.engine import CANCELLED_MESSAGE, ExecutorLimits, Job, Watchdog
from mepcore.tasks.parsl_build import (
    _ENGINE_KEYS,
    _HTEX_OPTIONS,
    ScalingPolicy,
    _heartbeat_options,
    _invalid,
    build_provider,
)
from mepcore.tasks.parsl_guard import GUARD
from mepcore.tasks.parsl_owner import OwnerTag, _remove_dead_run_dirs

__all__ = ["ParslEngine", "parsl_task"]

_BLOCK_EXIT_TIMEOUT = 10.0
_MAX_RETRIES = 100
# Blocks that end before any worker connects, in a row, before waiting tasks are failed.
_FAILED_STARTS_LIMIT = 2
# The same provider failure is reported (event) at most this often.
_REPORT_EVERY = 60.0
# The caller-side timer fires a little after the in-worker alarm so the worker's own
# (more precise) timeout normally wins.
_CALLER_GRACE = 1.0
_CANCELLED_SUFFIX = ".cancelled"
_MAX_MESSAGE = 2000

log = structlog.get_logger("mepcore.tasks.parsl")


# -- what runs where ------------------------------------------------------------------------


def _format_literal(text: str) -> str:
    # Launch commands are format templates for Parsl: literal braces are doubled.
    return text.replace("{", "{{").replace("}", "}}")


def _worker_launch_command(template: str, watch: str | None) -> str:
    # Parsl's default names its worker script, found on PATH; an endpoint's PATH is a
    # safe default that does not hold the virtualenv, so run the module with our own
    # interpreter, under the block guard (private TMPDIR; for local blocks, the group
    # dies with the engine).
    python = _format_literal(shlex.quote(sys.executable))
    guard = f"{python} -I {_format_literal(shlex.quote(GUARD))} block"
    if watch is not None:
        guard += f" --watch {watch}"
    return template.replace(
        "process_worker_pool.py",
        f"{guard} -- {python} -m parsl.executors.high_throughput.process_worker_pool",
        1,
    )


def parsl_task(
    function_payload: bytes,
    args_payload: bytes,
    max_result_bytes: int,
    walltime: float | None,
    started_marker: str | None = None,
) -> Outcome:
    """What a Parsl worker runs: load, call, serialize with the size bound (never raises).

    ``started_marker`` is a file in the run directory holding the start time, pid and
    host while the task runs: the engine's watchdog counts the walltime from the start,
    not from the submission, and a cancel knows which worker process to stop. A task
    whose ``<marker>.cancelled`` exists when it starts is not run."""
    if started_marker is not None:
        with contextlib.suppress(OSError):
            fd = os.open(started_marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{time.time()!r} {os.getpid()} {socket.gethostname()}")
        # Written before this look, as the engine writes the flag before it reads the
        # marker: either this task sees the flag, or the engine sees the marker.
        if os.path.exists(started_marker + _CANCELLED_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(started_marker)
            now = time.time()
            return ("failed", b"", failure("task.cancelled", message=CANCELLED_MESSAGE), now, now)
    try:
        return run_task(
            load_function(function_payload),
            args_payload,
            max_result_bytes,
            alarm_walltime=walltime,
        )
    finally:
        if started_marker is not None:
            with contextlib.suppress(OSError):
                os.unlink(started_marker)


@functools.cache
def _executor_class(mpi: bool = False) -> type:
    """HighThroughputExecutor (``mpi``: its MPI form, MPIExecutor) whose outstanding count,
    which Parsl's strategy scales by, includes the tasks the engine holds back while no
    block is on its way."""
    from parsl.executors import HighThroughputExecutor, MPIExecutor

    base = MPIExecutor if mpi else HighThroughputExecutor

    class MepHighThroughputExecutor(base):  # type: ignore[valid-type,misc]
        held_back: Callable[[], int] = staticmethod(lambda: 0)

        def outstanding(self) -> int:
            return int(len(self.tasks) + self.held_back())

        if mpi:
            # MPIExecutor's type check wants a string where HTEX takes the list it runs.
            def __init__(self, *, interchange_launch_cmd: Any = None, **options: Any) -> None:
                super().__init__(**options)
                if interchange_launch_cmd:
                    self.interchange_launch_cmd = interchange_launch_cmd

    return MepHighThroughputExecutor


def _terminal_states() -> frozenset[Any]:
    from parsl.jobs.states import TERMINAL_STATES

    return frozenset(TERMINAL_STATES)


def _state_name(status: Any) -> str:
    state = getattr(status, "state", None)
    return getattr(state, "name", "UNKNOWN")


def _scheduler_message(exc: BaseException) -> str:
    """What the scheduler said when it refused a job (Parsl's SubmitException keeps the
    command's output), else the exception."""
    parts = [
        text.strip()
        for text in (getattr(exc, "stderr", None), getattr(exc, "stdout", None))
        if isinstance(text, str) and text.strip()
    ]
    if not parts:
        parts = [str(getattr(exc, "message", "") or exc)]
    return "\n".join(parts)[:_MAX_MESSAGE]


class _Attempt:
    """The engine's record of one accepted job."""

    __slots__ = ("future", "marker", "retries")

    def __init__(self, marker: str | None) -> None:
        self.future: Future[Any] | None = None  # Parsl's, once given to the interchange
        self.marker = marker
        self.retries = 0


EventSink = Callable[[str, Mapping[str, Any]], None]


@attrs.define
class ParslEngine:
    """HighThroughputExecutor with a provider built from the endpoint config, scaled by
    Parsl's strategy; see the module docstring."""

    # The engine keys a config may hold, and those passed to Parsl's executor as they are.
    KEYS: ClassVar[frozenset[str]] = _ENGINE_KEYS
    OPTION_KEYS: ClassVar[frozenset[str]] = _HTEX_OPTIONS
    MPI: ClassVar[bool] = False

    options: Mapping[str, Any]
    provider: Any
    max_result_bytes: int
    run_dir: str | None = None
    scaling: ScalingPolicy = ScalingPolicy()  # noqa: RUF009 - frozen, shared safely
    max_retries: int = 0
    # Told about provider failures and lost blocks: ("provider_failed" | "block_ended" |
    # "worker_lost", fields). Called from the engine's threads; must not block.
    on_event: EventSink | None = None
    _htex: Any = attrs.field(init=False, default=None)
    _strategy: Any = attrs.field(init=False, default=None)
    _generation: int = attrs.field(init=False, default=0)
    _tag: OwnerTag | None = attrs.field(init=False, default=None)
    _dir: str | None = attrs.field(init=False, default=None)
    _jobs: dict[Job, _Attempt] = attrs.field(init=False, factory=dict)
    _waiting: list[Job] = attrs.field(init=False, factory=list)
    _lost: list[tuple[Job, BaseException]] = attrs.field(init=False, factory=list)
    _refusals: list[str] = attrs.field(init=False, factory=list)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    # Parsl's task socket is not thread-safe: one submitter at a time.
    _submit_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _wake: threading.Event = attrs.field(init=False, factory=threading.Event)
    _poller: threading.Thread | None = attrs.field(init=False, default=None)
    _active_blocks: int = attrs.field(init=False, default=0)
    _force_poll: bool = attrs.field(init=False, default=False)
    _manager_blocks: dict[str, str] = attrs.field(init=False, factory=dict)
    _dispatched: int = attrs.field(init=False, default=0)
    _block_states: dict[str, str] = attrs.field(init=False, factory=dict)
    _connected: set[str] = attrs.field(init=False, factory=set)
    _failed_starts: int = attrs.field(init=False, default=0)
    _last_report: tuple[str, float] = attrs.field(init=False, default=("", 0.0))
    _serial: itertools.count[int] = attrs.field(init=False, factory=itertools.count)
    _watchdog: Watchdog = attrs.field(init=False)
    _stopping: bool = attrs.field(init=False, default=False)

    @_watchdog.default
    def _make_watchdog(self) -> Watchdog:
        return Watchdog(
            "mep-parsl-watchdog",
            "the Parsl worker could not interrupt it",
            postpone=self._not_started_yet,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], limits: ExecutorLimits) -> ParslEngine:
        for key in config:
            if key not in cls.KEYS:
                raise _invalid(f"$.engine.{key}", "is not a known option")
        provider = config.get("provider", {"type": "LocalProvider"})
        if not isinstance(provider, Mapping):
            raise _invalid("$.engine.provider", "must be a mapping")
        run_dir = config.get("run_dir")
        if run_dir is not None and (not isinstance(run_dir, str) or not run_dir):
            raise _invalid("$.engine.run_dir", "must be a path")
        retries = config.get("max_retries_on_system_failure", 0)
        if type(retries) is not int or not 0 <= retries <= _MAX_RETRIES:
            raise _invalid(
                "$.engine.max_retries_on_system_failure",
                f"must be an integer from 0 to {_MAX_RETRIES}",
            )
        options = {k: v for k, v in config.items() if k in cls.OPTION_KEYS}
        # YAML writes the port ranges as lists; Parsl types them as tuples.
        for key in ("worker_port_range", "interchange_port_range"):
            if isinstance(options.get(key), list):
                options[key] = tuple(options[key])
        _heartbeat_options(options)
        # Built now so a bad provider or launcher is a configuration error, not a start one.
        return cls(
            dict(options),
            build_provider(provider),
            limits.max_result_bytes,
            run_dir,
            ScalingPolicy.from_config(config),
            retries,
        )

    @property
    def run_directory(self) -> str | None:
        """This engine's own directory (``<run_dir>/<tag>``), while it runs."""
        return self._dir

    # -- start -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the interchange and the initial blocks, then the poller thread.

        Call it from a thread that lives as long as the engine (the interchange's
        parent-death signal is tied to the thread that starts it)."""
        if self._htex is not None:
            raise RuntimeError("the engine was already started")
        from parsl.jobs.strategy import Strategy

        self._tag = OwnerTag.of_process(os.getpid())
        base = self.run_dir or tempfile.gettempdir()
        try:
            os.makedirs(base, mode=0o700, exist_ok=True)
            _remove_dead_run_dirs(base, (self._tag.host, self._tag.boot))
            self._dir = os.path.join(base, str(self._tag))
            os.makedirs(os.path.join(self._dir, "started"), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise TaskError(
                "task.engine_failed", f"cannot create the run directory in {base}: {exc}"
            ) from exc
        self._prepare_provider()
        try:
            self._htex = self._new_htex()
            self._strategy = Strategy(
                strategy=self.scaling.strategy, max_idletime=self.scaling.max_idletime
            )
            self._strategy.add_executors([self._htex])
            self._tick()  # the initial blocks, before start returns
        except Exception as exc:
            self._stop_parsl()
            if isinstance(exc, TaskError):
                raise
            raise TaskError("task.engine_failed", f"{type(exc).__name__}: {exc}") from exc
        self._poller = threading.Thread(target=self._poll, name="mep-parsl-scaling", daemon=True)
        self._poller.start()

    def _prepare_provider(self) -> None:
        provider = self.provider
        script_dir = os.path.join(str(self._dir), "submit_scripts")
        os.makedirs(script_dir, mode=0o700, exist_ok=True)
        provider.script_dir = script_dir
        command = getattr(provider, "_cmd", None)
        if isinstance(command, str) and command.startswith("squeue") and "--states" not in command:
            # Without accounting Parsl asks squeue, which by default forgets a job once it
            # ended: with --states=all an ended job reports how it ended (CA, TO, F…),
            # not a guessed COMPLETED.
            provider._cmd = command.replace("squeue", "squeue --states=all", 1)
        submit = provider.submit

        def submit_noting_refusals(command: str, tasks_per_node: int, job_name: str) -> Any:
            try:
                return submit(command, tasks_per_node, job_name)
            except Exception as exc:
                message = _scheduler_message(exc)
                with self._lock:
                    self._refusals.append(message)
                raise

        provider.submit = submit_noting_refusals

    def _new_htex(self) -> Any:
        """An HTEX named after this process (and generation), started."""
        from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

        assert self._tag is not None
        assert self._dir is not None
        local = type(self.provider).__name__ == "LocalProvider"
        options = dict(self.options)
        if local:
            options.setdefault("address", "127.0.0.1")
        pid = f"{self._tag.pid}:{self._tag.start}"
        label = str(self._tag) if self._generation == 0 else f"{self._tag}.g{self._generation}"
        try:
            htex = _executor_class(self.MPI)(
                label=label,
                provider=self.provider,
                launch_cmd=self._launch_command(DEFAULT_LAUNCH_CMD, pid if local else None),
                interchange_launch_cmd=[
                    sys.executable,
                    "-I",
                    GUARD,
                    "interchange",
                    "--watch",
                    pid,
                ],
                # Failed blocks are this engine's business (task.provider_failed), not a
                # reason to put the executor in Parsl's permanent bad state.
                block_error_handler=False,
                **options,
            )
        except Exception as exc:
            raise _invalid("$.engine", f"{type(exc).__name__}: {exc}") from exc
        htex.held_back = self._held_back
        # What Parsl's DataFlowKernel would otherwise set before starting an executor.
        htex.run_dir = self._dir
        htex.run_id = label
        htex.start()
        return htex

    def _held_back(self) -> int:
        return len(self._waiting)

    def _launch_command(self, template: str, watch: str | None) -> str:
        return _worker_launch_command(template, watch)

    def _resources(self, job: Job) -> dict[str, Any]:
        """The task's ``resource_specification`` for Parsl (none for plain HTEX)."""
        return {}

    # -- tasks -----------------------------------------------------------------------------

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._lock:
            if self._htex is None or self._stopping:
                raise RuntimeError("cannot submit to an engine that is not running")
            for job in jobs:
                marker = None
                if self._dir is not None:
                    marker = os.path.join(self._dir, "started", str(next(self._serial)))
                self._jobs[job] = _Attempt(marker)
            forward = self._active_blocks > 0
            if not forward:
                self._waiting.extend(jobs)
        for job in jobs:
            if job.walltime is not None:
                self._watchdog.arm(job, job.walltime + _CALLER_GRACE)
        if forward:
            self._forward(jobs)
        else:
            self._wake.set()

    def _forward(self, jobs: Sequence[Job]) -> None:
        """Give jobs to the interchange (from any thread)."""
        with self._submit_lock:
            htex = self._htex
            if htex is None:
                with self._lock:
                    self._waiting.extend(j for j in jobs if j in self._jobs)
                return
            for job in jobs:
                attempt = self._jobs.get(job)
                if attempt is None:
                    continue  # answered meanwhile
                try:
                    future = htex.submit(
                        parsl_task,
                        self._resources(job),
                        job.function_payload,
                        job.task.payload,
                        self.max_result_bytes,
                        job.walltime,
                        attempt.marker,
                    )
                except Exception as exc:
                    self._answer(job, "task.engine_failed", f"{type(exc).__name__}: {exc}")
                    continue
                attempt.future = future
                future.add_done_callback(self._on_done(job))

    def _on_done(self, job: Job) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            attempt = self._jobs.get(job)
            if attempt is None or attempt.future is not future:
                return  # answered already, or an earlier attempt
            error = future.exception()
            if error is None:
                self._take(job)
                try:
                    job.complete(future.result())
                except Exception as exc:  # not an Outcome: never leave the caller waiting
                    job.fail("task.engine_failed", f"unexpected result from Parsl: {exc}")
                return
            if type(error).__name__ in ("WorkerLost", "ManagerLost"):
                # Explained (which block, how it ended) and retried or failed by the
                # poller, after a fresh look at the blocks' states.
                with self._lock:
                    self._lost.append((job, error))
                    self._force_poll = True
                self._wake.set()
                return
            self._answer(job, "task.engine_failed", f"{type(error).__name__}: {error}")

        return done

    def _take(self, job: Job) -> _Attempt | None:
        with self._lock:
            return self._jobs.pop(job, None)

    def _answer(self, job: Job, reason: str, message: str) -> None:
        attempt = self._take(job)
        if attempt is not None and attempt.marker is not None:
            with contextlib.suppress(OSError):
                os.unlink(attempt.marker)
        job.fail(reason, message[:_MAX_MESSAGE])

    def _not_started_yet(self, job: Job) -> float | None:
        """The watchdog's question at a job's deadline: seconds to wait longer when the
        task has not run its walltime yet (not started, or started late), else None."""
        attempt = self._jobs.get(job)
        walltime = job.walltime
        if attempt is None or attempt.marker is None or walltime is None:
            return None
        try:
            with open(attempt.marker) as fh:
                text = fh.read(64)
        except FileNotFoundError:
            return walltime + _CALLER_GRACE  # not started (or finished: the result is near)
        except OSError:
            return None
        try:
            started = float(text.split()[0])
        except (ValueError, IndexError):
            started = time.time()  # being written: it starts now
        remaining = started + walltime + _CALLER_GRACE - time.time()
        return remaining if remaining > 0 else None

    def cancel(self, task_ids: frozenset[str]) -> None:
        """Answer ``task.cancelled``; a task not started yet will not run (its flag file
        is seen by ``parsl_task``), a running one on this host has its Parsl worker
        process killed (Parsl's manager replaces it). On another node the work goes on
        until it returns or its walltime alarm fires: the node's process is out of
        this engine's reach (docs/client.md)."""
        with self._lock:
            chosen = [(j, a) for j, a in self._jobs.items() if j.task.task_id in task_ids]
            for job, _ in chosen:
                del self._jobs[job]
            if chosen:
                self._waiting = [j for j in self._waiting if j.task.task_id not in task_ids]
        for job, attempt in chosen:
            if attempt.future is not None and attempt.marker is not None:
                _stop_started(attempt.marker)
            job.fail("task.cancelled", CANCELLED_MESSAGE)

    # -- the poller ------------------------------------------------------------------------

    def _poll(self) -> None:
        while True:
            self._wake.wait(self.scaling.strategy_period)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._tick()
            except Exception:  # the poller must outlive one bad round
                log.exception("parsl.poll_failed")

    def _tick(self) -> None:
        """One round: block states, lost tasks, Parsl's strategy, held tasks, failures."""
        htex = self._htex
        with self._lock:
            force, self._force_poll = self._force_poll, False
        if force and hasattr(htex, "_last_poll_time"):
            # Parsl polls a provider at its own pace (60 s for Slurm); after a lost
            # manager the block's state is wanted now.
            htex._last_poll_time = 0.0
        htex.poll_facade()
        self._look_at_managers(htex)
        self._note_block_changes(htex)
        self._handle_lost(htex)
        self._strategy.strategize([htex])
        terminal = _terminal_states()
        active = sum(1 for s in htex.status_facade.values() if s.state not in terminal)
        with self._lock:
            self._active_blocks = active
            held = self._waiting if active else []
            if active:
                self._waiting = []
            refusals, self._refusals = self._refusals, []
        if held:
            self._forward(held)
        if refusals:
            self._failed_starts += len(refusals)
            self._report("provider_failed", message=refusals[-1])
        if not active and (refusals or self._failed_starts >= _FAILED_STARTS_LIMIT):
            with self._lock:
                pending = bool(self._jobs)
            if pending:
                reason = refusals[-1] if refusals else self._last_report[0]
                self._fail_waiting(htex, reason)

    def _look_at_managers(self, htex: Any) -> None:
        try:
            managers = htex.connected_managers()
        except Exception:
            return
        dispatched = 0
        for manager in managers:
            block = str(manager.get("block_id"))
            self._manager_blocks[str(manager.get("manager"))] = block
            self._connected.add(block)
            dispatched += int(manager.get("tasks") or 0)
        self._dispatched = dispatched
        if managers:
            self._failed_starts = 0

    def _note_block_changes(self, htex: Any) -> None:
        from parsl.jobs.states import JobState

        terminal = _terminal_states()
        for block, status in list(htex.status_facade.items()):
            name = _state_name(status)
            if self._block_states.get(block) == name:
                continue
            self._block_states[block] = name
            if status.state not in terminal or status.state == JobState.SCALED_IN:
                continue
            job_id = htex.blocks_to_job_id.get(block)
            if job_id is None:
                continue  # a refused submission: reported as such
            fields: dict[str, Any] = {"block": block, "job_id": job_id, "state": name}
            if block not in self._connected:
                # It ended before any worker connected (bad worker_init, a node that
                # cannot reach the interchange…): as good as a failed submission.
                self._failed_starts += 1
                detail = status.message or ""
                with contextlib.suppress(Exception):
                    detail = f"{detail} {status.stderr_summary or ''}".strip()
                fields["message"] = (
                    f"block {block} (job {job_id}) ended {name} before its workers "
                    f"connected: {detail}"
                )[:_MAX_MESSAGE]
                self._last_report = (fields["message"], self._last_report[1])
            self._emit("block_ended", fields)

    def _handle_lost(self, htex: Any) -> None:
        with self._lock:
            lost, self._lost = self._lost, []
        retry: list[Job] = []
        for job, error in lost:
            attempt = self._jobs.get(job)
            if attempt is None:
                continue
            message = self._explain_loss(htex, error)
            if attempt.retries < self.max_retries:
                attempt.retries += 1
                attempt.future = None
                if attempt.marker is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(attempt.marker)
                self._emit("worker_lost", {"message": message, "retry": attempt.retries})
                retry.append(job)
                continue
            self._emit("worker_lost", {"message": message})
            self._answer(job, "task.worker_lost", message)
        if retry:
            with self._lock:
                forward = self._active_blocks > 0
                if not forward:
                    self._waiting.extend(retry)
            if forward:
                self._forward(retry)

    def _explain_loss(self, htex: Any, error: BaseException) -> str:
        manager = getattr(error, "manager_id", None)
        if not isinstance(manager, bytes):
            return f"{type(error).__name__}: {error}"
        host = getattr(error, "hostname", "?")
        block = self._manager_blocks.get(manager.decode(errors="replace"))
        threshold = self.options.get("heartbeat_threshold")
        silence = f"no heartbeat from its workers on {host} for {threshold} s"
        if block is None:
            return f"the task's block was lost: {silence}"
        job_id = htex.blocks_to_job_id.get(block, "?")
        status = htex.status_facade.get(block)
        state = _state_name(status)
        if status is not None and status.state in _terminal_states():
            how = f"ended: {state}"
        else:
            how = f"is still {state}"
        return f"the task's block {block} (job {job_id}) {how}; {silence}"

    def _fail_waiting(self, htex: Any, message: str) -> None:
        """No block is left and none can be started: fail every task that waits for one."""
        text = f"the batch system did not start workers for this task: {message}"
        with self._lock:
            held, self._waiting = self._waiting, []
            given = sorted(
                (
                    (a.future.parsl_executor_task_id, j)
                    for j, a in self._jobs.items()
                    if a.future is not None and hasattr(a.future, "parsl_executor_task_id")
                ),
                key=lambda pair: pair[0],
            )
        for job in held:
            self._answer(job, "task.provider_failed", text)
        # The interchange hands tasks out in order: those beyond what its managers took
        # never started. They are answered now, and the interchange replaced so that they
        # can never run later; those the (lost) managers took are lost with them.
        queued = given[self._dispatched :]
        if not queued:
            return
        for _, job in queued:
            self._answer(job, "task.provider_failed", text)
        for _, job in given[: self._dispatched]:
            self._answer(job, "task.worker_lost", "the task's block ended and none replaces it")
        self._replace_interchange()

    def _replace_interchange(self) -> None:
        from parsl.jobs.strategy import Strategy

        with self._submit_lock:
            old = self._htex
            self._generation += 1
            new = self._new_htex()
            strategy = Strategy(
                strategy=self.scaling.strategy, max_idletime=self.scaling.max_idletime
            )
            strategy.add_executors([new])
            # init_blocks are for the endpoint's start only.
            strategy.executors[new.label]["first"] = False
            with self._lock:
                self._htex, self._strategy = new, strategy
                self._manager_blocks.clear()
                self._block_states.clear()
                self._connected.clear()
                self._dispatched = 0
        log.warning("parsl.interchange_replaced", generation=self._generation)
        with contextlib.suppress(Exception):
            old.shutdown()

    def _report(self, kind: str, *, message: str) -> None:
        """A provider failure, at most once per ``_REPORT_EVERY`` unless it changes."""
        now = time.monotonic()
        last, when = self._last_report
        self._last_report = (message, now)
        if message == last and now - when < _REPORT_EVERY:
            return
        self._emit(kind, {"message": message})

    def _emit(self, kind: str, fields: Mapping[str, Any]) -> None:
        log.warning(f"parsl.{kind}", **fields)
        sink = self.on_event
        if sink is not None:
            try:
                sink(kind, fields)
            except Exception:
                log.exception("parsl.event_sink_failed")

    # -- shutdown --------------------------------------------------------------------------

    def shutdown(self, wait: bool = True) -> None:
        if self._htex is None or self._stopping:
            return
        if wait:
            with self._lock:
                outstanding = [job.future for job in self._jobs]
            wait_futures(outstanding)
        with self._lock:
            self._stopping = True
            leftovers = list(self._jobs)
            self._jobs.clear()
            self._waiting.clear()
        self._wake.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join()
        self._watchdog.stop()
        try:
            self._stop_parsl()
        finally:
            for job in leftovers:
                job.fail("task.cancelled", "the executor shut down before the task finished")

    def _stop_parsl(self) -> None:
        htex, provider = self._htex, self.provider
        try:
            if htex is not None:
                terminal = _terminal_states()
                status = htex.status_facade
                job_ids = [
                    job_id
                    for block, job_id in list(htex.blocks_to_job_id.items())
                    if block not in status or status[block].state not in terminal
                ]
                local_groups = _local_process_groups(provider, job_ids)
                if job_ids:
                    with contextlib.suppress(Exception):
                        provider.cancel(job_ids)
                _wait_groups_gone(local_groups, _BLOCK_EXIT_TIMEOUT)
                htex.shutdown()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None


def _stop_started(marker: str) -> None:
    """Flag the task as cancelled, then kill its worker process if it runs here."""
    flag = marker + _CANCELLED_SUFFIX
    with contextlib.suppress(OSError):
        os.close(os.open(flag, os.O_WRONLY | os.O_CREAT, 0o600))
    try:
        with open(marker) as fh:
            fields = fh.read(256).split()
    except OSError:
        fields = []
    if len(fields) == 3 and fields[1].isdigit() and fields[2] == socket.gethostname():
        with contextlib.suppress(OSError):
            os.kill(int(fields[1]), signal.SIGKILL)
        log.info("parsl.task_worker_killed", pid=int(fields[1]))


def _local_process_groups(provider: Any, job_ids: Sequence[Any]) -> list[int]:
    """Process groups of LocalProvider blocks (the provider kills a block's group)."""
    resources = getattr(provider, "resources", {})
    groups = []
    for job_id in job_ids:
        pid = resources.get(job_id, {}).get("remote_pid")
        if isinstance(pid, int):
            with contextlib.suppress(OSError):
                groups.append(os.getpgid(pid))
    return groups


def _wait_groups_gone(groups: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while groups:
        groups = [g for g in groups if _group_alive(g)]
        if not groups:
            return
        if time.monotonic() >= deadline:
            for group in groups:
                with contextlib.suppress(OSError):
                    os.killpg(group, signal.SIGKILL)
            return
        threading.Event().wait(delay)
        delay = min(delay * 2, 0.2)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
