"""``mepd functions list``: an administrator learns the ids of registered functions.

The listing comes from the running daemon over its admin socket (the command never
opens the task store): a real ``mepd serve`` in a directory the file-trust check
accepts, functions registered over HTTP as a client would, then the command.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mepd.commands.functions import format_table
from mepd.daemon import admin_request
from mepd.store import TaskStore
from tests.daemon_harness import RunningDaemon, running_daemon, write_deployment
from tests.trusted_dir import make_trusted, trusted_directory

REPO = Path(__file__).resolve().parents[1]


def mepd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=str(REPO),
    )


def test_the_store_lists_newest_first_by_name_and_bounded(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "tasks.sqlite3")
    try:
        for i, name in enumerate(["simulate", "analyse", None, "simulate_many"]):
            fid = hashlib.sha256(bytes([i])).hexdigest()
            store.put_function(fid, bytes([i]), name, None, 1000.0 + i)
        listed = store.list_functions()
        assert [f.name for f in listed] == ["simulate_many", None, "analyse", "simulate"]
        assert listed[0].registered == 1003.0
        assert listed[0].function_id == hashlib.sha256(bytes([3])).hexdigest()
        assert [f.name for f in store.list_functions(name="simul")] == [
            "simulate_many",
            "simulate",
        ]
        assert len(store.list_functions(limit=2)) == 2
        assert store.list_functions(name="%") == []  # a name is text, not a pattern
    finally:
        store.close()


def test_the_table_has_one_line_per_function() -> None:
    text = format_table(
        [
            {"function_id": "a" * 64, "name": "simulate", "registered": 1714564803.5},
            {"function_id": "b" * 64, "name": None, "registered": 0.0},
        ]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["FUNCTION", "ID", "REGISTERED", "NAME"]
    assert lines[1].split() == ["a" * 64, "2024-05-01T12:00:03Z", "simulate"]
    assert lines[2].split() == ["b" * 64, "1970-01-01T00:00:00Z", "-"]


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    with trusted_directory("mept-functions-") as top:
        config = write_deployment(top / "site", python=sys.executable)
        make_trusted(top)
        with running_daemon(config, top / "site" / "state") as running:
            yield running


def register(daemon: RunningDaemon, body: bytes, name: str | None) -> str:
    payload = {"function": base64.b64encode(body).decode()}
    if name is not None:
        payload["name"] = name
    with daemon.client(daemon.token("someone@example.org")) as client:
        r = client.post("/v1/functions", json=payload)
    assert r.status_code == 200, r.text
    function_id: str = r.json()["function_id"]
    assert function_id == hashlib.sha256(body).hexdigest()  # as docs/api.md says
    return function_id


@pytest.mark.root
def test_functions_list_shows_what_was_registered(daemon: RunningDaemon) -> None:
    first = register(daemon, b"first function", "simulate")
    second = register(daemon, b"second function", "analyse")
    out = mepd("functions", "list", "--config", str(daemon.config))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("FUNCTION ID")
    shown = {line.split()[0]: line.split() for line in lines[1:]}
    assert shown[first][2] == "simulate" and shown[second][2] == "analyse"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown[first][1])

    out = mepd("functions", "list", "--state-dir", str(daemon.state_dir), "--name", "ana", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [f["function_id"] for f in listed] == [second]
    assert listed[0]["name"] == "analyse" and isinstance(listed[0]["registered"], float)

    out = mepd("functions", "list", "--config", str(daemon.config), "--limit", "1", "--json")
    assert len(json.loads(out.stdout)) == 1


@pytest.mark.root
def test_the_daemon_refuses_a_bad_listing_request(daemon: RunningDaemon) -> None:
    for request in ({"limit": 0}, {"limit": "10"}, {"limit": 10_001}, {"name": 3}):
        answer = admin_request(daemon.state_dir, {"command": "functions", **request})
        assert answer["ok"] is False, request
    out = mepd("functions", "list", "--state-dir", str(daemon.state_dir), "--limit", "0")
    assert out.returncode == 2
    assert "the daemon refused: limit must be" in out.stderr


def test_without_a_daemon_the_command_says_so(tmp_path: Path) -> None:
    out = mepd("functions", "list", "--state-dir", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.startswith("mepd functions: cannot reach the daemon")
    assert mepd("functions").returncode == 2
