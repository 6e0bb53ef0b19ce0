"""systemd as sites run mepd (issue 21, item 5): the unit in packaging/ and sd_notify.

- ``systemd-analyze verify`` accepts the unit, and ``systemd-analyze security`` scores it
  at or below 3.0 with every remaining exposure explained in the unit's comments (run
  offline on the file: systemd need not be PID 1; skipped with the reason where
  systemd-analyze or its ``--offline`` is missing);
- the notification protocol (``mepd.notify``) on a real datagram socket, by path and by
  abstract name, with the watchdog settings systemd passes;
- a daemon started by hand as the unit starts it, from ``mepd init``'s files, with
  ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set: READY=1 once it serves, WATCHDOG=1 while it
  runs, RELOADING=1/READY=1 on SIGHUP, STOPPING=1 on SIGTERM, then a clean exit.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mepd.notify import Notifier
from tests.trusted_dir import trusted_directory

REPO = Path(__file__).resolve().parents[1]
# mepd init options: any free port, and the state directory (given last).
INIT_OPTIONS = ("--port", "0", "--state-dir")
UNIT = REPO / "packaging" / "mepd.service"
MAX_SCORE = 3.0


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


def _testable_unit(directory: Path) -> Path:
    """The unit with its programs pointing at this checkout's mepd (verify wants them)."""
    mepd = Path(sys.executable).parent / "mepd"
    text = UNIT.read_text().replace("/opt/mep/venv/bin/mepd", str(mepd))
    path = directory / "mepd.service"
    path.write_text(text)
    return path


def test_the_unit_verifies(tmp_path: Path) -> None:
    analyze = _analyze()
    done = subprocess.run(
        [analyze, "verify", str(_testable_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Messages about other units of this machine (not PID 1 here) are not ours.
    ours = [line for line in done.stderr.splitlines() if "mepd.service" in line]
    assert done.returncode == 0 and not ours, done.stderr


def _security_table(unit: Path) -> tuple[float, list[tuple[str, str]]]:
    done = subprocess.run(
        [_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip(f"systemd-analyze has no --offline (systemd < 250): {done.stderr.strip()}")
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert score, done.stdout + done.stderr
    exposed = [
        (match.group(1), match.group(2))
        for match in re.finditer(r"^✗ (\S+)\s+(.*?)\s+[0-9.]+$", done.stdout, re.MULTILINE)
    ]
    return float(score.group(1)), exposed


def _token(setting: str) -> str:
    """What the unit's comment must name for an exposed setting: ``CapabilityBoundingSet=
    ~CAP_SET(UID|GID|PCAP)`` -> ``CAP_SETUID``, ``User=/DynamicUser=`` -> ``User``."""
    name, _, value = setting.partition("=")
    if not value.startswith("~"):
        return name
    value = value[1:]
    prefix, _, rest = value.partition("(")
    first = rest.split("|")[0].rstrip(")").rstrip("*") if rest else ""
    return prefix + first


def test_the_unit_scores_at_most_3_and_explains_every_exposure() -> None:
    score, exposed = _security_table(UNIT)
    assert score <= MAX_SCORE, exposed
    text = UNIT.read_text()
    explained = text[text.index("# What remains exposed") :]
    missing = [setting for setting, _ in exposed if _token(setting) not in explained]
    assert not missing, f"exposures without a reason in the unit: {missing}"


def test_the_unit_is_a_notify_service_with_installed_documentation() -> None:
    text = UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.MULTILINE)
    assert re.search(r"^WatchdogSec=\d+", text, re.MULTILINE)
    # Documentation= names files pip installs (pyproject's shared-data: docs/ and
    # packaging/ under <prefix>/share/doc/mep); each must exist in this checkout.
    docs = re.findall(r"^Documentation=file:///opt/mep/venv/share/doc/mep/(\S+)$", text, re.M)
    assert docs
    shared = {"packaging/": REPO / "packaging", "": REPO / "docs"}
    for doc in docs:
        top = "packaging/" if doc.startswith("packaging/") else ""
        assert (shared[top] / doc.removeprefix(top)).is_file(), doc
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"docs" = "share/doc/mep"' in pyproject
    assert '"packaging" = "share/doc/mep/packaging"' in pyproject
    assert (REPO / "packaging" / "README.md").is_file()


# -- the protocol, on a real socket ------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket as systemd's, bound to a path; yields it and $NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if line)


def test_ready_stopping_and_watchdog_reach_the_socket(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}
    notifier = Notifier.from_environment(env, pid=4242)
    assert notifier.watchdog_interval == 1.5
    assert notifier.ready("serving on 127.0.0.1:8470")
    assert received(sock) == {"READY": "1", "STATUS": "serving on 127.0.0.1:8470"}
    assert notifier.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}
    assert notifier.reloading()
    got = received(sock)
    assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
    assert notifier.stopping()
    assert received(sock)["STOPPING"] == "1"


def test_an_abstract_socket_name_is_used() -> None:
    name = f"mep-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert received(sock)["READY"] == "1"


def test_without_systemd_nothing_is_sent_and_the_watchdog_is_someone_elses() -> None:
    assert not Notifier.from_environment({}).enabled
    assert not Notifier.from_environment({}).ready("up")
    # WATCHDOG_PID of another process: that process pings, not this one.
    other = Notifier.from_environment(
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=2
    )
    assert other.watchdog_interval is None
    # An address family mepd does not speak (vsock) is logged, never fatal.
    assert not Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled and not notifier.ready("up")


# -- the daemon, run by hand as the unit runs it ------------------------------------------


def _wait_for(sock: socket.socket, key: str, deadline: float = 60.0) -> dict[str, str]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        sock.settimeout(max(0.1, end - time.monotonic()))
        try:
            got = received(sock)
        except TimeoutError:
            break
        if key in got:
            return got
    raise AssertionError(f"no {key} within {deadline}s")


@pytest.mark.slow
def test_the_daemon_notifies_systemd(tmp_path: Path) -> None:
    """``mepd init``'s files, then ``mepd serve`` as ExecStart= runs it: READY=1 when the
    port answers, WATCHDOG=1 pings, RELOADING=1 and READY=1 around a SIGHUP, STOPPING=1
    on SIGTERM, exit 0."""
    name = f"mep-test-notify-{uuid.uuid4().hex}"
    with (
        trusted_directory("mept-systemd-") as top,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind("\0" + name)
        init = subprocess.run(
            [
                sys.executable,
                "-m",
                "mepd",
                "init",
                str(top / "etc"),
                *INIT_OPTIONS,
                str(top / "state"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert init.returncode == 0, init.stderr
        env = {
            **os.environ,
            "MEPD_CONFIG": str(top / "etc" / "mepd.yaml"),
            "NOTIFY_SOCKET": "@" + name,
            "WATCHDOG_USEC": "400000",
        }
        log = (tmp_path / "mepd.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "mepd", "serve"], env=env, stdout=log, stderr=log
        )
        try:
            ready = _wait_for(sock, "READY")
            assert ready["STATUS"].startswith("serving on 127.0.0.1:")
            port = int((top / "state" / "port").read_text())
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
            assert _wait_for(sock, "WATCHDOG") == {"WATCHDOG": "1"}
            daemon.send_signal(signal.SIGHUP)
            assert _wait_for(sock, "RELOADING")["RELOADING"] == "1"
            assert _wait_for(sock, "READY")["READY"] == "1"
            daemon.send_signal(signal.SIGTERM)
            assert _wait_for(sock, "STOPPING")["STOPPING"] == "1"
            assert daemon.wait(60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)
            log.close()
