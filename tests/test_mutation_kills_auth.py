"""Authentication, pinned where mutation testing (``make mutation``) found it loose.

The claims a token must carry (``exp`` above all: without it a leaked token is valid
forever), the leeway of each issuer kind, how claims become identities, the local
issuer's key file, JWKS handling (key ids, symmetric keys, size, redirects, stray
bytes, reloads) and introspection answers (audience as a string, the cache bound).
Everything runs in-process against servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mepcore.errors import AuthError
from mepd.auth import (
    LOCAL_KEY_FILE,
    MAX_TOKEN_BYTES,
    Authenticator,
    Caller,
    caller_from_claims,
    issue_local_token,
    load_or_create_local_key,
    local_identity_id,
)
from mepd.settings import ClaimNames, IssuerSettings

LOCAL = IssuerSettings(type="local")
NAMES = ClaimNames()


def run(auth: Authenticator, *headers: str | None) -> list[Caller | AuthError]:
    """Authenticate each Authorization header in turn, in one event loop."""

    async def go() -> list[Caller | AuthError]:
        out: list[Caller | AuthError] = []
        try:
            for header in headers:
                try:
                    out.append(await auth.authenticate(header))
                except AuthError as exc:
                    out.append(exc)
        finally:
            await auth.aclose()
        return out

    return asyncio.run(go())


def accepted(auth: Authenticator, token: str) -> Caller:
    [answer] = run(auth, f"Bearer {token}")
    assert isinstance(answer, Caller), answer
    return answer


def refused(auth: Authenticator, header: str | None) -> AuthError:
    [answer] = run(auth, header)
    assert isinstance(answer, AuthError), answer
    return answer


# -- claims become a caller -----------------------------------------------------------


def claims_error(claims: dict[str, Any], names: ClaimNames = NAMES) -> AuthError:
    with pytest.raises(AuthError) as info:
        caller_from_claims(claims, names, "iss")
    return info.value


@pytest.mark.parametrize("claims", [{}, {"sub": 5}, {"sub": ""}])
def test_a_token_without_a_string_subject_is_invalid(claims: dict[str, Any]) -> None:
    error = claims_error(claims)
    assert error.reason == "auth.invalid_token"
    assert error.detail == "claim 'sub' missing or not a string"


def test_claims_become_identity_fields_under_the_issuers_names() -> None:
    names = ClaimNames(id="uid", username="login", email="mail", name="cn", auth_time="at")
    caller = caller_from_claims(
        {"uid": "u1", "login": "carol", "mail": "c@x.org", "cn": "Carol", "at": 7, "iat": 9},
        names,
        "https://idp",
    )
    assert caller.issuer == "https://idp"
    assert dict(caller.identities.primary.fields) == {
        "id": "u1",
        "username": "carol",
        "email": "c@x.org",
        "name": "Carol",
        "identity_provider": "https://idp",
        "iss": "https://idp",
    }
    assert caller.auth_time == 7.0  # the issuer's auth_time claim, not iat
    assert caller.owner == "https://idp|u1"


def test_fields_of_the_wrong_type_are_left_out() -> None:
    caller = caller_from_claims({"sub": "u1", "preferred_username": 5, "email": None}, NAMES, "i")
    assert dict(caller.identities.primary.fields) == {
        "id": "u1",
        "identity_provider": "i",
        "iss": "i",
    }


@pytest.mark.parametrize(
    ("claims", "auth_time"),
    [
        ({"sub": "u", "iat": 100}, 100.0),  # no auth_time: when the token was issued
        ({"sub": "u", "auth_time": 50, "iat": 100}, 50.0),
        ({"sub": "u", "auth_time": "yesterday"}, None),
        ({"sub": "u"}, None),
    ],
)
def test_auth_time_falls_back_to_iat(claims: dict[str, Any], auth_time: float | None) -> None:
    assert caller_from_claims(claims, NAMES, "i").auth_time == auth_time


def test_auth_age_counts_from_auth_time_and_never_goes_negative() -> None:
    caller = caller_from_claims({"sub": "u", "auth_time": 1000}, NAMES, "i")
    assert caller.auth_age(1600.0) == 600.0
    assert caller.auth_age(900.0) == 0.0  # issued "in the future" by a skewed clock
    assert caller_from_claims({"sub": "u"}, NAMES, "i").auth_age(1600.0) is None


@pytest.mark.parametrize(
    ("mfa", "expected"),
    [(True, True), (["pwd", "mfa"], True), (["pwd"], False), ("true", False), (1, False)],
)
def test_only_true_or_an_mfa_method_means_mfa(mfa: Any, expected: bool) -> None:
    assert caller_from_claims({"sub": "u", "mfa": mfa}, NAMES, "i").mfa is expected


def test_linked_identities_strings_and_documents_once_each() -> None:
    caller = caller_from_claims(
        {
            "sub": "u1",
            "identity_set": [
                "u2",
                {"id": "u3", "username": "c@other.org", "status": "used"},
                "u1",  # the primary again
                {"id": "u2"},  # a repeat
            ],
        },
        NAMES,
        "i",
    )
    assert [dict(i.fields) for i in caller.identities] == [
        {"id": "u1", "identity_provider": "i", "iss": "i"},
        {"id": "u2"},
        {"id": "u3", "username": "c@other.org", "status": "used"},
    ]


def test_at_most_64_linked_identities() -> None:
    linked = [f"u{n}" for n in range(64)]
    assert (
        len(caller_from_claims({"sub": "p", "identity_set": linked}, NAMES, "i").identities) == 65
    )
    error = claims_error({"sub": "p", "identity_set": [*linked, "one-more"]})
    assert error.reason == "auth.invalid_token"
    assert error.detail == "claim 'identity_set' is not a short list"


@pytest.mark.parametrize("linked", [{"id": "u2"}, "u2", 5])
def test_linked_identities_must_be_a_list(linked: Any) -> None:
    error = claims_error({"sub": "p", "identity_set": linked})
    assert (error.reason, error.detail) == (
        "auth.invalid_token",
        "claim 'identity_set' is not a short list",
    )


@pytest.mark.parametrize("item", [5, "", None, {"username": "no-id"}, {"id": ""}, ["u2"]])
def test_a_malformed_linked_identity_makes_the_token_invalid(item: Any) -> None:
    error = claims_error({"sub": "p", "identity_set": [item]})
    assert (error.reason, error.detail) == ("auth.invalid_token", "invalid linked identity")


# -- the local issuer -----------------------------------------------------------------


def test_local_tokens_carry_every_claim_the_verifier_needs() -> None:
    key = Ed25519PrivateKey.generate()
    token = issue_local_token(key, LOCAL, "alice@example.org", now=1_000_000.5)
    claims = jwt.decode(token, options={"verify_signature": False})
    jti = claims.pop("jti")
    assert len(jti) == 32 and int(jti, 16) >= 0
    assert claims == {
        "iss": "mepd-local",
        "aud": "mepd",
        "sub": local_identity_id("alice@example.org"),
        "preferred_username": "alice@example.org",
        "iat": 1_000_000,
        "nbf": 1_000_000,
        "exp": 1_003_600,  # an hour by default
        "auth_time": 1_000_000,
        "mfa": False,
        "identity_set": [],
    }


def test_local_tokens_with_email_linked_identities_and_a_short_life() -> None:
    key = Ed25519PrivateKey.generate()
    settings = IssuerSettings(type="local", issuer="https://me", audience="api")
    token = issue_local_token(
        key, settings, "a@x", linked=["b@y"], mfa=True, ttl=60, now=500.0, email="a@mail"
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iss"], claims["aud"], claims["exp"], claims["mfa"]) == (
        "https://me",
        "api",
        560,
        True,
    )
    assert claims["email"] == "a@mail"
    assert claims["identity_set"] == [{"id": local_identity_id("b@y"), "username": "b@y"}]
    assert local_identity_id("a@x") == str(uuid.uuid5(uuid.NAMESPACE_URL, "mepd-local:a@x"))


def test_the_state_directory_is_created_private_with_its_parents(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "mepd"
    load_or_create_local_key(state)
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / LOCAL_KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_a_key_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / LOCAL_KEY_FILE).write_bytes(pem)
    with pytest.raises(AuthError) as info:
        load_or_create_local_key(tmp_path)
    assert info.value.reason == "auth.issuer_unavailable"
    assert info.value.detail == f"{tmp_path / LOCAL_KEY_FILE} is not an Ed25519 private key"


def test_a_dangling_link_in_place_of_the_key_is_not_followed(tmp_path: Path) -> None:
    # Whoever plants the link must not choose where root writes a private key.
    target = tmp_path / "elsewhere.pem"
    (tmp_path / LOCAL_KEY_FILE).symlink_to(target)
    with pytest.raises(FileNotFoundError):
        load_or_create_local_key(tmp_path)
    assert not target.exists()


def local_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "mepd-local", "aud": "mepd", "sub": "x", "iat": now, "exp": now + 600}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
def local(tmp_path: Path) -> tuple[Authenticator, Ed25519PrivateKey]:
    auth = Authenticator((LOCAL,), tmp_path)
    auth.load()
    return auth, load_or_create_local_key(tmp_path)


def test_a_token_without_exp_is_refused(local: tuple[Authenticator, Ed25519PrivateKey]) -> None:
    auth, key = local
    error = refused(auth, "Bearer " + jwt.encode(local_claims(exp=None), key, algorithm="EdDSA"))
    assert error.reason == "auth.invalid_token"
    assert "exp" in (error.detail or "")


def test_a_token_without_aud_is_refused(local: tuple[Authenticator, Ed25519PrivateKey]) -> None:
    auth, key = local
    error = refused(auth, "Bearer " + jwt.encode(local_claims(aud=None), key, algorithm="EdDSA"))
    assert error.reason == "auth.invalid_token"
    assert "aud" in (error.detail or "")


def test_local_tokens_have_five_seconds_of_leeway(
    local: tuple[Authenticator, Ed25519PrivateKey],
) -> None:
    auth, key = local
    now = int(time.time())
    # Accepted a second past its expiry (a few seconds of margin for a slow machine)...
    accepted(auth, jwt.encode(local_claims(exp=now - 1), key, algorithm="EdDSA"))
    # ...and refused once the five seconds have passed.
    error = refused(auth, "Bearer " + jwt.encode(local_claims(exp=now - 5), key, algorithm="EdDSA"))
    assert error.reason == "auth.expired_token"
    assert error.detail == "Signature has expired"


def test_a_local_token_is_checked_against_the_local_issuer_itself(tmp_path: Path) -> None:
    # The verifier checks iss too, not only the look-up that chose it.
    auth = Authenticator((LOCAL,), tmp_path)
    auth.load()
    key = load_or_create_local_key(tmp_path)
    verifier = auth._jwt["mepd-local"]
    token = jwt.encode(local_claims(iss="someone-else"), key, algorithm="EdDSA")

    async def go() -> None:
        async with httpx.AsyncClient() as http:
            header = jwt.get_unverified_header(token)
            await verifier.verify(token, header, http, time.monotonic())

    with pytest.raises(AuthError) as info:
        asyncio.run(go())
    assert info.value.reason == "auth.invalid_token"
    assert "issuer" in (info.value.detail or "").lower()


# -- the Authorization header and the verified-token cache ---------------------------


def test_header_problems_say_what_is_wrong(local: tuple[Authenticator, Ed25519PrivateKey]) -> None:
    auth, _ = local
    for header, reason, detail in (
        (None, "auth.missing_token", "no Authorization header"),
        ("", "auth.missing_token", "no Authorization header"),
        ("Basic YTpi", "auth.missing_token", "Authorization is not a bearer token"),
        ("Bearer ", "auth.missing_token", "Authorization is not a bearer token"),
        ("Bearer not-a-jwt", "auth.invalid_token", "token is not a JWT"),
        ("Bearer " + "x" * MAX_TOKEN_BYTES, "auth.invalid_token", "token is not a JWT"),
        ("Bearer " + "x" * (MAX_TOKEN_BYTES + 1), "auth.invalid_token", "token too long"),
    ):
        error = refused(auth, header)
        assert (error.reason, error.detail) == (reason, detail), header and header[:20]


def test_bearer_is_case_insensitive_and_may_be_followed_by_several_spaces(
    local: tuple[Authenticator, Ed25519PrivateKey],
) -> None:
    auth, key = local
    token = issue_local_token(key, LOCAL, "a@x")
    for header in (f"bearer {token}", f"BEARER {token}", f"Bearer  {token}"):
        [answer] = run(auth, header)
        assert isinstance(answer, Caller), header


def test_an_untrusted_issuer_is_named(local: tuple[Authenticator, Ed25519PrivateKey]) -> None:
    auth, _ = local
    other = IssuerSettings(type="local", issuer="https://evil")
    error = refused(auth, "Bearer " + issue_local_token(Ed25519PrivateKey.generate(), other, "a"))
    assert (error.reason, error.detail) == (
        "auth.unknown_issuer",
        "issuer 'https://evil' not trusted",
    )


def test_an_issuer_claim_that_is_not_a_string_is_not_trusted(
    local: tuple[Authenticator, Ed25519PrivateKey],
) -> None:
    auth, key = local
    # Signed as raw JWS: PyJWT's encoder refuses a non-string iss, a forger does not.
    payload = json.dumps(local_claims(iss=["mepd-local"])).encode()
    token = jwt.api_jws.PyJWS().encode(payload, key, algorithm="EdDSA")
    error = refused(auth, f"Bearer {token}")
    assert (error.reason, error.detail) == (
        "auth.unknown_issuer",
        "issuer ['mepd-local'] not trusted",
    )


def test_a_verified_token_is_answered_from_the_cache_within_its_life(tmp_path: Path) -> None:
    auth = Authenticator((LOCAL,), tmp_path, introspection_cache_entries=2)
    auth.load()
    key = load_or_create_local_key(tmp_path)
    tokens = [issue_local_token(key, LOCAL, f"u{n}@x") for n in range(3)]
    first, again, *_, last, tail = run(
        auth, *(f"Bearer {t}" for t in [tokens[0], tokens[0], tokens[1], tokens[2], tokens[2]])
    )
    assert first is again  # the same answer, not a second verification
    assert last is tail
    assert len(auth._verified) == 2  # bounded: the oldest entry made room


# -- OIDC issuers: JWKS ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


def jwk_of(key: rsa.RSAPrivateKey, kid: str | None) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(use="sig", alg="RS256")
    if kid is not None:
        jwk["kid"] = kid
    return jwk


OCT = {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ", "alg": "HS256"}


def oidc(key: Any, kid: str | None = None, *, alg: str = "RS256", **changes: Any) -> str:
    now = int(time.time())
    claims = {"iss": "https://idp", "aud": "api", "sub": "u-1", "iat": now, "exp": now + 600}
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    headers = {"typ": "at+jwt", **({"kid": kid} if kid else {})}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def file_issuer(tmp_path: Path, keys: list[dict[str, Any]], **settings: Any) -> Authenticator:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    issuer = IssuerSettings(
        type="jwt",
        issuer="https://idp",
        audience="api",
        jwks_file=path,
        algorithms=("RS256", "HS256"),
        **settings,
    )
    auth = Authenticator((issuer,), tmp_path)
    auth.load()
    return auth


def test_a_token_without_a_key_id_uses_the_only_key_or_the_key_without_an_id(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    a, b = rsa_keys
    assert accepted(file_issuer(tmp_path, [jwk_of(a, "k1")]), oidc(a)).issuer == "https://idp"
    both = file_issuer(tmp_path, [jwk_of(a, None), jwk_of(b, "k2")])
    accepted(both, oidc(a))
    accepted(both, oidc(b, "k2"))
    ambiguous = file_issuer(tmp_path, [jwk_of(a, "k1"), jwk_of(b, "k2")])
    error = refused(ambiguous, "Bearer " + oidc(a))
    assert (error.reason, error.detail) == ("auth.invalid_token", "no key with kid ''")


def test_symmetric_keys_in_a_jwks_are_ignored_wherever_they_stand(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    a, _ = rsa_keys
    # First in the set, and without a key id like the RSA key: never used, never hiding it.
    auth = file_issuer(tmp_path, [OCT, jwk_of(a, None)])
    accepted(auth, oidc(a))
    auth = file_issuer(tmp_path, [jwk_of(a, None), OCT])
    accepted(auth, oidc(a))
    auth = file_issuer(tmp_path, [{**OCT, "kid": "s"}, jwk_of(a, "k1")])
    accepted(auth, oidc(a))  # one usable key: a token without kid may use it
    secret = b"secret-secret-secret-secret-1234"
    assert refused(auth, "Bearer " + oidc(secret, "s", alg="HS256")).reason == "auth.invalid_token"


def test_an_algorithm_outside_the_issuers_list_is_named(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    a, _ = rsa_keys
    auth = file_issuer(tmp_path, [jwk_of(a, "k1")])
    error = refused(auth, "Bearer " + oidc(a, "k1", alg="RS512"))
    assert (error.reason, error.detail) == (
        "auth.invalid_token",
        "algorithm 'RS512' is not allowed",
    )


def test_oidc_leeway_is_the_issuers_setting(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    a, _ = rsa_keys
    auth = file_issuer(tmp_path, [jwk_of(a, "k1")], leeway=10.0)
    now = int(time.time())
    accepted(auth, oidc(a, "k1", exp=now - 6))
    assert refused(auth, "Bearer " + oidc(a, "k1", exp=now - 10)).reason == "auth.expired_token"
    error = refused(auth, "Bearer " + oidc(a, "k1", aud="someone-else"))
    assert error.reason == "auth.invalid_token" and "audience" in (error.detail or "").lower()


def test_an_unreadable_or_invalid_jwks_file_is_issuer_unavailable(tmp_path: Path) -> None:
    issuer = IssuerSettings(type="jwt", issuer="https://idp", jwks_file=tmp_path / "none.json")
    with pytest.raises(AuthError) as info:
        Authenticator((issuer,), tmp_path).load()
    assert info.value.reason == "auth.issuer_unavailable"
    assert (info.value.detail or "").startswith("cannot read JWKS: ")
    (tmp_path / "none.json").write_text("{not json")
    with pytest.raises(AuthError) as info:
        Authenticator((issuer,), tmp_path).load()
    assert info.value.reason == "auth.issuer_unavailable"
    assert f"{tmp_path / 'none.json'}: invalid JWKS: " in (info.value.detail or "")


Route = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A local HTTP server answering each path with a function of the request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                hits[self.path] = hits.get(self.path, 0) + 1
                routes[self.path](self)

            do_GET = do_POST = handle_one

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


def answer(body: bytes, status: int = 200, **headers: str) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        if handler.command == "POST":
            handler.rfile.read(int(handler.headers.get("Content-Length", "0")))
        handler.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    return route


def url_issuer(tmp_path: Path, url: str) -> Authenticator:
    issuer = IssuerSettings(
        type="jwt", issuer="https://idp", audience="api", jwks_url=url, algorithms=("RS256",)
    )
    auth = Authenticator((issuer,), tmp_path)
    auth.load()
    return auth


def test_jwks_documents_up_to_the_limit_are_read_whole(
    tmp_path: Path, server: Server, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    a, _ = rsa_keys
    doc = json.dumps({"keys": [jwk_of(a, "k1")]}).encode()
    # Padded to exactly 1 MiB, it arrives in many pieces; all of them count.
    server.routes["/limit"] = answer(doc + b" " * (1024 * 1024 - len(doc)))
    accepted(url_issuer(tmp_path, server.url + "/limit"), oidc(a, "k1"))
    server.routes["/over"] = answer(doc + b" " * (1024 * 1024 + 1 - len(doc)))
    error = refused(url_issuer(tmp_path, server.url + "/over"), "Bearer " + oidc(a, "k1"))
    assert (error.reason, error.detail) == ("auth.issuer_unavailable", "JWKS document too large")


def test_stray_bytes_in_a_jwks_do_not_break_its_keys(
    tmp_path: Path, server: Server, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    a, _ = rsa_keys
    jwk = json.dumps(jwk_of(a, "k1")).encode()
    server.routes["/jwks"] = answer(b'{"keys": [' + jwk + b'], "note": "caf\xe9"}')
    accepted(url_issuer(tmp_path, server.url + "/jwks"), oidc(a, "k1"))


def test_a_failed_garbled_or_redirected_jwks_fetch_is_issuer_unavailable(
    tmp_path: Path, server: Server, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    a, _ = rsa_keys
    server.routes["/jwks"] = answer(json.dumps({"keys": [jwk_of(a, "k1")]}).encode())
    server.routes["/broken"] = answer(b"oops", status=500)
    server.routes["/garbage"] = answer(b"{not json")
    error = refused(url_issuer(tmp_path, server.url + "/garbage"), "Bearer " + oidc(a, "k1"))
    assert error.reason == "auth.issuer_unavailable"
    assert (error.detail or "").startswith("invalid JWKS: ")
    # A redirect is not followed: the key set must come from the configured URL.
    server.routes["/moved"] = answer(b"", status=302, Location=server.url + "/jwks")
    for path in ("/broken", "/moved"):
        error = refused(url_issuer(tmp_path, server.url + path), "Bearer " + oidc(a, "k1"))
        assert error.reason == "auth.issuer_unavailable"
        assert (error.detail or "").startswith("JWKS fetch failed: ")
    assert server.hits.get("/jwks") is None


def test_known_keys_are_not_fetched_again_and_survive_a_reload(
    tmp_path: Path, server: Server, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    a, _ = rsa_keys
    server.routes["/jwks"] = answer(json.dumps({"keys": [jwk_of(a, "k1")]}).encode())
    auth = url_issuer(tmp_path, server.url + "/jwks")
    accepted(auth, oidc(a, "k1"))
    assert server.hits["/jwks"] == 1
    for verifier in auth._jwt.values():
        verifier.cache.fetch_started -= 3600  # a fetch would be allowed now...
    accepted(auth, oidc(a, "k1", sub="u-2"))
    assert server.hits["/jwks"] == 1  # ...but a known key needs none
    auth.load()  # a reload keeps the keys fetched from a URL
    accepted(auth, oidc(a, "k1", sub="u-3"))
    assert server.hits["/jwks"] == 1


# -- introspection ---------------------------------------------------------------------


def introspector(tmp_path: Path, url: str, **settings: Any) -> Authenticator:
    (tmp_path / "secret").write_text("s3cret\n")
    issuer = IssuerSettings(
        type="introspection",
        url=url,
        client_id="mepd",
        client_secret_file=tmp_path / "secret",
        **settings,
    )
    auth = Authenticator((issuer,), tmp_path, introspection_cache_entries=1)
    auth.load()
    return auth


def test_a_missing_client_secret_is_issuer_unavailable(tmp_path: Path) -> None:
    issuer = IssuerSettings(
        type="introspection", url="http://x", client_id="c", client_secret_file=tmp_path / "no"
    )
    with pytest.raises(AuthError) as info:
        Authenticator((issuer,), tmp_path).load()
    assert info.value.reason == "auth.issuer_unavailable"
    assert (info.value.detail or "").startswith("cannot read client secret: ")


def test_an_unreachable_introspection_endpoint_is_named(tmp_path: Path, server: Server) -> None:
    server.routes["/down"] = answer(b"busy", status=503)
    error = refused(introspector(tmp_path, server.url + "/down"), "Bearer opaque")
    assert error.reason == "auth.issuer_unavailable"
    assert (error.detail or "").startswith("introspection failed: ")
    assert "503" in (error.detail or "")


def test_introspection_answers_that_are_not_an_active_token(tmp_path: Path, server: Server) -> None:
    now = int(time.time())
    server.routes["/list"] = answer(b"[]")
    server.routes["/inactive"] = answer(b'{"active": "yes", "sub": "u"}')
    server.routes["/expired"] = answer(
        json.dumps({"active": True, "sub": "u", "exp": now}).encode()
    )
    for path, reason, detail in (
        ("/list", "auth.invalid_token", "introspection: token not active"),
        ("/inactive", "auth.invalid_token", "introspection: token not active"),
        ("/expired", "auth.expired_token", "introspection: token expired"),
    ):
        error = refused(introspector(tmp_path, server.url + path), "Bearer opaque")
        assert (error.reason, error.detail) == (reason, detail), path


def test_introspection_audience_is_compared_whole(tmp_path: Path, server: Server) -> None:
    def with_aud(aud: Any) -> Route:
        return answer(json.dumps({"active": True, "sub": "u", "aud": aud}).encode())

    server.routes["/exact"] = with_aud("mepd-rs")
    server.routes["/longer"] = with_aud("not-mepd-rs-really")  # contains it, is not it
    server.routes["/list"] = with_aud(["x", "mepd-rs"])
    for path in ("/exact", "/list"):
        caller = accepted(introspector(tmp_path, server.url + path, audience="mepd-rs"), "t")
        assert caller.issuer == server.url + path
    error = refused(introspector(tmp_path, server.url + "/longer", audience="mepd-rs"), "Bearer t")
    assert (error.reason, error.detail) == ("auth.invalid_token", "introspection: wrong audience")


def test_the_introspection_cache_is_bounded(tmp_path: Path, server: Server) -> None:
    later = int(time.time()) + 600
    server.routes["/i"] = answer(json.dumps({"active": True, "sub": "u", "exp": later}).encode())
    auth = introspector(tmp_path, server.url + "/i")  # room for one answer
    answers = run(auth, "Bearer a", "Bearer a", "Bearer b", "Bearer a")
    assert all(isinstance(a, Caller) for a in answers)
    assert server.hits["/i"] == 3  # a, b, then a again: b took a's place
