"""Version-safe functions: a function from a client on another Python minor version runs
by source (``serializer="source"``) or is refused before it runs with the reason
``task.version_mismatch`` naming both versions — never a worker crash.

Unit tests use the executor in this process with a client version set by hand; the end
to end test runs a real Python 3.12 client (a session fixture finds one: ``uv python
find``/``install`` or an interpreter on this machine, else the test is skipped with the
reason) against a real ``mepd`` whose user endpoints run Debian's Python 3.11."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.client.errors import SerializationError
from mepcore.client.serialize import pack_function as client_pack_function
from mepcore.client.service import user_runtime
from mepcore.tasks import Executor, TaskEnvelope, pack_args, unpack_result, unpack_value
from mepcore.tasks.serialization import pack_function
from mepd.uep.server import client_python
from tests.daemon_harness import RunningDaemon, daemon_with_accounts

REPO = Path(__file__).resolve().parents[1]
HERE = sys.version_info[:2]
OTHER = (HERE[0], HERE[1] + 1)

SOURCE = '''
import functools

def tagged(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        return fn(*a, **k)
    return wrapper

@tagged
def where(x):
    """Runs on the endpoint; imports what it uses."""
    import sys
    return (x * 2, list(sys.version_info[:2]))

def outer():
    y = 3
    def inner():
        return y
    return inner
'''


@pytest.fixture(scope="module")
def functions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # A real module file, so inspect finds the source (as in a user's script).
    path = tmp_path_factory.mktemp("src") / "user_script.py"
    path.write_text(SOURCE)
    namespace: dict[str, Any] = {"__name__": "user_script"}
    exec(compile(SOURCE, str(path), "exec"), namespace)
    return namespace


def test_the_client_sends_its_python_and_dill_versions_as_globus_compute_fields() -> None:
    runtime = user_runtime()
    assert runtime["python"]["version_tuple"][:2] == list(HERE)
    assert runtime["python_version"] == sys.version
    assert runtime["dill_version"]
    assert client_python(runtime) == HERE
    for bad in (None, {}, {"python": {"version_tuple": ["3", "12"]}}, {"python": "3.12"}):
        assert client_python(bad) is None


def test_source_travels_without_decorators_and_both_sides_write_the_same_bytes(
    functions: dict[str, Any],
) -> None:
    fid, payload = client_pack_function(functions["where"], "source")
    assert payload.startswith(b"source.v1\n")
    document = json.loads(payload.split(b"\n", 1)[1])
    assert document["name"] == "where"
    assert document["source"].startswith("def where(x):")
    assert (fid, payload) == pack_function(functions["where"], "source.v1")
    loaded = unpack_value(payload)
    assert loaded(21) == (42, list(HERE))


def test_what_cannot_travel_as_source_is_refused_with_the_reason(
    functions: dict[str, Any],
) -> None:
    for fn, words in (
        (lambda x: x, "lambda"),
        (functions["outer"](), "enclosing function (y)"),
        (len, "only a function defined with def"),
    ):
        with pytest.raises(SerializationError) as refused:
            client_pack_function(fn, "source")
        assert refused.value.reason == "task.serialization_failed"
        assert words in str(refused.value)
    with pytest.raises(SerializationError):
        client_pack_function(functions["where"], "marshal")


def _run(executor: Executor, payload: bytes, fid: str) -> Any:
    executor.register_function(fid, payload)
    task = TaskEnvelope("t-1", fid, pack_args((5,), {}))
    return executor.submit(task).result(60)


def test_bytecode_from_another_python_is_refused_before_it_runs_and_source_runs(
    functions: dict[str, Any],
) -> None:
    engine = {"type": "ProcessPoolEngine", "max_workers": 1}
    with Executor.from_engine_config(engine, client_python=OTHER) as executor:
        fid, payload = pack_function(functions["where"])
        result = _run(executor, payload, fid)
        assert result.status == "failed"
        assert result.error.reason == "task.version_mismatch"
        theirs, ours = ".".join(map(str, OTHER)), ".".join(map(str, HERE))
        assert f"Python {theirs}" in result.error.message
        assert f"Python {ours}" in result.error.message
        assert 'serializer="source"' in result.error.message
        fid, payload = pack_function(functions["where"], "source.v1")
        assert unpack_result(_run(executor, payload, fid)) == (10, list(HERE))
    # The same bytecode from a client on this Python runs.
    with Executor.from_engine_config(engine, client_python=HERE) as executor:
        fid, payload = pack_function(functions["where"])
        assert unpack_result(_run(executor, payload, fid)) == (10, list(HERE))


# -- end to end: a Python 3.12 client, Debian's Python 3.11 endpoint ----------------------

CLIENT_DIR = Path("/var/lib/mep-test/client-py312")
PYTHON_DIR = Path("/var/lib/mep-test/python")


def _uv() -> str | None:
    found = shutil.which("uv") or str(REPO / ".venv" / "bin" / "uv")
    return found if os.path.exists(found) else None


def _is_312(candidate: str) -> bool:
    try:
        run = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return False
    return run.stdout.strip() == "True"


def _find_python312() -> tuple[str | None, str]:
    """A CPython 3.12: uv's (found, else installed into a world-readable directory),
    else one on this machine; (None, why) when there is none."""
    uv = _uv()
    env = {**os.environ, "UV_PYTHON_INSTALL_DIR": str(PYTHON_DIR)}
    tried = []
    local = [
        *sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12")),
        shutil.which("python3.12") or "",
    ]
    for candidate in local:
        if candidate and _is_312(candidate):
            return candidate, ""
    if uv is None:
        return None, "no python3.12 on this machine and uv is not installed"
    for args in (["python", "find", "3.12"], ["python", "install", "3.12"]):
        run = subprocess.run(
            [uv, *args], capture_output=True, text=True, env=env, timeout=600, check=False
        )
        found = subprocess.run(
            [uv, "python", "find", "3.12"], capture_output=True, text=True, env=env, check=False
        )
        if found.returncode == 0 and _is_312(found.stdout.strip()):
            return found.stdout.strip(), ""
        tried.append(f"uv {' '.join(args)}: {(run.stderr or run.stdout).strip()[-300:]}")
    return None, "no python3.12 on this machine; " + "; ".join(tried)


@pytest.fixture(scope="session")
def python312() -> str:
    """A venv of Python 3.12 with the client's dependencies (the client itself comes
    from this checkout's src/ through PYTHONPATH), cached by their digest."""
    interpreter, why = _find_python312()
    if interpreter is None:
        pytest.skip(f"no Python 3.12 to run a client on: {why}")
    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    digest = hashlib.sha256(json.dumps([interpreter, requirements]).encode()).hexdigest()[:16]
    venv = CLIENT_DIR / digest
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *requirements], check=True, timeout=900
        )
        (venv / ".complete").touch()
    version = subprocess.run(
        [str(python), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == "(3, 12)", version
    return str(python)


CLIENT_SCRIPT = """
import json, sys
from mepcore.client import Executor

def where(x):
    import sys
    return (x * 2, list(sys.version_info[:2]))

out = {"client": list(sys.version_info[:2])}
for serializer in ("dill", "source"):
    with Executor("hpc", serializer=serializer) as ex:
        try:
            out[serializer] = {"value": ex.submit(where, 21).result(120)}
        except Exception as exc:
            out[serializer] = {"reason": getattr(exc, "reason", None), "message": str(exc)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningDaemon, Any]]:
    top = tmp_path_factory.mktemp("versions") / "site"
    with daemon_with_accounts(top) as (daemon, accounts):
        yield daemon, accounts[0]


@pytest.mark.root
@pytest.mark.slow
def test_a_312_client_on_a_311_endpoint_runs_by_source_or_is_refused_with_both_versions(
    python312: str, deployment: tuple[RunningDaemon, Any], tmp_path: Path
) -> None:
    daemon, account = deployment
    endpoint_python = subprocess.run(
        [daemon_python(daemon), "-c", "import sys; print(list(sys.version_info[:2]))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert endpoint_python == "[3, 11]", endpoint_python
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(CLIENT_SCRIPT))
    run = subprocess.run(
        [python312, str(script)],
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO / "src"),
            "MEP_URL": daemon.url,
            "MEP_TOKEN": daemon.token(f"{account.pw_name}@example.org"),
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["client"] == [3, 12]
    # By source: it runs, on the endpoint's Python.
    assert out["source"] == {"value": [42, [3, 11]]}
    # As bytecode: refused before it runs, naming both versions (no worker lost).
    refused = out["dill"]
    assert refused["reason"] == "task.version_mismatch", refused
    assert "Python 3.12" in refused["message"] and "Python 3.11" in refused["message"]
    # Nothing the endpoint ran was lost: the audit log says how each task ended.
    finished = [
        json.loads(line)
        for line in (daemon.state_dir / "audit.jsonl").read_text().splitlines()
        if '"task.finished"' in line
    ]
    assert sorted(e["reason"] or "ok" for e in finished) == ["ok", "task.version_mismatch"]


def daemon_python(daemon: RunningDaemon) -> str:
    import yaml

    return str(yaml.safe_load(Path(daemon.config).read_text())["python"])
