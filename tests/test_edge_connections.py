"""The HTTP edge of a real ``mepd serve`` on 127.0.0.1 (mepd.edge): header and body
deadlines, connection caps, the server's own errors in JSON, and the descriptor limit.

Every count and time here is bounded: at most 200 sockets, deadlines of a few seconds
(the edge's timeouts are set low in these daemons' settings). Waiting is polling with a
deadline; the one measurement (CPU under EMFILE) is a bound of a fault, not a figure of
performance.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon_harness import REPO, RunningDaemon, running_daemon, write_deployment

HEADER_TIMEOUT = 1.0


def _daemon(top: Path, edge: dict[str, Any]) -> Iterator[RunningDaemon]:
    config = write_deployment(top, python=sys.executable, settings_extra={"edge": edge})
    with running_daemon(config, top / "state") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    edge = {"header_timeout": HEADER_TIMEOUT, "body_timeout": 1.0, "max_connections": 400}
    yield from _daemon(tmp_path_factory.mktemp("edge-timeouts"), edge)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    edge = {"max_connections": 6, "max_connections_per_peer": 4, "header_timeout": 30}
    yield from _daemon(tmp_path_factory.mktemp("edge-caps"), edge)


def port(daemon: RunningDaemon) -> int:
    return int(daemon.url.rsplit(":", 1)[1])


def connect(daemon: RunningDaemon, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port(daemon)))
    return sock


def read_until_closed(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sent before closing, or None if it is still open at the deadline."""
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return None


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_hundred_header_less_sockets_are_closed_within_the_timeout(
    timeouts: RunningDaemon,
) -> None:
    socks = [connect(timeouts) for _ in range(100)]
    partial = connect(timeouts)
    partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    try:
        deadline = time.monotonic() + HEADER_TIMEOUT + 10
        outcomes = [read_until_closed(s, deadline) for s in socks]
        assert all(o == b"" for o in outcomes), [o for o in outcomes if o != b""][:3]
        answer = read_until_closed(partial, deadline)
        assert answer, "a started request is told why it is cut off"
        status, headers, body = parse(answer)
        assert status == 408 and body["error"]["reason"] == "api.request_timeout"
        assert headers["content-type"] == "application/json" and headers["x-request-id"]
    finally:
        for s in [*socks, partial]:
            s.close()
    # The daemon still serves.
    assert httpx.get(timeouts.url + "/healthz", timeout=10).status_code == 200


def test_a_dribbled_body_gets_408(timeouts: RunningDaemon) -> None:
    token = timeouts.token("alice@example.org")
    body = json.dumps({"function": "Zm4="}).encode()
    sock = connect(timeouts)
    try:
        sock.sendall(
            b"POST /v1/functions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        answer = b""
        deadline = time.monotonic() + 15
        for byte in body:  # one byte per select() timeout: a slow client, not a wait
            ready, _, _ = select.select([sock], [], [], 0.3)
            if ready or time.monotonic() > deadline:
                break
            sock.sendall(bytes([byte]))
        answer = read_until_closed(sock, deadline) or b""
    finally:
        sock.close()
    status, headers, error = parse(answer)
    assert status == 408, answer
    assert error["error"]["reason"] == "api.request_timeout"
    assert headers["connection"] == "close" and headers["x-request-id"]


def test_the_servers_own_400_is_json(timeouts: RunningDaemon) -> None:
    sock = connect(timeouts)
    try:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = read_until_closed(sock, time.monotonic() + 10)
    finally:
        sock.close()
    assert answer
    status, headers, body = parse(answer)
    assert status == 400 and body["error"]["reason"] == "api.bad_request"
    assert headers["content-type"] == "application/json" and headers["x-request-id"]


def admitted(daemon: RunningDaemon, source: str) -> socket.socket | None:
    """A connection that the daemon serves (kept alive, so it keeps its place), or None
    when it was refused with 503 ``api.too_many_connections``."""
    sock = connect(daemon, source)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    ready, _, _ = select.select([sock], [], [], 10)
    assert ready, "no answer"
    head = sock.recv(65536)
    if head.startswith(b"HTTP/1.1 200"):
        return sock
    rest = read_until_closed(sock, time.monotonic() + 10)
    sock.close()
    status, headers, body = parse(head + (rest or b""))
    assert (status, body["error"]["reason"]) == (503, "api.too_many_connections")
    assert headers["retry-after"] == "1" and headers["x-request-id"]
    return None


def test_connections_are_capped_per_peer_and_in_total(capped: RunningDaemon) -> None:
    held: list[socket.socket] = []
    try:
        # One peer gets at most 4 (a connection of the readiness check may still count).
        for _ in range(5):
            sock = admitted(capped, "127.0.0.1")
            if sock is None:
                break
            held.append(sock)
        assert 1 <= len(held) <= 4
        assert admitted(capped, "127.0.0.1") is None
        # Another address (127.0.0.2 is loopback too) fits until the total of 6.
        others = 0
        for _ in range(6):
            sock = admitted(capped, "127.0.0.2")
            if sock is None:
                break
            held.append(sock)
            others += 1
        assert others >= 1 and len(held) <= 6
        assert admitted(capped, "127.0.0.2") is None
    finally:
        for s in held:
            s.close()
    # Places are given back when connections close.
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            if httpx.get(capped.url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
    else:
        pytest.fail("the daemon did not serve again after the connections closed")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_with_few_descriptors(top: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``mepd serve`` under ``prlimit --nofile=128``, its connection cap above that (so
    accept() itself fails with EMFILE); (process, port) once it listens."""
    edge = {"max_connections": 1000, "header_timeout": 60}
    config = write_deployment(top, python=sys.executable, settings_extra={"edge": edge})
    command = [sys.executable, "-m", "mepd", "serve", "--config", str(config)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["prlimit", "--nofile=128", *command], stdout=log, stderr=log, cwd=str(REPO)
        )
    port_file = top / "state" / "port"
    end = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < end, "mepd did not start"
        select.select([], [], [], 0.05)
    return process, int(port_file.read_text())


def test_emfile_costs_little_cpu_and_few_log_lines(tmp_path: Path) -> None:
    """200 idle sockets against a daemon limited to 128 descriptors: it backs off instead
    of spinning, logs a line, not a flood, and serves again once the sockets go."""
    log_path = tmp_path / "mepd.log"
    process, port = _start_with_few_descriptors(tmp_path / "site", log_path)
    url = f"http://127.0.0.1:{port}"
    socks: list[socket.socket] = []
    try:
        socks += [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        end = time.monotonic() + 20
        while "edge.accept_failed" not in log_path.read_text():
            assert time.monotonic() < end, "the daemon never ran out of descriptors"
            select.select([], [], [], 0.05)
        cpu0, t0 = _cpu_seconds(process.pid), time.monotonic()
        # While the descriptors are gone a health check cannot get in: its timeout is the
        # measuring interval.
        with pytest.raises(httpx.TimeoutException):
            httpx.get(url + "/healthz", timeout=3)
        cpu1, t1 = _cpu_seconds(process.pid), time.monotonic()
        assert (cpu1 - cpu0) / (t1 - t0) < 0.2
        for s in socks:
            s.close()
        socks.clear()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        else:
            pytest.fail("the daemon did not serve again after the sockets closed")
        lines = log_path.read_text().splitlines()
        assert len(lines) < 100, len(lines)
        assert all(json.loads(line) for line in lines)
    finally:
        for s in socks:
            s.close()
        process.terminate()
        process.wait(30)


def test_a_flood_from_one_identity_gets_429_while_another_is_served(tmp_path: Path) -> None:
    config = write_deployment(
        tmp_path / "site", python=sys.executable, settings_extra={"edge": {"rate": 1, "burst": 3}}
    )
    with running_daemon(config, tmp_path / "site" / "state") as daemon:
        flood, other = daemon.token("flood@example.org"), daemon.token("other@example.org")
        with daemon.client(flood, timeout=30) as client:
            answers = [client.get("/v1/tasks/none") for _ in range(4)]
            assert [r.status_code for r in answers] == [404, 404, 404, 429]
            refused = answers[-1]
            assert refused.json()["error"]["reason"] == "api.rate_limited"
            assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-request-id"]
            # Told to come back later, the flooding connection is read again later; the
            # next request on it is answered (refused again or served), not dropped.
            assert client.get("/v1/tasks/none").status_code in (404, 429)
        with daemon.client(other, timeout=30) as client:
            assert client.get("/v1/tasks/none").status_code == 404
