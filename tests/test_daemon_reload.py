"""Reload: a broken policy on SIGHUP (or ``mepd reload``) keeps the old one; a fixed one
takes effect. Drain on SIGTERM: exit 0, port file and admin socket removed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon_harness import RunningDaemon, running_daemon, write_deployment

pytestmark = [pytest.mark.root]


def status_code(client: httpx.Client) -> int:
    return client.get("/v1/endpoints/hpc/status").status_code


def wait_for_reloads(daemon: RunningDaemon, count: int, deadline: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        out = subprocess.run(
            [sys.executable, "-m", "mepd", "status", "--state-dir", str(daemon.state_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        status: dict[str, Any] = json.loads(out.stdout)
        if status["reloads"] >= count:
            return status
        time.sleep(0.05)
    raise AssertionError("the daemon did not reload in time")


def test_broken_policy_keeps_the_old_one_and_a_fixed_one_takes_effect(
    tmp_path: Path, make_account: Any
) -> None:
    acct = make_account()
    config = write_deployment(tmp_path / "site", python=sys.executable)
    policy = tmp_path / "site" / "policy.csv"
    with running_daemon(config, tmp_path / "site" / "state") as daemon:
        client = daemon.client(daemon.token(f"{acct.pw_name}@example.org"))
        assert status_code(client) == 200

        good = policy.read_text()
        policy.write_text(good + "p, this line, is broken\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_for_reloads(daemon, 1)
        assert status_code(client) == 200  # the old policy is still in force
        assert "daemon.reload_failed" in daemon.stderr()

        # The fixed policy denies read_status (base.csv grants it): it takes effect.
        policy.write_text(good + "p, **, hpc, user:*, read_status, -, deny\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_for_reloads(daemon, 2)
        assert status_code(client) == 403

        # `mepd reload` reports a broken file and exits 1; the policy stays as it was.
        policy.write_text("garbage without commas\n")
        out = subprocess.run(
            [sys.executable, "-m", "mepd", "reload", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1
        assert "policy" in out.stderr
        assert status_code(client) == 403

        records = [
            json.loads(line) for line in (daemon.state_dir / "audit.jsonl").read_text().splitlines()
        ]
        reloads = [r for r in records if r["event"].startswith("daemon.reload")]
        assert [r["event"] for r in reloads] == [
            "daemon.reload_failed",
            "daemon.reloaded",
            "daemon.reload_failed",
        ]
        assert all("policy" in " ".join(r["problems"]) for r in (reloads[0], reloads[2]))

        port_file = daemon.state_dir / "port"
        assert port_file.exists()
        assert daemon.stop() == 0
        assert not port_file.exists()
        assert not (daemon.state_dir / "admin.sock").exists()
        assert '"event":"daemon.stopped"' in (daemon.state_dir / "audit.jsonl").read_text()


def test_reload_is_all_or_nothing_and_a_broken_key_is_audited(
    tmp_path: Path, make_account: Any
) -> None:
    """A broken issuer key file in the same reload as a good policy change: neither takes
    effect, the answer and the audit record name the key file, and after the key is
    fixed the policy change and the key both take effect."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    acct = make_account()
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "site" / "jwks.json"
    jwks.parent.mkdir(parents=True)
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    config = write_deployment(
        tmp_path / "site",
        python=sys.executable,
        settings_extra={
            "issuers": [
                {"type": "local"},
                {
                    "type": "jwt",
                    "issuer": "https://idp.example.org",
                    "audience": "mep",
                    "jwks_file": str(jwks),
                },
            ]
        },
    )
    policy = tmp_path / "site" / "policy.csv"
    with running_daemon(config, tmp_path / "site" / "state") as daemon:
        client = daemon.client(daemon.token(f"{acct.pw_name}@example.org"))
        assert status_code(client) == 200
        good = policy.read_text()
        policy.write_text(good + "p, **, hpc, user:*, read_status, -, deny\n")
        jwks.write_text("{this is not a key set")
        out = subprocess.run(
            [sys.executable, "-m", "mepd", "reload", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1
        assert str(jwks) in out.stderr
        assert status_code(client) == 200  # the policy change did not take effect either
        failed = [
            json.loads(line)
            for line in (daemon.state_dir / "audit.jsonl").read_text().splitlines()
            if '"daemon.reload_failed"' in line
        ]
        assert failed and any(str(jwks) in p for p in failed[-1]["problems"])

        jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
        out = subprocess.run(
            [sys.executable, "-m", "mepd", "reload", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert status_code(client) == 403
