"""MPI tasks end to end, as root: a real ``mepd serve``, a real account, a
``GlobusMPIEngine`` user endpoint (Parsl's MPI mode, one local block) and a real MPI
program (Debian's MPICH: ``mpicc``, ``mpiexec``) whose ranks report who they run as.

The endpoint's ``resource_limits`` cap a task at 4 ranks (2 nodes), and one account at 2
ranks; a block of the local provider has one node. The same under Slurm's ``srun`` is in
tests/test_slurm_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.client import (
    Executor,
    MPIFunction,
    RequestRefused,
    ShellResult,
    TaskInfrastructureError,
)
from tests.daemon_harness import RunningDaemon, start_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

HELLO_C = r"""
#include <mpi.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    struct passwd *pw = getpwuid(geteuid());
    const char *job = getenv("SLURM_JOB_ID");
    printf("rank %d of %d as %s in job %s\n", rank, size, pw ? pw->pw_name : "?",
           job ? job : "none");
    MPI_Finalize();
    return 0;
}
"""

TEMPLATE = """\
engine:
  type: GlobusMPIEngine
  mpi_launcher: mpiexec
  max_workers_per_block: 2
  provider:
    type: LocalProvider
    init_blocks: 1
    min_blocks: 0
    max_blocks: 1
    launcher:
      type: SimpleLauncher
idle_heartbeats_soft: 100
"""


def mpi_tools() -> tuple[str, str] | None:
    mpicc, mpiexec = shutil.which("mpicc"), shutil.which("mpiexec")
    return None if mpicc is None or mpiexec is None else (mpicc, mpiexec)


def compile_hello(where: Path, mpicc: str) -> Path:
    """hello.c compiled into a directory every account can read."""
    source = where / "hello.c"
    source.write_text(HELLO_C)
    binary = where / "hello"
    subprocess.run([mpicc, "-o", str(binary), str(source)], check=True, capture_output=True)
    for path in (where, binary):
        path.chmod(0o755)
    return binary


def write_site(top: Path, accounts: dict[str, Any]) -> Path:
    from tests.runtime_venv import runtime_python

    (top / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
    (top / "templates").mkdir(exist_ok=True)
    (top / "templates" / "user_config_template.yaml.j2").write_text(TEMPLATE)
    rules = [
        {"source": "{username}", "match": who.replace(".", "\\."), "output": entry.pw_name}
        for who, entry in accounts.items()
    ]
    (top / "mapping.json").write_text(
        json.dumps([{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": rules}])
    )
    (top / "policy.csv").write_text("p, domain:example.org, mpi, **, *, -, allow\n")
    capped = accounts["bob@example.org"].pw_name
    settings = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "state_dir": str(top / "state"),
        "python": runtime_python(),
        "limits": {"drain_timeout": 5, "start_timeout": 60},
        "endpoints": [
            {
                "name": "mpi",
                "template": str(top / "templates" / "user_config_template.yaml.j2"),
                "mapping": str(top / "mapping.json"),
                "policy_model": str(REPO / "policies" / "model.conf"),
                "policy": str(top / "policy.csv"),
                "resource_limits": {
                    "num_nodes": 2,
                    "num_ranks": 4,
                    "accounts": {capped: {"num_ranks": 2}},
                },
            }
        ],
    }
    config = top / "settings.yaml"
    config.write_text(json.dumps(settings))
    return config


@pytest.fixture(scope="module")
def hello() -> Iterator[Path]:
    tools = mpi_tools()
    if tools is None:
        pytest.skip("MPI is not installed (mpicc, mpiexec: apt-get install mpich libmpich-dev)")
    where = Path(tempfile.mkdtemp(prefix="mep-mpi-", dir="/var/tmp"))
    try:
        yield compile_hello(where, tools[0])
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: user endpoints run as real accounts")
    from tests.accounts import create_account, delete_account

    made = {"alice@example.org": create_account(), "bob@example.org": create_account()}
    try:
        yield made
    finally:
        for entry in made.values():
            delete_account(entry.pw_name)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, accounts: dict[str, Any], hello: Path
) -> Iterator[RunningDaemon]:
    top = tmp_path_factory.mktemp("mpi")
    running = start_daemon(write_site(top, accounts), top / "state")
    try:
        yield running
    finally:
        running.stop()


def executor(daemon: RunningDaemon, who: str = "alice@example.org", **kwargs: Any) -> Executor:
    return Executor("mpi", url=daemon.url, token=daemon.token(who), **kwargs)


def test_a_four_rank_task_returns_four_ranks_as_the_mapped_account(
    daemon: RunningDaemon, hello: Path, accounts: dict[str, Any]
) -> None:
    name = accounts["alice@example.org"].pw_name
    with executor(daemon, resource_specification={"num_ranks": 4}) as ex:
        result = ex.submit(MPIFunction(f"{hello}")).result(180)
    assert isinstance(result, ShellResult)
    assert result.returncode == 0, (result.stderr, daemon.stderr()[-3000:])
    lines = sorted(result.stdout.splitlines())
    assert lines == [f"rank {r} of 4 as {name} in job none" for r in range(4)], result
    assert result.cmd.startswith("$PARSL_MPI_PREFIX ")


def test_a_resource_specification_for_one_submit_replaces_the_executors(
    daemon: RunningDaemon, hello: Path, accounts: dict[str, Any]
) -> None:
    name = accounts["alice@example.org"].pw_name
    echo = MPIFunction("{program} && echo done {tag}")
    with executor(daemon, resource_specification={"num_ranks": 3}) as ex:
        one = ex.submit_with(
            echo, kwargs={"program": hello, "tag": "one"}, resource_specification={"num_ranks": 2}
        )
        result = one.result(180)
        # {} for one task asks for nothing: a plain task on an MPI endpoint, one rank.
        alone = ex.submit_with(MPIFunction(str(hello)), resource_specification={}).result(180)
    assert alone.stdout == f"rank 0 of 1 as {name} in job none\n"
    assert sorted(result.stdout.splitlines()) == [
        "done one",
        f"rank 0 of 2 as {name} in job none",
        f"rank 1 of 2 as {name} in job none",
    ]


def test_more_ranks_than_allowed_are_refused_at_submit_with_a_reason(
    daemon: RunningDaemon, hello: Path
) -> None:
    with executor(daemon, resource_specification={"num_ranks": 8}) as ex:
        error = ex.submit(MPIFunction(str(hello))).exception(60)
    assert isinstance(error, RequestRefused)
    assert (error.status, error.reason) == (403, "task.resources_not_allowed")
    (violation,) = error.violations
    assert violation.path == "$.tasks[0].resource_specification"
    assert "asks for 8 ranks; this endpoint allows 4" in violation.message


def test_an_account_can_be_capped_below_the_endpoint(daemon: RunningDaemon, hello: Path) -> None:
    with executor(daemon, "bob@example.org", resource_specification={"num_ranks": 3}) as ex:
        error = ex.submit(MPIFunction(str(hello))).exception(60)
        assert isinstance(error, RequestRefused) and error.reason == "task.resources_not_allowed"
        ex.resource_specification = {"num_ranks": 2}
        result = ex.submit(MPIFunction(str(hello))).result(180)
    assert len(result.stdout.splitlines()) == 2


def test_more_nodes_than_a_block_has_are_refused_with_a_reason(
    daemon: RunningDaemon, hello: Path
) -> None:
    with executor(daemon, resource_specification={"num_nodes": 2, "ranks_per_node": 1}) as ex:
        error = ex.submit(MPIFunction(str(hello))).exception(60)
    assert isinstance(error, TaskInfrastructureError), error
    assert error.reason == "task.resources_exceed_block"
    assert "a block of this endpoint has 1" in error.message


def test_a_malformed_resource_specification_is_refused(daemon: RunningDaemon, hello: Path) -> None:
    with executor(daemon, resource_specification={"num_ranks": 2, "gpus": 1}) as ex:
        error = ex.submit(MPIFunction(str(hello))).exception(60)
    assert isinstance(error, RequestRefused)
    assert error.status == 400
