"""Authentication: local issuer, JWT/JWKS issuers, RFC 7662 introspection."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mepcore.errors import AuthError
from mepd.auth import (
    LOCAL_KEY_FILE,
    Authenticator,
    Caller,
    issue_local_token,
    load_or_create_local_key,
    local_identity_id,
)
from mepd.settings import ClaimNames, IssuerSettings

LOCAL = IssuerSettings(type="local")


def authenticate(auth: Authenticator, token: str | None) -> Caller:
    async def go() -> Caller:
        try:
            return await auth.authenticate(None if token is None else f"Bearer {token}")
        finally:
            await auth.aclose()

    return asyncio.run(go())


def reason_of(auth: Authenticator, token: str) -> str:
    with pytest.raises(AuthError) as info:
        authenticate(auth, token)
    return info.value.reason


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def local(tmp_path: Path) -> Authenticator:
    auth = Authenticator((LOCAL,), tmp_path)
    auth.load()
    return auth


def test_local_key_is_created_0600_once(tmp_path: Path) -> None:
    key = load_or_create_local_key(tmp_path)
    path = tmp_path / LOCAL_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_or_create_local_key(tmp_path)
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


def test_local_token_round_trip(tmp_path: Path, local: Authenticator) -> None:
    key = load_or_create_local_key(tmp_path)
    issued_from = int(time.time())
    token = issue_local_token(key, LOCAL, "alice@example.org", linked=["al@other.org"], mfa=True)
    issued_by = time.time()
    caller = authenticate(local, token)
    assert [i.username for i in caller.identities] == ["alice@example.org", "al@other.org"]
    assert caller.identities.primary.id == local_identity_id("alice@example.org")
    assert caller.mfa is True
    assert caller.auth_time is not None and issued_from <= caller.auth_time <= issued_by
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"


def test_bad_signature_is_invalid(tmp_path: Path, local: Authenticator) -> None:
    other = Ed25519PrivateKey.generate()
    token = issue_local_token(other, LOCAL, "alice@example.org")
    assert reason_of(local, token) == "auth.invalid_token"


def test_expired_token(tmp_path: Path, local: Authenticator) -> None:
    key = load_or_create_local_key(tmp_path)
    token = issue_local_token(key, LOCAL, "alice@example.org", ttl=60, now=time.time() - 3600)
    assert reason_of(local, token) == "auth.expired_token"


def test_wrong_audience(tmp_path: Path, local: Authenticator) -> None:
    key = load_or_create_local_key(tmp_path)
    token = issue_local_token(key, IssuerSettings(type="local", audience="elsewhere"), "a@b.c")
    assert reason_of(local, token) == "auth.invalid_token"


def test_alg_none_is_refused(tmp_path: Path, local: Authenticator) -> None:
    now = int(time.time())
    claims = {"iss": "mepd-local", "aud": "mepd", "sub": "x", "exp": now + 600, "iat": now}
    token = b64url(b'{"alg":"none","typ":"JWT"}') + "." + b64url(json.dumps(claims).encode()) + "."
    assert reason_of(local, token) == "auth.invalid_token"


def test_hmac_signed_with_the_public_key_is_refused(tmp_path: Path, local: Authenticator) -> None:
    public = (
        load_or_create_local_key(tmp_path)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    claims = {"iss": "mepd-local", "aud": "mepd", "sub": "x", "exp": now + 600, "iat": now}
    signing_input = (
        b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + b64url(json.dumps(claims).encode())
    )
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    assert reason_of(local, signing_input + "." + b64url(mac)) == "auth.invalid_token"


def test_unknown_issuer(local: Authenticator) -> None:
    key = Ed25519PrivateKey.generate()
    token = issue_local_token(key, IssuerSettings(type="local", issuer="https://evil"), "a@b.c")
    assert reason_of(local, token) == "auth.unknown_issuer"


def test_missing_and_malformed_headers(local: Authenticator) -> None:
    with pytest.raises(AuthError) as info:
        authenticate(local, None)
    assert info.value.reason == "auth.missing_token"
    assert reason_of(local, "garbage") == "auth.invalid_token"
    assert reason_of(local, "x" * 20_000) == "auth.invalid_token"


# -- OIDC JWT issuers -----------------------------------------------------------------


def rsa_jwk(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, use="sig", alg="RS256")
    return key, jwk


def oidc_token(
    key: Any,
    kid: str,
    *,
    iss: str = "https://idp",
    aud: str = "mepd-api",
    alg: str = "RS256",
    **extra: Any,
) -> str:
    now = int(time.time())
    claims = {
        "iss": iss,
        "aud": aud,
        "sub": "u-123",
        "preferred_username": "carol@idp.org",
        "email": "carol@idp.org",
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "amr": ["pwd", "mfa"],
        **extra,
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})


def test_jwt_issuer_with_jwks_file_and_claim_names(tmp_path: Path) -> None:
    key, jwk = rsa_jwk("k1")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    issuer = IssuerSettings(
        type="jwt",
        issuer="https://idp",
        audience="mepd-api",
        jwks_file=tmp_path / "jwks.json",
        algorithms=("RS256",),
        claims=ClaimNames(mfa="amr", linked="linked_ids"),
    )
    auth = Authenticator((issuer,), tmp_path)
    auth.load()
    caller = authenticate(auth, oidc_token(key, "k1", linked_ids=["u-456"]))
    assert caller.identities.primary.username == "carol@idp.org"
    assert [i.id for i in caller.identities] == ["u-123", "u-456"]
    assert caller.mfa is True
    assert reason_of(auth, oidc_token(key, "k1", aud="other")) == "auth.invalid_token"
    assert reason_of(auth, oidc_token(key, "nope")) == "auth.invalid_token"
    assert reason_of(auth, oidc_token(key, "k1", nbf=int(time.time()) + 3600)) == (
        "auth.invalid_token"
    )
    assert reason_of(auth, oidc_token(key, "k1", alg="RS512")) == "auth.invalid_token"
    # A token within the leeway of its expiry is still accepted.
    assert authenticate(auth, oidc_token(key, "k1", exp=int(time.time()) - 5)).issuer == (
        "https://idp"
    )


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def jwks_server() -> Iterator[tuple[_Server, dict[str, Any]]]:
    state: dict[str, Any] = {"keys": [], "hits": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["hits"] += 1
            body = json.dumps({"keys": state["keys"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with _Server(Handler) as server:
        yield server, state


def test_jwks_url_is_fetched_cached_and_an_unknown_kid_fetches_again(
    tmp_path: Path, jwks_server: tuple[_Server, dict[str, Any]]
) -> None:
    server, state = jwks_server
    key1, jwk1 = rsa_jwk("k1")
    state["keys"] = [jwk1]
    issuer = IssuerSettings(
        type="jwt",
        issuer="https://idp",
        audience="mepd-api",
        jwks_url=server.url + "/jwks",
        algorithms=("RS256",),
    )
    auth = Authenticator((issuer,), tmp_path)
    auth.load()

    async def scenario() -> None:
        try:
            for _ in range(3):
                await auth.authenticate("Bearer " + oidc_token(key1, "k1"))
            assert state["hits"] == 1  # cached
            key2, jwk2 = rsa_jwk("k2")
            state["keys"] = [jwk1, jwk2]
            # An unknown kid right after a fetch: the next fetch (rate-limited per
            # issuer) is awaited, not refused.
            await auth.authenticate("Bearer " + oidc_token(key2, "k2"))
            assert state["hits"] == 2
            # Concurrent requests with unknown key ids share one fetch.
            key3, _ = rsa_jwk("k3")
            results = await asyncio.gather(
                *(auth.authenticate("Bearer " + oidc_token(key3, "k3")) for _ in range(5)),
                return_exceptions=True,
            )
            assert all(isinstance(r, AuthError) for r in results)
            assert state["hits"] == 3
        finally:
            await auth.aclose()

    asyncio.run(scenario())


# -- introspection --------------------------------------------------------------------


def test_introspection_with_cache_bounded_by_expiry(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    now = int(time.time())
    answers = {
        "good": {
            "active": True,
            "sub": "g-1",
            "username": "dave@globus.org",
            "identity_set": ["g-1", "g-2"],
            "exp": now + 600,
            "aud": ["mepd-rs"],
        },
        "short": {
            "active": True,
            "sub": "g-3",
            "username": "x@y",
            "exp": now + 30,
            "aud": "mepd-rs",
        },
        "dead": {"active": False},
        "elsewhere": {"active": True, "sub": "g-4", "exp": now + 600, "aud": ["other"]},
    }

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            form = dict(x.split("=", 1) for x in self.rfile.read(length).decode().split("&"))
            calls.append({"token": form["token"], "auth": self.headers["Authorization"]})
            body = json.dumps(answers.get(form["token"], {"active": False})).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    (tmp_path / "secret").write_text("s3cret\n")
    with _Server(Handler) as server:
        issuer = IssuerSettings(
            type="introspection",
            url=server.url + "/introspect",
            client_id="mepd",
            client_secret_file=tmp_path / "secret",
            audience="mepd-rs",
            claims=ClaimNames(username="username"),
        )
        auth = Authenticator((issuer,), tmp_path)
        auth.load()

        async def scenario() -> None:
            try:
                first = await auth.authenticate("Bearer good")
                second = await auth.authenticate("Bearer good")
                assert first == second
                assert [i.id for i in first.identities] == ["g-1", "g-2"]
                assert first.identities.primary.username == "dave@globus.org"
                assert len(calls) == 1
                expected = "Basic " + base64.b64encode(b"mepd:s3cret").decode()
                assert calls[0]["auth"] == expected
                for token, reason in (
                    ("dead", "auth.invalid_token"),
                    ("elsewhere", "auth.invalid_token"),
                ):
                    with pytest.raises(AuthError) as info:
                        await auth.authenticate(f"Bearer {token}")
                    assert info.value.reason == reason
                await auth.authenticate("Bearer short")
                cached_until = next(iter(auth._introspectors))._cache
                until = [u for u, c in cached_until.values() if c.identities.primary.id == "g-3"]
                assert until and until[0] <= now + 30  # the token's expiry, not 300 s
            finally:
                await auth.aclose()

        asyncio.run(scenario())


def test_introspection_server_down_is_issuer_unavailable(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    issuer = IssuerSettings(
        type="introspection",
        url="http://127.0.0.1:9/introspect",
        client_id="c",
        client_secret_file=tmp_path / "secret",
    )
    auth = Authenticator((issuer,), tmp_path)
    auth.load()
    assert reason_of(auth, "opaque-token") == "auth.issuer_unavailable"
