"""Parsl engine specifics: a Slurm submit script built from a config, and a clean shutdown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("parsl")
pytestmark = pytest.mark.parsl

from mepcore.tasks import Executor, TaskEnvelope, pack_args, pack_function, unpack_result  # noqa: E402
from mepcore.tasks.parsl_engine import build_provider  # noqa: E402

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
