"""The Parsl engine (``GlobusComputeEngine``): Parsl's HighThroughputExecutor, driven directly.

The executor is built, started and scaled here without Parsl's ``load()`` and its
DataFlowKernel: we set its run directory, start it (interchange and result thread), and
ask its provider for ``init_blocks`` blocks ourselves. Providers and launchers come from
closed tables (``PROVIDERS``, ``LAUNCHERS``); their options are checked against the
chosen class's constructor, never used to import anything by name.

Walltime: each task arms SIGALRM in the Parsl worker (interrupts Python code and sleeps),
and the caller is told ``task.timeout`` on time in any case; a task stuck in C code keeps
its worker until it returns. A worker that dies fails its task with ``task.worker_lost``
(Parsl's manager notices and replaces the worker).

Shutdown cancels every block through the provider, waits (bounded) until the block's
processes are gone for local blocks, then stops the interchange.

This module imports Parsl only inside functions: importing ``mepcore.tasks`` never
imports Parsl.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

import attrs

from mepcore.errors import ConfigError, TaskError, Violation
from mepcore.tasks._run import Outcome, load_function, run_task
from mepcore.tasks.engine import ExecutorLimits, Job, Watchdog

PROVIDER_TYPES = (
    "LocalProvider",
    "SlurmProvider",
    "PBSProProvider",
    "TorqueProvider",
    "LSFProvider",
    "CondorProvider",
    "GridEngineProvider",
)
LAUNCHER_TYPES = (
    "SingleNodeLauncher",
    "SimpleLauncher",
    "SrunLauncher",
    "SrunMPILauncher",
    "MpiExecLauncher",
    "MpiRunLauncher",
    "AprunLauncher",
    "JsrunLauncher",
)
# HighThroughputExecutor options an endpoint config may set (besides type and provider).
_HTEX_OPTIONS = frozenset(
    {
        "max_workers_per_node",
        "cores_per_worker",
        "mem_per_worker",
        "address",
        "worker_port_range",
        "interchange_port_range",
        "heartbeat_period",
        "heartbeat_threshold",
        "poll_period",
        "prefetch_capacity",
        "cpu_affinity",
        "available_accelerators",
        "encrypted",
        "worker_debug",
        "drain_period",
    }
)
_ENGINE_KEYS = _HTEX_OPTIONS | {"type", "provider", "run_dir"}
_BLOCK_EXIT_TIMEOUT = 10.0
_DEFAULT_HEARTBEAT_PERIOD = 5
# The caller-side timer fires a little after the in-worker alarm so the worker's own
# (more precise) timeout normally wins.
_CALLER_GRACE = 1.0


def _invalid(path: str, message: str) -> ConfigError:
    return ConfigError(
        "config.endpoint_config_invalid",
        f"{path}: {message}",
        violations=[Violation(path, message)],
    )


def provider_classes() -> Mapping[str, type]:
    """The closed table of Parsl providers (imports Parsl)."""
    from parsl import providers

    return {name: getattr(providers, name) for name in PROVIDER_TYPES}


def launcher_classes() -> Mapping[str, type]:
    """The closed table of Parsl launchers (imports Parsl)."""
    from parsl import launchers

    return {name: getattr(launchers, name) for name in LAUNCHER_TYPES}


def _construct(cls: type, options: Mapping[str, Any], path: str) -> Any:
    parameters = inspect.signature(cls).parameters
    for key in options:
        if key not in parameters or key == "self":
            raise _invalid(f"{path}.{key}", f"is not an option of {cls.__name__}")
        if not _same_kind(parameters[key], options[key]):
            raise _invalid(path, f"{key} must be like its default {parameters[key].default!r}")
    try:
        return cls(**options)
    except Exception as exc:  # typeguard's TypeCheckError and Parsl's own checks
        raise _invalid(path, f"{type(exc).__name__}: {exc}") from exc


def _same_kind(parameter: inspect.Parameter, value: Any) -> bool:
    """Whether ``value`` has the plain type of a constructor default (not every Parsl
    class checks its arguments' types)."""
    kind = type(parameter.default)
    if kind not in (bool, int, float, str):
        return True
    # Parsl's parallelism is a fraction even where its default is written as 1.
    fraction = parameter.name == "parallelism"
    if kind is float or (kind is int and ("float" in str(parameter.annotation) or fraction)):
        return type(value) in (int, float)
    return type(value) is kind


def build_launcher(config: Any, path: str = "$.engine.provider.launcher") -> Any:
    if not isinstance(config, Mapping) or not isinstance(config.get("type"), str):
        raise _invalid(path, "must be a mapping with a type")
    cls = launcher_classes().get(config["type"])
    if cls is None:
        raise _invalid(f"{path}.type", f"must be one of {', '.join(LAUNCHER_TYPES)}")
    return _construct(cls, {k: v for k, v in config.items() if k != "type"}, path)


def build_provider(config: Any, path: str = "$.engine.provider") -> Any:
    """A Parsl provider from its endpoint-config mapping, through the closed tables."""
    if not isinstance(config, Mapping) or not isinstance(config.get("type"), str):
        raise _invalid(path, "must be a mapping with a type")
    cls = provider_classes().get(config["type"])
    if cls is None:
        raise _invalid(f"{path}.type", f"must be one of {', '.join(PROVIDER_TYPES)}")
    options = {k: v for k, v in config.items() if k not in ("type", "launcher")}
    if "launcher" in config:
        options["launcher"] = build_launcher(config["launcher"], f"{path}.launcher")
    return _construct(cls, options, path)


def _worker_launch_command(template: str) -> str:
    # Parsl's default names its worker script, found on PATH; an endpoint's PATH is a
    # safe default that does not hold the virtualenv, so run the module with our own
    # interpreter instead (braces doubled: the command is a format template).
    python = shlex.quote(sys.executable).replace("{", "{{").replace("}", "}}")
    return template.replace(
        "process_worker_pool.py",
        f"{python} -m parsl.executors.high_throughput.process_worker_pool",
        1,
    )


def parsl_task(
    function_payload: bytes,
    args_payload: bytes,
    max_result_bytes: int,
    walltime: float | None,
) -> Outcome:
    """What a Parsl worker runs: load, call, serialize with the size bound (never raises)."""
    return run_task(
        load_function(function_payload), args_payload, max_result_bytes, alarm_walltime=walltime
    )


@attrs.define
class ParslEngine:
    """HighThroughputExecutor with a provider built from the endpoint config."""

    options: Mapping[str, Any]
    provider: Any
    max_result_bytes: int
    run_dir: str | None = None
    _htex: Any = attrs.field(init=False, default=None)
    _owned_run_dir: str | None = attrs.field(init=False, default=None)
    _block_tmp: str | None = attrs.field(init=False, default=None)
    _outstanding: set[Job] = attrs.field(init=False, factory=set)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _watchdog: Watchdog = attrs.field(
        init=False,
        factory=lambda: Watchdog("mep-parsl-watchdog", "the Parsl worker could not interrupt it"),
    )
    _stopping: bool = attrs.field(init=False, default=False)
    _asked_first_block: bool = attrs.field(init=False, default=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], limits: ExecutorLimits) -> ParslEngine:
        for key in config:
            if key not in _ENGINE_KEYS:
                raise _invalid(f"$.engine.{key}", "is not a known option")
        provider = config.get("provider", {"type": "LocalProvider"})
        if not isinstance(provider, Mapping):
            raise _invalid("$.engine.provider", "must be a mapping")
        run_dir = config.get("run_dir")
        if run_dir is not None and not isinstance(run_dir, str):
            raise _invalid("$.engine.run_dir", "must be a path")
        options = {k: v for k, v in config.items() if k in _HTEX_OPTIONS}
        # YAML writes the port ranges as lists; Parsl types them as tuples.
        for key in ("worker_port_range", "interchange_port_range"):
            if isinstance(options.get(key), list):
                options[key] = tuple(options[key])
        # Parsl's manager checks its workers once per heartbeat period: its default (30 s)
        # makes a lost worker a 30 s wait.
        options.setdefault("heartbeat_period", _DEFAULT_HEARTBEAT_PERIOD)
        # Built now so a bad provider or launcher is a configuration error, not a start one.
        return cls(dict(options), build_provider(provider), limits.max_result_bytes, run_dir)

    def start(self) -> None:
        if self._htex is not None:
            raise RuntimeError("the engine was already started")
        from parsl.executors import HighThroughputExecutor
        from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

        provider = self.provider
        options = dict(self.options)
        if type(provider).__name__ == "LocalProvider":
            options.setdefault("address", "127.0.0.1")
        try:
            htex = HighThroughputExecutor(
                label="mep",
                provider=provider,
                launch_cmd=_worker_launch_command(DEFAULT_LAUNCH_CMD),
                interchange_launch_cmd=[
                    sys.executable,
                    "-m",
                    "parsl.executors.high_throughput.interchange",
                ],
                **options,
            )
        except Exception as exc:
            raise _invalid("$.engine", f"{type(exc).__name__}: {exc}") from exc
        if self.run_dir is None:
            self._owned_run_dir = tempfile.mkdtemp(prefix="mep-parsl-")
            run_dir = self._owned_run_dir
        else:
            run_dir = self.run_dir
            os.makedirs(run_dir, mode=0o700, exist_ok=True)
        if type(provider).__name__ == "LocalProvider":
            # A block's worker pool keeps a multiprocessing socket directory in TMPDIR
            # that outlives a cancelled block; local blocks get a private TMPDIR of
            # their own, removed at shutdown. It is a short path on purpose: the socket
            # path inside must fit AF_UNIX's 108 bytes. (Remote blocks keep their
            # node's TMPDIR: a local directory need not exist there.)
            block_tmp = tempfile.mkdtemp(prefix="mepb-")
            self._block_tmp = block_tmp
            tmp_arg = shlex.quote(block_tmp).replace("{", "{{").replace("}", "}}")
            htex.launch_cmd = f"env TMPDIR={tmp_arg} {htex.launch_cmd}"
        # What Parsl's DataFlowKernel would otherwise set before starting an executor.
        htex.run_dir = run_dir
        htex.run_id = "mep"
        script_dir = os.path.join(run_dir, "submit_scripts")
        os.makedirs(script_dir, mode=0o700, exist_ok=True)
        provider.script_dir = script_dir
        self._htex = htex
        try:
            htex.start()  # type: ignore[no-untyped-call]
            blocks = htex.scale_out_facade(provider.init_blocks)
            if provider.init_blocks and not blocks:
                raise TaskError("task.engine_failed", "the provider started no block")
        except Exception as exc:
            self._stop_parsl()
            if isinstance(exc, TaskError):
                raise
            raise TaskError("task.engine_failed", f"{type(exc).__name__}: {exc}") from exc

    def submit(self, jobs: Sequence[Job]) -> None:
        htex = self._htex
        if htex is None or self._stopping:
            raise RuntimeError("cannot submit to an engine that is not running")
        with self._lock:
            self._outstanding.update(jobs)
            # With init_blocks: 0 the first task asks for the first block (no Parsl
            # scaling strategy runs here: see docs/engines.md).
            if not self._asked_first_block and self.provider.max_blocks > 0:
                self._asked_first_block = True
                if not htex.blocks_to_job_id:
                    htex.scale_out_facade(1)
        for job in jobs:
            try:
                future = htex.submit(
                    parsl_task,
                    {},
                    job.function_payload,
                    job.task.payload,
                    self.max_result_bytes,
                    job.walltime,
                )
            except Exception as exc:
                self._finish(job)
                job.fail("task.engine_failed", f"{type(exc).__name__}: {exc}")
                continue
            if job.walltime is not None:
                self._watchdog.arm(job, job.walltime + _CALLER_GRACE)
            future.add_done_callback(self._on_done(job))

    def _on_done(self, job: Job) -> Callable[[Future[Any]], None]:
        def done(future: Future[Any]) -> None:
            self._finish(job)
            error = future.exception()
            if error is None:
                try:
                    job.complete(future.result())
                except Exception as exc:  # not an Outcome: never leave the caller waiting
                    job.fail("task.engine_failed", f"unexpected result from Parsl: {exc}")
                return
            name = type(error).__name__
            reason = (
                "task.worker_lost"
                if name in ("WorkerLost", "ManagerLost")
                else ("task.engine_failed")
            )
            job.fail(reason, f"{name}: {error}"[:2000])

        return done

    def _finish(self, job: Job) -> None:
        with self._lock:
            self._outstanding.discard(job)

    def shutdown(self, wait: bool = True) -> None:
        if self._htex is None or self._stopping:
            return
        if wait:
            with self._lock:
                outstanding = [job.future for job in self._outstanding]
            wait_futures(outstanding)
        with self._lock:
            self._stopping = True
            leftovers = list(self._outstanding)
            self._outstanding.clear()
        self._watchdog.stop()
        try:
            self._stop_parsl()
        finally:
            for job in leftovers:
                job.fail("task.cancelled", "the executor shut down before the task finished")

    def _stop_parsl(self) -> None:
        htex, provider = self._htex, self.provider
        try:
            job_ids = list(htex.blocks_to_job_id.values())
            local_groups = _local_process_groups(provider, job_ids)
            if job_ids:
                with contextlib.suppress(Exception):
                    provider.cancel(job_ids)
            _wait_groups_gone(local_groups, _BLOCK_EXIT_TIMEOUT)
            htex.shutdown()
        finally:
            if self._owned_run_dir is not None:
                shutil.rmtree(self._owned_run_dir, ignore_errors=True)
                self._owned_run_dir = None
            if self._block_tmp is not None:
                shutil.rmtree(self._block_tmp, ignore_errors=True)
                self._block_tmp = None


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
