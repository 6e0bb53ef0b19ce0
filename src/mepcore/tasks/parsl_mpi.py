"""The MPI engine (``GlobusMPIEngine``): the Parsl engine in Parsl's MPI mode.

Parsl's ``MPIExecutor`` (HighThroughputExecutor with ``enable_mpi_mode``) runs one pool
of workers on the first node of each block (the provider's launcher is
``SimpleLauncher``); each task names the nodes and ranks it needs in its
``resource_specification``, the pool hands it that many of the block's nodes, and sets
``$PARSL_MPI_PREFIX`` (and the launcher-specific ``$PARSL_MPIEXEC_PREFIX``,
``$PARSL_SRUN_PREFIX``, ``$PARSL_APRUN_PREFIX``) in the task's environment: the launcher
command line (``mpi_launcher``: ``mpiexec``, ``srun`` or ``aprun``) for those nodes and
ranks. ``MPIFunction`` of ``mepcore.client`` puts it in front of its command.

What the engine adds:

- every task's specification is checked and completed (``ResourceSpecification``: one
  node and one rank per node unless asked otherwise), so that no task can reach Parsl's
  node scheduler without a node count (which would hang it);
- a task that asks for more nodes than a block has (``nodes_per_block`` of the
  provider) is refused when it is submitted, with ``task.resources_exceed_block``: Parsl
  would keep it waiting for ever;
- Parsl finds a block's nodes through Slurm or PBS; a ``LocalProvider`` block (one
  machine) is given a PBS-style node file naming ``localhost``, so that MPI tasks run as
  local processes there.

It deliberately keeps the rest of ``ParslEngine`` (scaling, lost blocks, walltime).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs

from mepcore.errors import TaskError
from mepcore.tasks.engine import ExecutorLimits, Job
from mepcore.tasks.parsl_build import _ENGINE_KEYS, _invalid
from mepcore.tasks.parsl_engine import ParslEngine, _format_literal
from mepcore.tasks.resources import ResourceSpecification, resource_specification

__all__ = ["MPI_ENGINE_KEYS", "MPI_LAUNCHERS", "ParslMPIEngine"]

MPI_LAUNCHERS = ("mpiexec", "srun", "aprun")
# MPIExecutor's own options an endpoint config may set (its workers take no cores or
# memory share: one worker runs one MPI application at a time).
_MPI_OPTIONS = frozenset(
    {
        "max_workers_per_block",
        "mpi_launcher",
        "address",
        "worker_port_range",
        "interchange_port_range",
        "heartbeat_period",
        "heartbeat_threshold",
        "poll_period",
        "prefetch_capacity",
        "encrypted",
        "worker_debug",
        "drain_period",
    }
)
_GENERAL = frozenset(
    {"type", "provider", "run_dir", "strategy", "max_idletime", "job_status_kwargs"}
    | {"max_retries_on_system_failure"}
)
MPI_ENGINE_KEYS = _MPI_OPTIONS | _GENERAL
assert _GENERAL <= _ENGINE_KEYS


def _with_simple_launcher(provider: Any) -> dict[str, Any]:
    if not isinstance(provider, Mapping):
        raise _invalid("$.engine.provider", "must be a mapping")
    out = dict(provider)
    launcher = out.setdefault("launcher", {"type": "SimpleLauncher"})
    if not isinstance(launcher, Mapping) or launcher.get("type") != "SimpleLauncher":
        raise _invalid(
            "$.engine.provider.launcher",
            "GlobusMPIEngine runs its workers with SimpleLauncher (the MPI launcher is"
            " mpi_launcher's)",
        )
    return out


@attrs.define
class ParslMPIEngine(ParslEngine):
    """``ParslEngine`` in Parsl's MPI mode; see the module docstring."""

    KEYS: ClassVar[frozenset[str]] = MPI_ENGINE_KEYS
    OPTION_KEYS: ClassVar[frozenset[str]] = _MPI_OPTIONS
    MPI: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any], limits: ExecutorLimits) -> ParslMPIEngine:
        launcher = config.get("mpi_launcher", "mpiexec")
        if launcher not in MPI_LAUNCHERS:
            raise _invalid("$.engine.mpi_launcher", f"must be one of {', '.join(MPI_LAUNCHERS)}")
        workers = config.get("max_workers_per_block", 1)
        if type(workers) is not int or not 1 <= workers <= 4096:
            raise _invalid("$.engine.max_workers_per_block", "must be an integer from 1 to 4096")
        provider = _with_simple_launcher(config.get("provider", {"type": "LocalProvider"}))
        engine = super().from_config({**config, "provider": provider}, limits)
        assert isinstance(engine, ParslMPIEngine)
        return engine

    @property
    def nodes_per_block(self) -> int:
        nodes = getattr(self.provider, "nodes_per_block", 1)
        return nodes if isinstance(nodes, int) and nodes > 0 else 1

    def submit(self, jobs: Sequence[Job]) -> None:
        accepted = []
        for job in jobs:
            try:
                self._checked(job).within(self.nodes_per_block)
            except TaskError as exc:
                job.fail(exc.reason, exc.detail or exc.public_message)
                continue
            accepted.append(job)
        if accepted:
            super().submit(accepted)

    def _checked(self, job: Job) -> ResourceSpecification:
        spec = resource_specification(job.task.resource_specification)
        return (spec or ResourceSpecification()).complete()

    def _resources(self, job: Job) -> dict[str, Any]:
        return self._checked(job).to_dict()

    def _launch_command(self, template: str, watch: str | None) -> str:
        command = super()._launch_command(template, watch)
        if watch is None or self.run_directory is None:
            return command  # a batch job: Parsl asks Slurm or PBS for its nodes
        nodefile = os.path.join(self.run_directory, "nodefile")
        with open(nodefile, "w") as fh:
            fh.write("localhost\n")
        return f"PBS_NODEFILE={_format_literal(shlex.quote(nodefile))} {command}"
