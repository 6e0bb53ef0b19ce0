"""Benchmark: mep on a real Slurm, beside Parsl's HighThroughputExecutor on the same Slurm.

Prints one table with a row per system: the first task's latency *cold* (from the first
request to its result: for mep a user endpoint start, an ``sbatch``, the job starting and
its workers connecting; for HTEX the executor's start, the block and the task) and the
throughput of no-op tasks through one block (2 workers, ``exclusive: false``) once it
runs, for one user. mep is driven over its HTTP API (mepd → user endpoint → Parsl on
Slurm, the job owned by a temporary account); HTEX is driven directly, in this process
(as root, so its job is root's).

Needs root and a Slurm: it runs ``.ci/slurm-up`` (which installs and starts a single-node
Slurm where none answers) and, when it was the last user of a Slurm that script started,
``.ci/slurm-down``. Without them the rows say why they were not measured.

    python bench/slurm.py [--tasks 2000] [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import WORKERS, fmt_rate, fmt_seconds, is_root, print_table, write_json
from tests import slurm_session

# mepd refuses files under a shared sticky directory such as /tmp (security rule 8): the
# deployment goes to a directory only root can write.
PRIVATE_TMP = Path("/var/lib/mep-bench")
TEMPLATE = """\
engine:
  type: GlobusComputeEngine
  max_workers_per_node: {workers}
  max_idletime: 120
  provider:
    type: SlurmProvider
    partition: "debug"
    exclusive: false
    walltime: "00:15:00"
    init_blocks: 0
    min_blocks: 0
    max_blocks: 1
    launcher:
      type: SrunLauncher
heartbeat_period: 5
idle_heartbeats_soft: 1000
idle_heartbeats_hard: 100000
"""
NOOP_SOURCE = "def noop(x):\n    return x\n"


@contextlib.contextmanager
def slurm() -> Iterator[str | None]:
    """A running Slurm (None), or why there is none. Shared with test sessions and
    stopped after if this run was its last user (``tests/slurm_session.py``)."""
    if not is_root():
        yield "not root: starting Slurm and making an account need root"
        return
    with slurm_session.session() as (status, last):
        yield None if status == 0 else last


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def measure_mep(tasks: int) -> dict[str, Any]:
    """First task cold and tasks/s through one block, over mepd's HTTP API."""
    from tests.accounts import create_account, delete_account
    from tests.daemon_harness import remote_function, running_daemon, wait_all, write_deployment
    from tests.runtime_venv import package_paths, runtime_python

    from mepcore.tasks import pack_args, pack_function

    python = runtime_python()
    paths = [p for p in package_paths(python) if os.path.isdir(p)]
    account = create_account()
    try:
        PRIVATE_TMP.mkdir(mode=0o755, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="slurm-", dir=PRIVATE_TMP) as top:
            os.chmod(top, 0o755)
            site = Path(top) / "site"
            config = write_deployment(
                site,
                python=python,
                package_paths=paths,
                limits={"max_tasks_per_request": 10_000, "queued_tasks_per_user": 1_000_000},
                settings_extra={"log_level": "warning"},
            )
            mapping = [
                {
                    "DATA_TYPE": "expression_identity_mapping#1.0.0",
                    "mappings": [
                        {"source": "{username}", "match": "(.*)@example\\.org", "output": "{0}"}
                    ],
                }
            ]
            (site / "mapping.json").write_text(json.dumps(mapping))
            templates = site / "templates"
            (templates / "user_config_template.yaml.j2").write_text(
                TEMPLATE.format(workers=WORKERS)
            )
            (templates / "user_config_schema.json").write_text('{"type": "object"}')
            (templates / "user_environment.yaml").write_text("SLURM_EXPORT_ENV: ALL\n")
            with running_daemon(config, site / "state") as daemon:
                client = daemon.client(daemon.token(f"{account.pw_name}@example.org"), timeout=120)
                fid, body = pack_function(remote_function(NOOP_SOURCE, "noop"))
                client.post("/v1/functions", json={"function": b64(body)}).raise_for_status()

                def submit(count: int) -> list[str]:
                    r = client.post(
                        "/v1/endpoints/hpc/submit",
                        json={
                            "tasks": [
                                {"function_id": fid, "args": b64(pack_args((i,), {}))}
                                for i in range(count)
                            ]
                        },
                    )
                    r.raise_for_status()
                    return list(r.json()["task_ids"])

                began = time.monotonic()
                first = wait_all(client, submit(1), deadline=180)
                cold = time.monotonic() - began
                assert all(v["state"] == "success" for v in first.values()), first
                began = time.monotonic()
                views = wait_all(client, submit(tasks), deadline=600)
                seconds = time.monotonic() - began
                ok = sum(1 for v in views.values() if v["state"] == "success")
                assert ok == tasks, f"{ok} of {tasks} succeeded"
                return {"first_task_s": cold, "tasks_per_s": tasks / seconds, "tasks": tasks}
    finally:
        subprocess.run(["scancel", f"--user={account.pw_name}"], check=False, timeout=30)
        delete_account(account.pw_name)


def measure_htex(tasks: int) -> dict[str, Any]:
    """Parsl's HTEX with a SlurmProvider, driven directly (no DataFlowKernel)."""
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
    from parsl.launchers import SrunLauncher
    from parsl.providers import SlurmProvider

    with tempfile.TemporaryDirectory(prefix="mep-bench-htex-slurm-") as run_dir:
        os.chmod(run_dir, 0o755)
        began = time.monotonic()
        provider = SlurmProvider(
            partition="debug",
            exclusive=False,
            walltime="00:15:00",
            init_blocks=0,
            max_blocks=1,
            launcher=SrunLauncher(),
        )
        provider.script_dir = run_dir
        htex = HighThroughputExecutor(
            label="mep-bench-slurm",
            provider=provider,
            max_workers_per_node=WORKERS,
            launch_cmd=DEFAULT_LAUNCH_CMD.replace(
                "process_worker_pool.py",
                f"{sys.executable} -m parsl.executors.high_throughput.process_worker_pool",
                1,
            ),
            interchange_launch_cmd=[
                sys.executable,
                "-m",
                "parsl.executors.high_throughput.interchange",
            ],
        )
        htex.run_dir = run_dir
        htex.run_id = "mep-bench-slurm"
        htex.start()
        try:
            htex.scale_out_facade(1)
            htex.submit(int, {}, 0).result(180)
            cold = time.monotonic() - began
            began = time.monotonic()
            futures = [htex.submit(int, {}, i) for i in range(tasks)]
            for future in futures:
                future.result(600)
            seconds = time.monotonic() - began
        finally:
            with contextlib.suppress(Exception):
                provider.cancel(list(htex.blocks_to_job_id.values()))
            htex.shutdown()
    return {"first_task_s": cold, "tasks_per_s": tasks / seconds, "tasks": tasks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="a few tasks only")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    tasks = 30 if args.smoke else args.tasks
    rows: list[list[str]] = []
    figures: dict[str, Any] = {}
    # A smoke run starts no Slurm: starting and stopping one takes minutes and leaves
    # daemons behind for report.py's sweep (the Slurm suite tests it for real).
    smoke = contextlib.nullcontext("smoke run: Slurm is measured by make bench only")
    with smoke if args.smoke else slurm() as missing:
        for name, label, measure in (
            ("mep", "mep GlobusComputeEngine via mepd (SlurmProvider)", measure_mep),
            ("htex", "Parsl HTEX direct (SlurmProvider)", measure_htex),
        ):
            if missing is not None:
                rows.append([label, f"not measured: {missing}", "-"])
                continue
            try:
                found = measure(tasks)
            except Exception as exc:
                rows.append([label, f"not measured: {type(exc).__name__}: {str(exc)[:200]}", "-"])
                continue
            figures[name] = found
            rows.append(
                [
                    label,
                    fmt_seconds(found["first_task_s"]),
                    fmt_rate(found["tasks_per_s"], " tasks/s"),
                ]
            )
    print_table(
        "Slurm: first task (cold) and no-op throughput through one block, one user",
        ["system", "first task, cold", "tasks/s through one block"],
        rows,
        [
            f"{tasks} no-op tasks submitted at once after the first; a block is one job of one "
            f"node with {WORKERS} workers, exclusive: false, on the single-node Slurm of "
            ".ci/slurm-up (../shared/SLURM-CI.md)",
            "mep's first task includes the user endpoint's start (rendering, the interchange) "
            "and the HTTP round trips; HTEX's the executor's start; both include sbatch, the "
            "job's start and the worker pool's imports",
        ],
    )
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
