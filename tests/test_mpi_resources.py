"""What an MPI task asks for (``ResourceSpecification``), the administrator's caps on it
(``ResourceLimits``), and the ``GlobusMPIEngine`` configuration checks; pure, no MPI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mepcore.config import parse_endpoint_config
from mepcore.errors import ConfigError, TaskError
from mepcore.tasks import (
    ExecutorLimits,
    ResourceLimits,
    ResourceSpecification,
    TaskEnvelope,
    build_engine,
    resource_specification,
)


@pytest.mark.parametrize(
    ("asked", "nodes", "per_node", "ranks"),
    [
        ({}, 1, 1, 1),
        ({"num_ranks": 4}, 1, 4, 4),
        ({"num_nodes": 2}, 2, 1, 2),
        ({"num_nodes": 2, "ranks_per_node": 3}, 2, 3, 6),
        ({"num_nodes": 2, "num_ranks": 5}, 2, 3, 5),
        ({"num_nodes": 3, "ranks_per_node": 2, "num_ranks": 5}, 3, 2, 5),
    ],
)
def test_a_specification_is_completed_for_the_launcher(
    asked: dict[str, int], nodes: int, per_node: int, ranks: int
) -> None:
    done = ResourceSpecification.from_mapping(asked).complete()
    assert (done.num_nodes, done.ranks_per_node, done.num_ranks) == (nodes, per_node, ranks)


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ([], "must be an object"),
        ({"gpus": 1}, "unknown keys ['gpus']"),
        ({"num_ranks": 0}, "num_ranks must be an integer"),
        ({"num_ranks": True}, "num_ranks must be an integer"),
        ({"num_nodes": "2"}, "num_nodes must be an integer"),
        ({"launcher_options": "--bind\nrm -rf"}, "launcher_options must be one line"),
        ({"launcher_options": 3}, "launcher_options must be one line"),
        ({"num_nodes": 1, "ranks_per_node": 2, "num_ranks": 3}, "does not fit"),
    ],
)
def test_a_bad_specification_is_refused_with_a_reason(asked: Any, message: str) -> None:
    with pytest.raises(TaskError) as caught:
        ResourceSpecification.from_mapping(asked)
    assert caught.value.reason == "task.resources_invalid"
    assert message in caught.value.detail


def test_none_and_empty_ask_for_nothing() -> None:
    assert resource_specification(None) is None
    assert resource_specification({}) is None


def test_caps_apply_per_account() -> None:
    limits = ResourceLimits.from_mapping(
        {"num_nodes": 2, "num_ranks": 8, "accounts": {"big": {"num_ranks": 64}}}
    )
    limits.check(ResourceSpecification(num_ranks=8), "anyone")
    limits.check(ResourceSpecification(num_ranks=64, num_nodes=4), "big")  # no node cap there
    for spec, account in (
        (ResourceSpecification(num_ranks=9), "anyone"),
        (ResourceSpecification(num_nodes=3), "anyone"),
        (ResourceSpecification(num_nodes=2, ranks_per_node=5), "anyone"),
        (ResourceSpecification(num_ranks=65), "big"),
    ):
        with pytest.raises(TaskError) as caught:
            limits.check(spec, account)
        assert caught.value.reason == "task.resources_not_allowed"
    ResourceLimits.from_mapping(None).check(ResourceSpecification(num_ranks=100_000), "x")


def test_the_envelope_carries_the_specification_and_checks_it() -> None:
    fid = "0" * 64
    task = TaskEnvelope("t", fid, b"x", resource_specification={"num_ranks": 4})
    again = TaskEnvelope.from_header(task.to_header(), b"x")
    assert again.resource_specification == {"num_ranks": 4}
    assert "resource_specification" not in TaskEnvelope("t", fid, b"x").to_header()
    header = {**task.to_header(), "resource_specification": {"num_ranks": -1}}
    with pytest.raises(TaskError) as caught:
        TaskEnvelope.from_header(header, b"x")
    assert caught.value.reason == "task.envelope_invalid"


MPI_CONFIG = """
engine:
  type: GlobusMPIEngine
  mpi_launcher: {launcher}
  max_workers_per_block: 2
  provider:
    type: SlurmProvider
    nodes_per_block: 4
    launcher: {{type: {provider_launcher}}}
"""


def test_a_migrated_mpi_template_is_accepted_and_builds_its_engine() -> None:
    config = parse_endpoint_config(
        MPI_CONFIG.format(launcher="srun", provider_launcher="SimpleLauncher")
    )
    engine = build_engine(config.engine.to_dict(), ExecutorLimits())
    assert type(engine).__name__ == "ParslMPIEngine"
    assert engine.nodes_per_block == 4  # type: ignore[attr-defined]
    assert engine.options["mpi_launcher"] == "srun"  # type: ignore[attr-defined]


def _engine_of(text: str) -> dict[str, Any]:
    """The engine mapping, whether or not the schema already refuses it."""
    try:
        return parse_endpoint_config(text).engine.to_dict()
    except ConfigError:
        import yaml

        return dict(yaml.safe_load(text)["engine"])


@pytest.mark.parametrize(
    ("launcher", "provider_launcher", "where"),
    [
        ("mpirun", "SimpleLauncher", "$.engine.mpi_launcher"),
        ("srun", "SrunLauncher", "$.engine.provider.launcher"),
    ],
)
def test_mpi_engine_settings_that_cannot_work_are_refused(
    launcher: str, provider_launcher: str, where: str
) -> None:
    text = MPI_CONFIG.format(launcher=launcher, provider_launcher=provider_launcher)
    with pytest.raises(ConfigError) as caught:
        build_engine(_engine_of(text), ExecutorLimits())
    assert any(v.path.startswith(where) for v in caught.value.violations), caught.value


def test_cores_per_worker_is_not_an_mpi_engine_option() -> None:
    text = MPI_CONFIG.format(launcher="srun", provider_launcher="SimpleLauncher")
    with pytest.raises(ConfigError) as caught:
        parse_endpoint_config(text + "  cores_per_worker: 2\n")
    assert caught.value.reason == "config.endpoint_config_invalid"


def test_the_store_keeps_a_tasks_resources_for_sending_it_again(tmp_path: Path) -> None:
    from mepd.store import NewTask, TaskStore

    store = TaskStore.open(tmp_path / "db")
    spec = {"num_nodes": 2, "num_ranks": 8}
    store.add_tasks(
        [
            NewTask("mpi", "o", "hpc", "u", "s", "f" * 64, b"p", None, resources=spec),
            NewTask("plain", "o", "hpc", "u", "s", "f" * 64, b"p", None),
        ],
        state="dispatched",
        now=1.0,
    )
    sent = {p.task_id: p.resources for p in store.pending_payloads(["mpi", "plain"])}
    assert sent == {"mpi": spec, "plain": None}
    store.close()


def test_a_version_2_store_gains_the_resources_column(tmp_path: Path) -> None:
    import sqlite3

    from mepd.store import SCHEMA_VERSION, NewTask, TaskStore

    TaskStore.open(tmp_path / "db").close()
    with sqlite3.connect(tmp_path / "db") as db:  # the shape version 2 had
        db.execute("ALTER TABLE tasks DROP COLUMN resources")
        db.execute("PRAGMA user_version=2")
    store = TaskStore.open(tmp_path / "db")
    store.add_tasks(
        [NewTask("t", "o", "hpc", "u", "s", "f" * 64, b"p", None, resources={"num_ranks": 2})],
        state="dispatched",
        now=1.0,
    )
    assert store.pending_payloads(["t"])[0].resources == {"num_ranks": 2}
    store.close()
    with sqlite3.connect(tmp_path / "db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
