"""What a user endpoint imports before its first task: nothing heavy it does not need.

A start is mostly imports (docs/performance.md, "Where the time goes"), so each module
left out is time and memory saved for every user endpoint. A real ``UserEndpoint`` runs
in a fresh interpreter (``python -I``, as spawned) over a real socketpair; a driver
thread in that interpreter plays the daemon with the same frames mepd sends (start,
function, task, stop) and records ``sys.modules`` when ``ready`` arrives and again after
the first task's result. The driver itself imports only what the channel needs, and the
payloads are packed here, in the test process, so neither skews the record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mepcore.ports import SystemAccountDatabase
from mepcore.tasks import TaskEnvelope, pack_args, pack_function
from tests.daemon_harness import remote_function

# Not needed before the first task; each would cost every start time and memory.
# asyncio (and ssl with it) is the daemon's; dill loads the first function; structlog
# logs only rare engine events; jsonschema reports what is wrong with a configuration
# the quick check does not vouch for (mepcore.config.quickcheck), which a valid one is;
# the site files are the daemon's (mepcore.config.site); re-adoption, setup scripts and
# MPI resources are imported by the start that asks for them (mepd.uep.orphan,
# subprocess, mepcore.tasks.resources); the rest belong to the daemon, the client or Parsl.
HEAVY_BEFORE_FIRST_TASK = (
    "asyncio",
    "ssl",
    "dill",
    "structlog",
    "jsonschema",
    "referencing",
    "rich",
    "multiprocessing",
    "concurrent.futures.process",
    "email",
    "http.client",
    "urllib.request",
    "sqlite3",
    "parsl",
    "zmq",
    "psutil",
    "uvicorn",
    "starlette",
    "httpx",
    "casbin",
    "prometheus_client",
    "mepd.registry",
    "mepd.daemon",
    "mepd.api",
    "mepd.channel_async",
    "mepcore.config.site",
    "mepd.uep.orphan",
    "subprocess",
    "mepcore.tasks.resources",
)

DRIVER = r"""
import json, os, socket, sys, threading
from mepd.channel import BlockingChannel, batch_frames
from mepd.uep.server import UserEndpoint

spec = json.loads(sys.argv[1])
ours, theirs = socket.socketpair()
daemon = BlockingChannel(ours)
seen = {}


def expect(*kinds):
    while True:
        frame = daemon.recv(timeout=60)
        if frame is None:
            raise RuntimeError(f"no {kinds} frame from the user endpoint")
        if frame.kind in kinds:
            return frame


def drive():
    try:
        daemon.send("start", spec["start"])
        seen["ready"] = expect("ready", "error").header
        seen["at_ready"] = sorted(sys.modules)
        daemon.send(
            "function",
            {"items": [{"function_id": spec["function_id"]}]},
            [bytes.fromhex(spec["function"])],
        )
        task = (spec["task_header"], bytes.fromhex(spec["task_payload"]))
        for buffers in batch_frames("task", [task]):
            daemon.send_buffers(buffers)
        seen["result"] = expect("result").header
        seen["after_task"] = sorted(sys.modules)
    finally:
        daemon.send("stop", {"reason": "test"})


driver = threading.Thread(target=drive)
driver.start()
code = UserEndpoint(channel=BlockingChannel(theirs), channel_fd=theirs.fileno()).run()
driver.join(60)
with open(spec["out"], "w") as fh:
    json.dump({"code": code, **seen}, fh)
"""

TEMPLATE = """\
engine:
  type: {{ engine }}
  max_workers: 2
heartbeat_period: 30
idle_heartbeats_soft: 1000
idle_heartbeats_hard: 10000
"""


def start_fields(home: Path, engine: str) -> dict[str, Any]:
    account = SystemAccountDatabase().by_uid(os.getuid())
    assert account is not None
    return {
        "template_name": "user_config_template.yaml.j2",
        "template_text": TEMPLATE,
        "includes": {},
        "variables": {"engine": engine},
        "identity": None,
        "user_runtime": None,
        "account": {**account.to_dict(), "home": str(home)},
        "endpoint": "imports",
        "config_key": "imports",
        "setup_timeout": 10,
        "teardown_timeout": 10,
        "executor_limits": {},
    }


def run_endpoint(
    tmp_path: Path, engine: str, rendered: dict[str, Any] | None = None
) -> dict[str, Any]:
    function_id, body = pack_function(remote_function("def add(a, b):\n    return a + b\n", "add"))
    args = pack_args((1, 2), {})
    out = tmp_path / "seen.json"
    start = start_fields(tmp_path, engine)
    if rendered is not None:
        start["rendered"] = rendered
    spec = {
        "start": start,
        "function_id": function_id,
        "function": body.hex(),
        "task_header": TaskEnvelope("t1", function_id, args).to_header(),
        "task_payload": args.hex(),
        "out": str(out),
    }
    subprocess.run(
        [sys.executable, "-I", "-c", DRIVER, json.dumps(spec)],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        timeout=120,
        check=True,
    )
    seen: dict[str, Any] = json.loads(out.read_text())
    assert seen["code"] == 0
    assert seen["ready"]["engine"] == engine, seen["ready"]
    assert seen["result"]["items"][0]["status"] == "success", seen["result"]
    return seen


@pytest.mark.parametrize("engine", ["ProcessPoolEngine", "ThreadPoolEngine"])
def test_nothing_heavy_is_imported_before_the_first_task(tmp_path: Path, engine: str) -> None:
    seen = run_endpoint(tmp_path, engine)
    loaded = set(seen["at_ready"])
    heavy = [name for name in HEAVY_BEFORE_FIRST_TASK if name in loaded]
    assert heavy == [], f"imported by a {engine} user endpoint before its first task: {heavy}"


def test_the_record_sees_a_lazy_import(tmp_path: Path) -> None:
    # The thread engine loads the function in the endpoint's own process: dill arrives
    # with the first task, which shows the record would catch an import at start.
    seen = run_endpoint(tmp_path, "ThreadPoolEngine")
    assert "dill" not in seen["at_ready"]
    assert "dill" in seen["after_task"]


@pytest.mark.parametrize("package", ["mepcore.config", "mepcore.tasks"])
def test_lazy_packages_offer_every_public_name(package: str) -> None:
    # Names are imported on first use (so a user endpoint imports only what it uses);
    # every name in __all__ must still resolve, from the module that defines it.
    code = (
        "import importlib, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "module_of = {n: m for m, names in pkg._HOMES.items() for n in names}\n"
        "assert sorted(pkg.__all__) == sorted(module_of), 'map and __all__ differ'\n"
        "assert dir(pkg) == sorted(pkg.__all__)\n"
        "for name in pkg.__all__:\n"
        "    value = getattr(pkg, name)\n"
        "    home = pkg.__name__ + '.' + module_of[name]\n"
        "    assert getattr(sys.modules[home], name) is value, name\n"
        "try:\n"
        "    pkg.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('unknown names must raise AttributeError')\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, timeout=60)


def test_a_configuration_rendered_before_needs_neither_jinja2_nor_yaml(tmp_path: Path) -> None:
    # What the daemon hands back from its render cache (mepd.rendercache): the start
    # uses it as it is, and the ready frame does not report it again.
    first = run_endpoint(tmp_path, "ThreadPoolEngine")
    assert {"jinja2", "yaml"} <= set(first["at_ready"])
    rendered = first["ready"]["rendered"]
    assert rendered["engine"] == {"type": "ThreadPoolEngine", "max_workers": 2}
    again = run_endpoint(tmp_path, "ThreadPoolEngine", rendered={**rendered, "heartbeat_period": 7})
    assert "rendered" not in again["ready"]
    assert again["ready"]["heartbeat_period"] == 7  # the kept configuration, not the template
    assert [m for m in ("jinja2", "yaml") if m in again["at_ready"]] == []
