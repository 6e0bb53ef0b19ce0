"""An MPI task under Slurm, end to end: mepd, a real account, a ``GlobusMPIEngine`` user
endpoint whose block is a Slurm job of that account, and the task's ranks started by
``srun`` inside that job (MPICH over Slurm's PMI2). One short test; the Slurm suite's
others are in tests/test_slurm_e2e.py, the local MPI tests in tests/test_mpi.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.client import Executor, MPIFunction
from tests.daemon_harness import RunningDaemon, start_daemon
from tests.test_mpi import compile_hello, mpi_tools

pytestmark = [pytest.mark.root, pytest.mark.slurm, pytest.mark.parsl]

REPO = Path(__file__).resolve().parents[1]

# One node per block; the pool of workers runs on it (SimpleLauncher) and each task's
# ranks are a job step: srun --ntasks … inside the block's job.
TEMPLATE = """\
engine:
  type: GlobusMPIEngine
  mpi_launcher: srun
  max_workers_per_block: 1
  heartbeat_period: 2
  heartbeat_threshold: 10
  max_idletime: 3
  job_status_kwargs:
    strategy_period: 1
  provider:
    type: SlurmProvider
    partition: "debug"
    exclusive: false
    walltime: "00:05:00"
    nodes_per_block: 1
    init_blocks: 0
    min_blocks: 0
    max_blocks: 1
    launcher:
      type: SimpleLauncher
heartbeat_period: 1
idle_heartbeats_soft: 100000
idle_heartbeats_hard: 100000
"""


@pytest.fixture(scope="module")
def hello(slurm_cluster: str) -> Iterator[Path]:
    tools = mpi_tools()
    if tools is None:
        pytest.skip("MPI is not installed (mpicc, mpiexec: apt-get install mpich libmpich-dev)")
    where = Path(tempfile.mkdtemp(prefix="mep-mpi-slurm-", dir="/var/tmp"))
    try:
        yield compile_hello(where, tools[0])
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def account(slurm_cluster: str) -> Iterator[Any]:
    from tests.accounts import create_account, delete_account

    made = create_account()
    try:
        yield made
    finally:
        subprocess.run(["scancel", f"--user={made.pw_name}"], check=False, timeout=30)
        delete_account(made.pw_name)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, account: Any, hello: Path
) -> Iterator[RunningDaemon]:
    from tests.runtime_venv import runtime_python

    top = tmp_path_factory.mktemp("mpi-slurm")
    (top / "state").mkdir(mode=0o700)
    (top / "user_config_template.yaml.j2").write_text(TEMPLATE)
    (top / "user_environment.yaml").write_text("SLURM_EXPORT_ENV: ALL\n")
    rule = {"source": "{username}", "match": "alice@example\\.org", "output": account.pw_name}
    (top / "mapping.json").write_text(
        json.dumps([{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": [rule]}])
    )
    (top / "policy.csv").write_text("p, domain:example.org, mpi, **, *, -, allow\n")
    settings = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "state_dir": str(top / "state"),
        "python": runtime_python(),
        "limits": {"drain_timeout": 20, "start_timeout": 60},
        "endpoints": [
            {
                "name": "mpi",
                "template": str(top / "user_config_template.yaml.j2"),
                "environment": str(top / "user_environment.yaml"),
                "mapping": str(top / "mapping.json"),
                "policy_model": str(REPO / "policies" / "model.conf"),
                "policy": str(top / "policy.csv"),
                "resource_limits": {"num_nodes": 1, "num_ranks": 4},
            }
        ],
    }
    (top / "settings.yaml").write_text(json.dumps(settings))
    running = start_daemon(top / "settings.yaml", top / "state")
    try:
        yield running
    finally:
        running.stop()


def job_owner(job_id: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return out.split("UserId=", 1)[1].split("(", 1)[0]


def test_an_mpi_task_under_srun_runs_its_ranks_inside_the_users_job(
    daemon: RunningDaemon, hello: Path, account: Any
) -> None:
    # Two cores here: four ranks overcommit the job's one CPU; PMI2 connects MPICH's
    # ranks to each other through srun.
    spec = {"num_ranks": 4, "launcher_options": "--mpi=pmi2 --overcommit"}
    token = daemon.token("alice@example.org")
    with Executor("mpi", url=daemon.url, token=token, resource_specification=spec) as ex:
        result = ex.submit(MPIFunction(str(hello))).result(240)
    assert result.returncode == 0, (result.stderr, daemon.stderr()[-3000:])
    lines = sorted(result.stdout.splitlines())
    assert len(lines) == 4, result
    jobs = {line.rsplit(" ", 1)[1] for line in lines}
    assert len(jobs) == 1 and "none" not in jobs, lines
    (job_id,) = jobs
    assert lines == [f"rank {r} of 4 as {account.pw_name} in job {job_id}" for r in range(4)]
    assert job_owner(job_id) == account.pw_name
