"""``mepd render`` as a subprocess, and the shipped example templates."""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mepcore.config import (
    MappedIdentity,
    SiteFiles,
    config_key,
    parse_endpoint_config,
    render_endpoint_config,
    validate_variables,
)
from mepcore.types import Account

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "templates"


def mepd_render(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepd", "render", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def example_args(name: str) -> list[str | Path]:
    folder = EXAMPLES / name
    return [
        "--template",
        folder / "user_config_template.yaml.j2",
        "--schema",
        folder / "user_config_schema.json",
        "--environment",
        folder / "user_environment.yaml",
        "--user-config",
        f"@{folder / 'sample_variables.json'}",
    ]


def test_local_example_renders() -> None:
    result = mepd_render(*example_args("local"))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == {
        "display_name": "my laptop-sized pool",
        "engine": {"type": "ProcessPoolEngine", "max_workers": 4},
        "idle_heartbeats_soft": 10,
        "idle_heartbeats_hard": 5760,
    }


def test_slurm_example_renders_with_its_include() -> None:
    result = mepd_render(*example_args("slurm"), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    config = out["config"]
    assert config["engine"] == {
        "type": "GlobusComputeEngine",
        "max_workers_per_node": 4,
        "strategy": "simple",
        "max_idletime": 300,
        "heartbeat_threshold": 30,
        "provider": {
            "type": "SlurmProvider",
            "partition": "compute",
            "account": "proj_climate",
            "walltime": "02:00:00",
            "nodes_per_block": 2,
            "init_blocks": 0,
            "min_blocks": 0,
            "max_blocks": 1,
            "exclusive": False,
            "worker_init": "module load python/3.11\nsource ~/venvs/compute/bin/activate",
            "launcher": {"type": "SrunLauncher"},
        },
    }
    assert config["idle_heartbeats_soft"] == 20  # from common_heartbeats.yaml.j2
    assert config["heartbeat_period"] == 30.0
    # the key is the documented hash of account, template digest and variables
    site = SiteFiles.from_files(EXAMPLES / "slurm" / "user_config_template.yaml.j2")
    variables = json.loads((EXAMPLES / "slurm" / "sample_variables.json").read_text())
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    assert out["config_key"] == config_key(me, site.template_digest, variables)


def test_slurm_schema_refuses_unknown_and_bad_variables_with_every_path() -> None:
    folder = EXAMPLES / "slurm"
    result = mepd_render(
        "--template",
        folder / "user_config_template.yaml.j2",
        "--schema",
        folder / "user_config_schema.json",
        "--user-config",
        json.dumps({"partition": "gpu", "nodes": 100, "qos": "high", "_GC": 1}),
    )
    assert result.returncode == 1
    assert "config.reserved_variable" in result.stderr
    for path in ("$._GC", "$.partition", "$.nodes", "$.qos"):
        assert f"  {path}" in result.stderr, result.stderr


def _gpu(groups: tuple[str, ...], variables: dict[str, Any]) -> dict[str, Any]:
    site = SiteFiles.from_files(EXAMPLES / "gpu" / "user_config_template.yaml.j2")
    account = Account("carol", 1003, 1003, "/home/carol", "/bin/sh", (1003,), groups)
    config = render_endpoint_config(
        site.template_text,
        validate_variables(variables, None),
        mapped=MappedIdentity(account),
        includes=site.includes,
    )
    return config.engine.to_dict()


def test_gpu_example_offers_the_gpu_partition_to_group_members_only() -> None:
    member = _gpu(("carol", "gpu-users"), {"account": "proj_ml", "gpus": 2})
    assert member["provider"]["partition"] == "gpu"
    assert member["provider"]["scheduler_options"] == "#SBATCH --gres=gpu:2"
    assert member["available_accelerators"] == 2
    outsider = _gpu(("carol", "users"), {"account": "proj_ml", "gpus": 2})
    assert outsider["provider"]["partition"] == "cpu"
    assert "scheduler_options" not in outsider["provider"]
    # a user cannot claim the group through a look-alike name
    lookalike = _gpu(("carol", '"gpu-users"', "gpu-users2"), {"account": "proj_ml", "gpus": 2})
    assert lookalike["provider"]["partition"] == "cpu"


def test_gpu_example_renders_under_mepd_render_for_the_current_user() -> None:
    result = mepd_render(*example_args("gpu"), "--json")
    assert result.returncode == 0, result.stderr
    provider = json.loads(result.stdout)["config"]["engine"]["provider"]
    my_groups = {grp.getgrgid(g).gr_name for g in os.getgroups()} | {
        grp.getgrgid(os.getgid()).gr_name
    }
    assert provider["partition"] == ("gpu" if "gpu-users" in my_groups else "cpu")


@pytest.mark.root
def test_gpu_example_with_a_real_member_account(make_account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.accounts import create_group, delete_group

    group = create_group()
    try:
        entry = make_account(groups=[group])
        template = (EXAMPLES / "gpu" / "user_config_template.yaml.j2").read_text()
        path = tmp_path / "user_config_template.yaml.j2"
        path.write_text(template.replace("gpu-users", group))
        variables = '{"account": "proj", "gpus": 1}'
        member = mepd_render(
            "--template", path, "--user", entry.pw_name, "--user-config", variables, "--json"
        )
        assert member.returncode == 0, member.stderr
        assert json.loads(member.stdout)["config"]["engine"]["provider"]["partition"] == "gpu"
        other = make_account()
        outsider = mepd_render(
            "--template", path, "--user", other.pw_name, "--user-config", variables, "--json"
        )
        assert outsider.returncode == 0, outsider.stderr
        assert json.loads(outsider.stdout)["config"]["engine"]["provider"]["partition"] == "cpu"
    finally:
        delete_group(group)


def test_mapped_identity_and_user_runtime_files(tmp_path: Path) -> None:
    template = tmp_path / "t.yaml.j2"
    template.write_text(
        "display_name: {{ _GC.mapped_identity.id }}\n"
        "endpoint_setup: {{ _GC.user_runtime.python_version }}\n"
    )
    identity = tmp_path / "id.json"
    identity.write_text(json.dumps({"id": "abc-123", "username": "u@example.org"}))
    runtime = tmp_path / "rt.json"
    runtime.write_text(json.dumps({"python_version": "3.12.1"}))
    result = mepd_render(
        "--template", template, "--mapped-identity", identity, "--user-runtime", runtime
    )
    assert result.returncode == 0, result.stderr
    config = parse_endpoint_config(result.stdout)
    assert config.display_name == "abc-123"
    assert config.endpoint_setup == "3.12.1"


def test_render_failures_exit_1_with_reason(tmp_path: Path) -> None:
    template = tmp_path / "t.yaml.j2"
    template.write_text("engine: {type: ThreadPoolEngine}\nbogus: {{ x }}\nhigh_assurance: true\n")
    result = mepd_render("--template", template, "--user-config", '{"x": 1}')
    assert result.returncode == 1
    assert "config.endpoint_config_invalid" in result.stderr
    assert "  $.bogus: unknown key" in result.stderr
    assert "  $.high_assurance:" in result.stderr
    template.write_text("{{ ''.__class__.__mro__ }}")
    result = mepd_render("--template", template)
    assert result.returncode == 1
    assert "config.sandbox_violation" in result.stderr
    template.write_text("{{ nope }}")
    result = mepd_render("--template", template)
    assert (result.returncode, "config.undefined_variable" in result.stderr) == (1, True)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--template"],
        ["--template", "/nonexistent/t.j2"],
        ["--template", "{template}", "--user-config", "{not json"],
        ["--template", "{template}", "--user-config", "@/nonexistent.json"],
        ["--template", "{template}", "--user", "no-such-user-mep"],
        ["--template", "{template}", "--schema", "{template}"],
        ["--template", "{template}", "--bogus-flag"],
    ],
)
def test_usage_and_input_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    template = tmp_path / "t.yaml.j2"
    template.write_text("engine: {type: ThreadPoolEngine}\n")
    result = mepd_render(*(a.replace("{template}", str(template)) for a in args))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr
