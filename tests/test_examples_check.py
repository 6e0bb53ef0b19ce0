"""Every directory under examples/ passes ``mepd check``, as an administrator would run it.

The examples and the shipped policies are copied to a directory the file-trust check
accepts (owned by the running account, 0755 directories and 0644 files, not under the
shared /tmp) and each example is checked there with settings that use it as documented:

- ``daemon``: its ``mepd.yaml`` as it is (state and audit log moved into the copy);
- ``demo``: ``settings.yaml.in`` and ``mapping.json.in`` filled in as demo.py does;
- ``identity``: each mapping document as an endpoint's ``mapping``;
- ``templates/<name>``: the template, schema and environment as an endpoint's.

A directory added under examples/ fails ``test_every_example_directory_is_checked``
until it is given a way to be checked here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.trusted_dir import make_trusted, trusted_directory

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def copy() -> Iterator[Path]:
    """A trusted copy of examples/ and policies/ (the examples name ../../policies)."""
    with trusted_directory("mept-examples-") as top:
        shutil.copytree(EXAMPLES, top / "examples")
        shutil.copytree(REPO / "policies", top / "policies")
        make_trusted(top)
        yield top


def check(settings: dict[str, Any], where: Path) -> subprocess.CompletedProcess[str]:
    """``mepd check`` of ``settings`` written to ``where/mepd-check.yaml``."""
    where.mkdir(mode=0o755, exist_ok=True)
    settings = {**settings, "state_dir": str(where / "state")}
    settings["audit_log"] = str(where / "state" / "audit.jsonl")
    path = where / "mepd-check.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    path.chmod(0o644)
    return subprocess.run(
        [sys.executable, "-m", "mepd", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=str(where),
    )


def endpoint(name: str, top: Path, **files: Any) -> dict[str, Any]:
    """An endpoint on the daemon example's files, with ``files`` instead."""
    daemon = top / "examples" / "daemon"
    return {
        "name": name,
        "template": str(daemon / "templates" / "user_config_template.yaml.j2"),
        "schema": str(daemon / "templates" / "user_config_schema.json"),
        "environment": str(daemon / "templates" / "user_environment.yaml"),
        "mapping": str(daemon / "mapping.json"),
        "policy_model": str(top / "policies" / "model.conf"),
        "policy": [str(top / "policies" / "base.csv"), str(daemon / "policy.csv")],
        **files,
    }


def daemon_settings(top: Path) -> dict[str, Any]:
    folder = top / "examples" / "daemon"
    data: dict[str, Any] = yaml.safe_load((folder / "mepd.yaml").read_text())
    # Relative paths are relative to the settings file, which moves: make them absolute.
    for ep in data["endpoints"]:
        for key, value in ep.items():
            if key in ("name", "template_name", "allowed_functions"):
                continue
            ep[key] = (
                [str(folder / v) for v in value] if isinstance(value, list) else str(folder / value)
            )
    return data


def demo_settings(top: Path) -> dict[str, Any]:
    folder = top / "examples" / "demo"
    work = top / "demo-work"
    work.mkdir(mode=0o755, exist_ok=True)
    mapping = (folder / "mapping.json.in").read_text()
    for key, value in {"ALICE_ACCOUNT": "mepdemo1", "BOB_ACCOUNT": "mepdemo2"}.items():
        mapping = mapping.replace(f"@{key}@", value)
    (work / "mapping.json").write_text(mapping)
    (work / "mapping.json").chmod(0o644)
    ids = subprocess.run(
        [sys.executable, str(folder / "run.py"), "--function-ids"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    text = (folder / "settings.yaml.in").read_text()
    values = {
        "STATE_DIR": str(work / "state"),
        "PYTHON": sys.executable,
        "DEMO_DIR": str(folder),
        "WORK_DIR": str(work),
        "REPO": str(top),
        "ALLOWED_FUNCTIONS": ids,
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    assert not re.search(r"@[A-Z_]+@", text), text
    settings: dict[str, Any] = yaml.safe_load(text)
    return settings


def identity_settings(top: Path) -> dict[str, Any]:
    folder = top / "examples" / "identity"
    documents = sorted(p for p in folder.glob("*.json") if p.name != "identities.json")
    assert documents
    return {"endpoints": [endpoint(p.stem, top, mapping=str(p)) for p in documents]}


def template_settings(name: str) -> Callable[[Path], dict[str, Any]]:
    def build(top: Path) -> dict[str, Any]:
        folder = top / "examples" / "templates" / name
        files = {
            "template": str(folder / "user_config_template.yaml.j2"),
            "schema": str(folder / "user_config_schema.json"),
            "environment": str(folder / "user_environment.yaml"),
            "template_name": name,
        }
        return {"endpoints": [endpoint(name, top, **files)]}

    return build


# Each example directory (with its sub-directories) and the settings that use it.
EXAMPLE_SETTINGS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "daemon": daemon_settings,
    "demo": demo_settings,
    "identity": identity_settings,
    "templates/gpu": template_settings("gpu"),
    "templates/local": template_settings("local"),
    "templates/slurm": template_settings("slurm"),
}


def test_every_example_directory_is_checked() -> None:
    holding_files = {
        str(p.parent.relative_to(EXAMPLES))
        for p in EXAMPLES.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    covered = {
        d for d in holding_files if any(d == e or d.startswith(e + "/") for e in EXAMPLE_SETTINGS)
    }
    assert covered == holding_files, f"not checked: {sorted(holding_files - covered)}"


@pytest.mark.parametrize("example", sorted(EXAMPLE_SETTINGS))
def test_the_example_passes_mepd_check(copy: Path, example: str) -> None:
    settings = EXAMPLE_SETTINGS[example](copy)
    out = check(settings, copy / ("check-" + example.replace("/", "-")))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("mepd check: ") and "is valid" in out.stdout


def test_a_refused_environment_variable_fails_the_check(copy: Path) -> None:
    """The check these examples pass is the one that refused PYTHONUNBUFFERED."""
    where = copy / "check-refused"
    where.mkdir(mode=0o755)
    environment = where / "user_environment.yaml"
    environment.write_text('PYTHONUNBUFFERED: "1"\n')
    environment.chmod(0o644)
    out = check({"endpoints": [endpoint("x", copy, environment=str(environment))]}, where)
    assert out.returncode == 2
    assert "PYTHONUNBUFFERED" in out.stderr


def test_the_local_template_schema_accepts_function_ids() -> None:
    """``allowed_functions`` in the local example's variables are sha256 hex function ids
    (what POST /v1/functions answers and ``mepd functions list`` shows), not UUIDs."""
    import jsonschema

    schema = json.loads((EXAMPLES / "templates" / "local" / "user_config_schema.json").read_text())
    function_id = "7f15325032eb6715e66e9bce26a90287ea2bbf8f8acc8840fa76fccd14f7d2df"
    jsonschema.validate({"allowed_functions": [function_id]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"allowed_functions": ["0b8e6f9a-6b1e-4c8f-9f55-1a2b3c4d5e6f"]}, schema)
