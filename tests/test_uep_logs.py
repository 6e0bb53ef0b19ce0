"""The endpoint log's parts without a daemon process: the file (rotation and its cap,
modes), the capture of a process's stdout/stderr (in a child process, so this one keeps
its own), ``endpoint_setup``'s output and status, the daemon-side reader, and ``mep
logs`` against the real HTTP API with a fake site.

End to end as root (a failing ``endpoint_setup`` shown to the caller and in ``mep logs``,
the file written as the user, a link to a root-only file): ``test_uep_logs_e2e.py``."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mepcore.client.cli import main
from mepcore.types import Account
from mepd.uep.log import BACKUPS, MAX_BYTES, EndpointLog, log_path, read_tail, run_logged_script
from mepd.userlog import read_log
from tests.test_client_fakes import fake_daemon


def test_the_log_lives_in_the_users_directory_private_and_capped(tmp_path: Path) -> None:
    log = EndpointLog.open(str(tmp_path), "hpc/../x y", "[pid 1 config abc]")
    assert log.path == log_path(str(tmp_path), "hpc/../x y")
    assert log.path == str(tmp_path / ".mep" / "endpoints" / "hpc_.._x_y" / "endpoint.log")
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(log.path)).st_mode) == 0o700
    line = "x" * 1000
    for _ in range(6 * MAX_BYTES // 1000):
        log.write("output", line)
    files = sorted(Path(log.path).parent.iterdir())
    assert [f.name for f in files] == ["endpoint.log"] + [
        f"endpoint.log.{i}" for i in range(1, BACKUPS + 1)
    ]
    assert all(f.stat().st_size <= MAX_BYTES + 2048 for f in files)
    last = log.tail(2)
    assert len(last) == 2 and last[-1].endswith(f"[pid 1 config abc] output: {line}")


def test_a_home_without_room_for_the_log_writes_nowhere_and_says_so(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    log = EndpointLog.open(str(blocked), "hpc", "[t]")
    log.write("started")  # nothing to write to: no error
    assert log.tail() == []


def test_setup_output_goes_to_the_log_and_its_last_lines_come_back(tmp_path: Path) -> None:
    log = EndpointLog.open(str(tmp_path), "hpc", "[t]")
    script = "for i in $(seq 1 30); do echo line $i; done; echo oops >&2; exit 4"
    status, last = run_logged_script(
        "endpoint_setup", script, timeout=30, cwd=str(tmp_path), log=log
    )
    assert status == 4
    assert last[-2:] == ["line 30", "oops"] and len(last) == 15
    text = Path(log.path).read_text()
    assert "[t] endpoint_setup: line 1\n" in text and "[t] endpoint_setup: oops" in text
    status, _ = run_logged_script("endpoint_setup", "sleep 30", timeout=0.5, cwd="/", log=None)
    assert status is None


def test_a_user_endpoints_stdout_and_stderr_and_its_childrens_reach_the_log(
    tmp_path: Path,
) -> None:
    program = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from mepd.uep.log import EndpointLog
        log = EndpointLog.open({str(tmp_path)!r}, "hpc", "[child]")
        log.capture_stdio()
        print("from print")
        sys.stderr.write("from stderr\\n")
        subprocess.run(["/bin/sh", "-c", "echo from a child"], check=True)
        log.release_stdio()
        """
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)
    text = Path(log_path(str(tmp_path), "hpc")).read_text()
    for words in ("from print", "from stderr", "from a child"):
        assert f"[child] output: {words}" in text


def test_read_tail_takes_whole_lines_from_the_end(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("".join(f"line {i}\n" for i in range(10_000)))
    assert read_tail(str(path), 3) == ["line 9997", "line 9998", "line 9999"]
    assert read_tail(str(path), 0) == []
    assert read_tail(str(tmp_path / "missing"), 3) == []


def test_the_daemon_reads_a_log_as_its_account(tmp_path: Path) -> None:
    me = Account(name="me", uid=os.getuid(), gid=os.getgid(), home=str(tmp_path), shell="/bin/sh")
    missing = asyncio.run(read_log(me, "hpc", 10))
    assert (missing.exists, missing.lines) == (False, [])
    log = EndpointLog.open(str(tmp_path), "hpc", "[t]")
    for i in range(20):
        log.write("output", f"line {i}")
    found = asyncio.run(read_log(me, "hpc", 5))
    assert found.exists and found.path == log.path
    assert [line.split("output: ")[1] for line in found.lines] == [
        f"line {i}" for i in range(15, 20)
    ]


def test_mep_logs_prints_the_callers_log_and_says_why_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_daemon(tmp_path) as daemon:
        environ = {"MEP_URL": daemon.url, "MEP_TOKEN": daemon.token()}
        assert main(["logs", "hpc"], environ) == 0
        assert "no endpoint log yet" in capsys.readouterr().err
        daemon.endpoints.logs["alice"] = ["first", "second", "third"]
        assert main(["logs", "hpc", "-n", "2"], environ) == 0
        # (the in-process daemon's own access log goes to stdout too)
        printed = capsys.readouterr().out.splitlines()
        assert [line for line in printed if "api.request_completed" not in line] == [
            "second",
            "third",
        ]
        assert main(["logs", "hpc", "-n", "0"], environ) == 1
        assert "api.bad_request" in capsys.readouterr().err
        assert main(["logs", "nowhere"], environ) == 1
        assert "api.endpoint_unknown" in capsys.readouterr().err
        bob = {"MEP_URL": daemon.url, "MEP_TOKEN": daemon.token("bob@example.org")}
        assert main(["logs", "hpc"], bob) == 0
        assert "third" not in capsys.readouterr().out
    assert main(["logs", "hpc"], {}) == 1
    assert "MEP_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([], {})
    assert usage.value.code == 2
