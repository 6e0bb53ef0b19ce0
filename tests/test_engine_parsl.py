"""Parsl engine specifics: the Slurm submit script built from a config, a clean shutdown,
and what Parsl's strategy and the engine around it do with blocks (LocalProvider blocks
here; the real Slurm is tests/test_slurm_e2e.py): scaling out and in, a refused
submission, a lost block, walltime counted from the start, retries, and nothing left
when the engine's process is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

pytest.importorskip("parsl")
pytestmark = pytest.mark.parsl

from mepcore.config import parse_endpoint_config  # noqa: E402
from mepcore.errors import ConfigError  # noqa: E402
from mepcore.tasks import (  # noqa: E402
    Executor,
    ExecutorLimits,
    ResultEnvelope,
    TaskEnvelope,
    pack_args,
    pack_function,
    unpack_result,
)
from mepcore.tasks.parsl_build import ScalingPolicy, build_provider  # noqa: E402
from mepcore.tasks.parsl_engine import ParslEngine  # noqa: E402
from mepcore.tasks.parsl_owner import OwnerTag, _remove_dead_run_dirs, machine_keys  # noqa: E402
from tests.daemon_harness import remote_function  # noqa: E402

SLURM_ENGINE: dict[str, Any] = {
    "type": "GlobusComputeEngine",
    "max_workers_per_node": 4,
    "provider": {
        "type": "SlurmProvider",
        "partition": "compute",
        "account": "proj-042",
        "walltime": "01:30:00",
        "nodes_per_block": 2,
        "init_blocks": 0,
        "max_blocks": 3,
        "worker_init": "module load python/3.11",
        "launcher": {"type": "SrunLauncher"},
    },
}


def test_slurm_submit_script_is_built_from_the_config(tmp_path: Path) -> None:
    # Executor.from_engine_config accepts the config (checked, nothing started) ...
    Executor.from_engine_config(SLURM_ENGINE)
    # ... and the provider it describes writes this script; sbatch is replaced, not run.
    provider = build_provider(SLURM_ENGINE["provider"])
    provider.script_dir = str(tmp_path)
    submitted: list[str] = []

    def fake_sbatch(cmd: str, timeout: int | None = None) -> tuple[int, str, str]:
        submitted.append(cmd)
        return 0, "Submitted batch job 4242\n", ""

    provider.execute_wait = fake_sbatch
    job_id = provider.submit("worker-command --flag", tasks_per_node=1, job_name="mep.block-0")
    assert job_id == "4242"
    assert len(submitted) == 1 and submitted[0].startswith("sbatch ")
    script = Path(submitted[0].split(" ", 1)[1]).read_text()
    assert script.startswith("#!/bin/bash")
    for line in (
        "#SBATCH --partition=compute",
        "#SBATCH --account=proj-042",
        "#SBATCH --nodes=2",
        "#SBATCH --time=90",
        "#SBATCH --exclusive",
        "module load python/3.11",
    ):
        assert line in script, line
    assert "srun" in script and "worker-command --flag" in script


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def test_shutdown_cancels_the_block_and_leaves_no_worker_pool(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "parsl-run")
    engine = {
        "type": "GlobusComputeEngine",
        "max_workers_per_node": 1,
        "run_dir": run_dir,
        # No block at start: the first task asks for one.
        "provider": {
            "type": "LocalProvider",
            "init_blocks": 0,
            "max_blocks": 1,
            "launcher": {"type": "SingleNodeLauncher"},
        },
    }
    executor = Executor.from_engine_config(engine)
    fid, body = pack_function(os.getpid)
    with executor:
        assert _processes_mentioning(run_dir) == []
        executor.register_function(fid, body)
        worker_pid = unpack_result(
            executor.submit(TaskEnvelope("p", fid, pack_args((), {}))).result(60)
        )
        running = _processes_mentioning(run_dir)
        assert running, "the worker pool should be running with the run_dir on its command line"
        assert worker_pid != os.getpid()
    # Shutdown returned: the block is cancelled and every process of it is gone.
    assert _processes_mentioning(run_dir) == []
    assert not [p for p in _processes_mentioning("process_worker_pool") if p in running]
    assert not [
        p
        for p in _processes_mentioning("high_throughput.interchange")
        if _parent_of(p) == os.getpid()
    ]


def _parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


# -- scaling, failures, walltime, orphans ---------------------------------------------------

FAST = {
    "heartbeat_period": 1,
    "heartbeat_threshold": 4,
    "job_status_kwargs": {"strategy_period": 0.2},
}
SOURCE = """
import os, time

def pool(seconds=0.0, marker=None):
    if marker:
        open(marker, "w").close()
    time.sleep(seconds)
    return os.getppid()

def dies_first(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return "second attempt"

def always_dies():
    os._exit(4)
"""
FUNCTIONS = {
    name: pack_function(remote_function(SOURCE, name))
    for name in ("pool", "dies_first", "always_dies")
}


def local_engine(run_dir: Path, **options: Any) -> dict[str, Any]:
    provider = {
        "type": "LocalProvider",
        "init_blocks": 0,
        "max_blocks": 1,
        "launcher": {"type": "SingleNodeLauncher"},
        **options.pop("provider", {}),
    }
    return {
        "type": "GlobusComputeEngine",
        "max_workers_per_node": 1,
        "run_dir": str(run_dir),
        **FAST,
        **options,
        "provider": provider,
    }


@contextlib.contextmanager
def running(
    config: dict[str, Any], prepare: Callable[[Any], None] = lambda e: None
) -> Iterator[Any]:
    executor = Executor.from_engine_config(config)
    prepare(executor.engine)
    with executor:
        for fid, body in FUNCTIONS.values():
            executor.register_function(fid, body)
        yield executor


def call(executor: Any, name: str, *args: Any, walltime: float | None = None) -> Any:
    fid = FUNCTIONS[name][0]
    return executor.submit(
        TaskEnvelope(f"{name}-{time.monotonic_ns()}", fid, pack_args(args, {}), walltime)
    )


def poll(what: str, check: Callable[[], Any], deadline: float) -> Any:
    end = time.monotonic() + deadline
    while not (value := check()):
        assert time.monotonic() < end, f"not within {deadline} s: {what}"
        time.sleep(0.05)  # the interval of a deadline poll
    return value


def test_scaling_settings_come_from_the_engine_config() -> None:
    assert ScalingPolicy.from_config({}) == ScalingPolicy("simple", 120.0, 5.0)
    policy = ScalingPolicy.from_config(
        {
            "strategy": "htex_auto_scale",
            "job_status_kwargs": {"max_idletime": 30, "strategy_period": 2},
        }
    )
    assert policy == ScalingPolicy("htex_auto_scale", 30.0, 2.0)
    for bad in (
        {"strategy": "greedy"},
        {"max_idletime": -1},
        {"job_status_kwargs": {"poll": 1}},
        {"job_status_kwargs": {"strategy_period": 0}},
        {"max_idletime": 10, "job_status_kwargs": {"max_idletime": 20}},
    ):
        with pytest.raises(ConfigError):
            ScalingPolicy.from_config(bad)
    # The endpoint-config schema takes the same keys (and refuses what Parsl would).
    config = parse_endpoint_config(
        "engine:\n  type: GlobusComputeEngine\n  strategy: simple\n  max_idletime: 60\n"
        "  job_status_kwargs: {strategy_period: 1}\n  max_retries_on_system_failure: 2\n"
        "  run_dir: /scratch/me\n  address: 10.0.0.5\n"
    )
    assert config.engine.options["job_status_kwargs"] == {"strategy_period": 1}
    with pytest.raises(ConfigError):
        parse_endpoint_config("engine:\n  type: GlobusComputeEngine\n  strategy: greedy\n")


def test_batch_blocks_get_a_thirty_second_heartbeat_threshold_by_default() -> None:
    engine = ParslEngine.from_config(SLURM_ENGINE, ExecutorLimits())
    assert engine.options["heartbeat_period"] == 5
    assert engine.options["heartbeat_threshold"] == 30
    assert engine.max_retries == 0
    slow = ParslEngine.from_config({**SLURM_ENGINE, "heartbeat_period": 20}, ExecutorLimits())
    assert slow.options["heartbeat_threshold"] == 60
    with pytest.raises(ConfigError):
        ParslEngine.from_config(
            {**SLURM_ENGINE, "heartbeat_period": 10, "heartbeat_threshold": 10}, ExecutorLimits()
        )
    with pytest.raises(ConfigError):
        ParslEngine.from_config(
            {**SLURM_ENGINE, "max_retries_on_system_failure": -1}, ExecutorLimits()
        )


def test_owner_tags_name_a_process_and_tell_when_it_is_gone(tmp_path: Path) -> None:
    mine = OwnerTag.of_process(os.getpid())
    assert OwnerTag.find(f"parsl.{mine}.block-3.1712345678.9") == mine
    assert OwnerTag.find("parsl.htex.block-0") is None
    assert mine.is_gone() is False
    child = subprocess.Popen(["true"])
    dead = OwnerTag.of_process(child.pid)
    child.wait()
    assert dead.is_gone() is True
    host, boot = machine_keys()
    assert attrs.evolve(mine, boot="000000" if boot != "000000" else "111111").is_gone() is True
    assert attrs.evolve(mine, host="000000" if host != "000000" else "111111").is_gone() is None
    # Run directories of gone engines (of this account) are removed; others stay.
    for tag in (mine, dead):
        (tmp_path / str(tag)).mkdir()
    (tmp_path / "unrelated").mkdir()
    _remove_dead_run_dirs(str(tmp_path), machine_keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(mine), "unrelated"])


def test_blocks_scale_out_to_max_blocks_under_load_and_in_when_idle(tmp_path: Path) -> None:
    config = local_engine(tmp_path, max_idletime=1, provider={"max_blocks": 2})
    with running(config) as executor:
        engine = executor.engine
        futures = [call(executor, "pool", 1.5) for _ in range(4)]
        pools = {unpack_result(f.result(60)) for f in futures}
        assert len(pools) == 2, "two blocks, one worker pool each"
        assert len(engine._htex.blocks_to_job_id) == 2

        def scaled_in() -> bool:
            states = {s.state.name for s in engine._htex.status_facade.values()}
            return states == {"SCALED_IN"}

        poll("idle blocks scaled in", scaled_in, 30)
        # A task later gets a block again.
        assert unpack_result(call(executor, "pool").result(60)) not in pools


def test_a_refused_submission_fails_waiting_tasks_with_the_schedulers_message(
    tmp_path: Path,
) -> None:
    refusal = (
        "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    )
    events: list[tuple[str, Any]] = []

    def refuse(engine: Any) -> None:
        engine.provider.execute_wait = lambda cmd, timeout=None: (1, "", refusal + "\n")
        engine.on_event = lambda kind, fields: events.append((kind, dict(fields)))

    config = {**SLURM_ENGINE, "run_dir": str(tmp_path), **FAST}
    with running(config, refuse) as executor:
        for _ in range(2):  # the endpoint keeps serving: each new task tries again
            result: ResultEnvelope = call(executor, "pool").result(60)
            assert result.status == "failed"
            assert result.error is not None and result.error.reason == "task.provider_failed"
            assert refusal in result.error.message
    assert ("provider_failed", {"message": refusal}) in events


def test_a_lost_block_fails_its_task_naming_the_block_and_a_new_block_serves(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "started"
    with running(local_engine(tmp_path / "run")) as executor:
        engine = executor.engine
        first_pool = unpack_result(call(executor, "pool").result(60))
        lost = call(executor, "pool", 120, str(marker))
        poll("the task to start", marker.exists, 30)
        (job_id,) = engine._htex.blocks_to_job_id.values()
        os.killpg(os.getpgid(engine.provider.resources[job_id]["remote_pid"]), signal.SIGKILL)
        result = lost.result(30)  # heartbeat_threshold 4 s, and a poll
        assert result.error is not None and result.error.reason == "task.worker_lost"
        # Its state as the provider sees it: CANCELLED once the killed block's leader is
        # reaped (LocalProvider asks kill -0; the Slurm suite checks Slurm's word).
        assert f"block 0 (job {job_id}) " in result.error.message, result.error.message
        assert "ended: CANCELLED" in result.error.message or "RUNNING" in result.error.message
        assert unpack_result(call(executor, "pool").result(60)) != first_pool


def test_walltime_counts_from_the_start_of_the_task(tmp_path: Path) -> None:
    with running(local_engine(tmp_path)) as executor:
        # One worker: the third task starts about 2 s after it was submitted, yet it
        # never ran more than 1 s of its 1.8 s walltime.
        queued = [call(executor, "pool", 1.0, walltime=1.8) for _ in range(3)]
        assert [f.result(60).status for f in queued] == ["success"] * 3
        late = call(executor, "pool", 10, walltime=1).result(60)
        assert late.error is not None and late.error.reason == "task.timeout"


def test_lost_workers_are_retried_max_retries_on_system_failure_times(tmp_path: Path) -> None:
    config = local_engine(tmp_path / "run", max_retries_on_system_failure=1)
    with running(config) as executor:
        assert unpack_result(call(executor, "dies_first", str(tmp_path / "m")).result(60)) == (
            "second attempt"
        )
        result = call(executor, "always_dies").result(60)
        assert result.error is not None and result.error.reason == "task.worker_lost"


ORPHAN_SCRIPT = """
import os, sys
from mepcore.tasks import Executor
engine = {engine!r}
executor = Executor.from_engine_config(engine)
executor.start()
htex = executor.engine._htex
(job,) = htex.blocks_to_job_id.values()
print(htex.interchange_proc.pid, os.getpgid(executor.engine.provider.resources[job]["remote_pid"]), flush=True)
sys.stdin.read()
"""


def test_killing_the_engine_process_leaves_no_interchange_and_no_block(tmp_path: Path) -> None:
    engine = local_engine(tmp_path, provider={"init_blocks": 1})
    owner = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT.format(engine=engine)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    interchange, block_group = map(int, owner.stdout.readline().split())
    poll("the block's worker pool", lambda: _processes_mentioning("process_worker_pool"), 30)
    assert _alive(interchange) and _group_has_living(block_group)
    owner.kill()
    owner.wait()

    def gone() -> bool:
        return not _alive(interchange) and not _group_has_living(block_group)

    poll("the interchange and the block to die with their engine", gone, 15)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _group_has_living(group: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] not in ("Z", "X"):
                return True
    return False
