"""Hostile identities in valid tokens, against a real ``mepd serve`` with a real mapped
account and user endpoint: control characters, 6,000-character fields and fields at the
length limit get a 4xx or are served — never a 500 — and the audit trail stays JSON
lines with capped fields and the request's id.

The tokens are signed with an ES256 key of the test's own, configured as a ``jwt`` issuer
(a JWKS file); tests/test_oidc.py does the same against a real OpenID provider.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mepcore.tasks import pack_args, pack_function
from tests.daemon_harness import (
    RunningDaemon,
    remote_function,
    running_daemon,
    write_runtime_deployment,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

ISSUER = "https://idp.example"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningDaemon, Any, str]]:
    from tests.accounts import create_account, delete_account

    top = tmp_path_factory.mktemp("edge-identity")
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    (top / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    account = create_account()
    try:
        issuers = [
            {"type": "local"},
            {
                "type": "jwt",
                "issuer": ISSUER,
                "audience": "mepd",
                "jwks_file": str(top / "jwks.json"),
                "algorithms": ["ES256"],
            },
        ]
        config = write_runtime_deployment(
            top / "site",
            settings_extra={"issuers": issuers},
        )
        with running_daemon(config, top / "site" / "state") as daemon:
            yield daemon, key, account.pw_name
    finally:
        delete_account(account.pw_name)


def token(key: Any, sub: str, username: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "mepd",
        "sub": sub,
        "preferred_username": username,
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "jti": os.urandom(8).hex(),
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1", "typ": "at+jwt"})


def submit(daemon: RunningDaemon, bearer: str, request_id: str) -> httpx.Response:
    fid, body = pack_function(remote_function("def one():\n    return 1\n", "one"))
    headers = {"X-Request-ID": request_id}
    with daemon.client(bearer) as client:
        client.post("/v1/functions", json={"function": base64.b64encode(body).decode()})
        return client.post(
            "/v1/endpoints/hpc/submit",
            headers=headers,
            json={
                "user_endpoint_config": {"engine": "ThreadPoolEngine", "max_workers": 1},
                "tasks": [
                    {"function_id": fid, "args": base64.b64encode(pack_args((), {})).decode()}
                ],
            },
        )


@pytest.mark.parametrize(
    ("name", "sub"),
    [
        ("control-and-6000", "a\nb\x1b[31m" + "x" * 6000),
        ("6000", "x" * 6000),
        ("escape", "\x1b]0;owned\x07"),
        ("at-the-limit", "ü\"'{}$(x)\\ {{ x }} %s " + "y" * 1000),
    ],
)
def test_a_hostile_subject_for_a_mapped_account_is_never_a_500(
    signed: tuple[RunningDaemon, Any, str], name: str, sub: str
) -> None:
    daemon, key, account = signed
    answer = submit(daemon, token(key, sub, f"{account}@example.org"), f"hostile-{name}")
    assert answer.status_code < 500, answer.text
    assert answer.headers["x-request-id"] == f"hostile-{name}"
    assert answer.status_code in (200, 400, 401, 403), answer.text
    if answer.status_code != 200:
        assert "x" * 100 not in answer.text and "\x1b" not in answer.text
    # The audit trail is still JSON lines, with long fields cut and the request's id.
    audit = Path(daemon.state_dir) / "audit.jsonl"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    mine = [r for r in records if r.get("request_id") == f"hostile-{name}"]
    assert mine, "the request's audit records carry its id"
    for record in records:
        for value in record.values():
            if isinstance(value, str):
                assert len(value) <= 1100, (record["event"], len(value))
