"""OpenID Connect against a real provider (node-oidc-provider, tests/oidc/).

Tokens come from the provider itself: client credentials, a scripted device-flow login,
its ID tokens, and — for claims no provider would issue (no ``exp``, a 6,000-character
subject) — claims signed with the provider's own current key through its loopback
control port. Keys are rotated and removed in the provider, tokens revoked there, and
an issuer is taken off the network. One mepd (a real ``mepd serve``) serves the module,
configured with ``issuer:`` alone for two issuers plus introspection.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mepcore.errors import AuthError
from mepd.auth import Authenticator, Caller
from mepd.settings import IssuerSettings
from tests.daemon_harness import RunningDaemon, running_daemon, write_deployment
from tests.oidc import (
    API_AUDIENCE,
    INTROSPECTION_CLIENT,
    OPAQUE_AUDIENCE,
    OpenIDProvider,
    wait_until,
)

ROOT = os.geteuid() == 0


# -- in-process: the Authenticator against the provider -----------------------------


def authenticate(auth: Authenticator, token: str) -> Caller:
    async def go() -> Caller:
        try:
            return await auth.authenticate(f"Bearer {token}")
        finally:
            await auth.aclose()

    return asyncio.run(go())


def refusal(auth: Authenticator, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        authenticate(auth, token)
    return info.value


def authenticator(tmp_path: Path, *issuers: IssuerSettings) -> Authenticator:
    auth = Authenticator(issuers, tmp_path)
    auth.load()
    return auth


def jwt_issuer(url: str, audience: str = API_AUDIENCE, **extra: Any) -> IssuerSettings:
    return IssuerSettings(type="jwt", issuer=url, audience=audience, **extra)


def claims_of(op: OpenIDProvider, name: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": op.issuers[name],
        "aud": API_AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "preferred_username": "alice",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def test_issuer_alone_is_enough_and_the_issuer_is_part_of_the_identity(
    tmp_path: Path, oidc_provider: OpenIDProvider
) -> None:
    op = oidc_provider
    auth = authenticator(tmp_path, jwt_issuer(op.issuers["a"]))
    login = op.device_login("a", "alice")
    caller = authenticate(auth, login["access_token"])
    fields = dict(caller.identities.primary.fields)
    assert fields["id"] == "alice"
    assert fields["username"] == "alice"
    assert fields["identity_provider"] == fields["iss"] == op.issuers["a"]
    assert fields["client_id"] == "mep-cli"
    assert caller.issuer == op.issuers["a"]
    assert caller.owner == f"{op.issuers['a']}|alice"
    service = authenticate(auth, op.client_credentials("a")["access_token"])
    assert service.identities.primary.id == "mep-service"  # RFC 9068: sub = client id


def test_an_id_token_is_refused_even_for_its_own_audience(
    tmp_path: Path, oidc_provider: OpenIDProvider
) -> None:
    op = oidc_provider
    # An audience equal to the client id is what lets an ID token through a check of
    # signature, issuer, audience and expiry alone.
    auth = authenticator(tmp_path, jwt_issuer(op.issuers["a"], audience="mep-cli"))
    login = op.device_login("a", "alice")
    assert jwt.decode(login["id_token"], options={"verify_signature": False})["aud"] == ("mep-cli")
    error = refusal(auth, login["id_token"])
    assert error.reason == "auth.invalid_token"
    assert "token type" in (error.detail or "")
    # Claims only an ID token carries are refused under any typ.
    forged = op.sign("a", claims_of(op, "a", aud="mep-cli", nonce="n-1"))
    assert "ID token" in (refusal(auth, forged).detail or "")


@pytest.mark.parametrize(
    ("changes", "header", "detail"),
    [
        ({"exp": None}, {}, "exp"),
        ({"iat": None}, {}, '"iat" nor "nbf"'),
        ({"aud": None}, {}, "aud"),
        ({}, {"typ": "JWT"}, "token type"),
        ({}, {"typ": None}, "token type"),
    ],
)
def test_required_claims_and_type(
    tmp_path: Path,
    oidc_provider: OpenIDProvider,
    changes: dict[str, Any],
    header: dict[str, Any],
    detail: str,
) -> None:
    op = oidc_provider
    auth = authenticator(tmp_path, jwt_issuer(op.issuers["a"]))
    assert authenticate(auth, op.sign("a", claims_of(op, "a"))).identities.primary.id == "alice"
    error = refusal(auth, op.sign("a", claims_of(op, "a", **changes), header))
    assert error.reason == "auth.invalid_token"
    assert detail in (error.detail or "")


def test_token_types_are_configurable(tmp_path: Path, oidc_provider: OpenIDProvider) -> None:
    op = oidc_provider
    auth = authenticator(
        tmp_path, jwt_issuer(op.issuers["a"], token_types=("application/at+jwt", "JWT"))
    )
    assert authenticate(auth, op.sign("a", claims_of(op, "a"), {"typ": "JWT"})).issuer
    assert authenticate(auth, op.sign("a", claims_of(op, "a"), {"typ": "AT+JWT"})).issuer
    assert refusal(auth, op.sign("a", claims_of(op, "a"), {"typ": "id+jwt"})).reason == (
        "auth.invalid_token"
    )


def test_the_jwks_is_kept_for_its_max_age_within_the_bounds(
    tmp_path: Path, oidc_provider: OpenIDProvider
) -> None:
    op = oidc_provider
    token = op.sign("a", claims_of(op, "a"))
    for max_age, bounds, expected in ((7200, (1, 60), 60), (2, (10, 3600), 10)):
        op._control("a", "max-age", {"seconds": max_age})
        try:
            auth = authenticator(
                tmp_path,
                jwt_issuer(op.issuers["a"], jwks_min_age=bounds[0], jwks_max_age=bounds[1]),
            )
            authenticate(auth, token)
        finally:
            op._control("a", "max-age", {"seconds": 2})
        cache = auth._jwt[op.issuers["a"]].cache
        kept = cache.fresh_until - cache.fetch_started
        assert expected <= kept < expected + 5  # the bound, plus the fetch itself


def test_forged_key_ids_cannot_starve_a_rotated_key(
    tmp_path: Path, oidc_provider: OpenIDProvider
) -> None:
    op = oidc_provider
    auth = authenticator(tmp_path, jwt_issuer(op.issuers["a"]))
    authenticate(auth, op.sign("a", claims_of(op, "a")))
    op.rotate("a")
    genuine = op.client_credentials("a")["access_token"]
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = [
        jwt.encode(
            claims_of(op, "a"),
            stranger,
            algorithm="RS256",
            headers={"kid": uuid.uuid4().hex, "typ": "at+jwt"},
        )
        for _ in range(30)
    ]
    before = op.jwks_hits("a")

    async def flood() -> list[Any]:
        try:
            tasks = [auth.authenticate(f"Bearer {t}") for t in forged[:15]]
            tasks.append(auth.authenticate(f"Bearer {genuine}"))
            tasks += [auth.authenticate(f"Bearer {t}") for t in forged[15:]]
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await auth.aclose()

    results = asyncio.run(flood())
    assert isinstance(results[15], Caller), results[15]
    assert all(isinstance(r, AuthError) and r.reason == "auth.invalid_token" for r in results[:15])
    # 31 unknown key ids, a handful of fetches (one per interval, shared by waiters).
    assert op.jwks_hits("a") - before <= 3


def test_known_keys_outlive_an_outage_for_the_grace_then_503(
    tmp_path: Path, oidc_provider: OpenIDProvider
) -> None:
    op = oidc_provider
    auth = authenticator(tmp_path, jwt_issuer(op.issuers["b"]))
    token = op.sign("b", claims_of(op, "b"))
    authenticate(auth, token)
    cache = auth._jwt[op.issuers["b"]].cache
    op.down("b")
    try:
        # The keys' age is up (as after max-age): the refresh fails, the keys in hand
        # are still used within the grace...
        cache.fresh_until = cache.fetch_started = time.monotonic() - 10
        assert authenticate(auth, token).issuer == op.issuers["b"]
        assert "JWKS fetch failed" in cache.last_error
        # ...and past it the answer depends on the provider: 503, on every retry.
        cache.stale_until = cache.fetch_started = time.monotonic() - 10
        for _ in range(2):
            error = refusal(auth, token)
            assert error.reason == "auth.issuer_unavailable"
            cache.fetch_started -= 10  # the next fetch is due again
    finally:
        op.up("b")
    assert authenticate(auth, token).issuer == op.issuers["b"]


def test_introspection_needs_the_audience_and_follows_revocation(
    tmp_path: Path, oidc_provider: OpenIDProvider
) -> None:
    op = oidc_provider
    (tmp_path / "secret").write_text(INTROSPECTION_CLIENT[1])
    settings = IssuerSettings(
        type="introspection",
        issuer=op.issuers["a"],  # the endpoint comes from discovery
        audience=OPAQUE_AUDIENCE,
        client_id=INTROSPECTION_CLIENT[0],
        client_secret_file=tmp_path / "secret",
        cache_seconds=0,
        accept_client_tokens=True,
    )
    auth = authenticator(tmp_path, settings)
    opaque = op.client_credentials("a", "urn:mep:opaque")["access_token"]
    caller = authenticate(auth, opaque)
    assert caller.identities.primary.id == "mep-service"  # no sub: the client id
    assert caller.identities.primary.get("client_id") == "mep-service"
    assert caller.issuer == op.issuers["a"]  # the configured issuer, not the URL
    assert caller.owner == f"{op.issuers['a']}|mep-service"
    no_audience = op.client_credentials("a", None)["access_token"]
    assert "no audience" in (refusal(auth, no_audience).detail or "")
    op.revoke("a", opaque)
    assert refusal(auth, opaque).reason == "auth.invalid_token"
    strict = authenticator(tmp_path, attrs_evolve(settings, accept_client_tokens=False))
    fresh = op.client_credentials("a", "urn:mep:opaque")["access_token"]
    assert "'sub'" in (refusal(strict, fresh).detail or "")


def attrs_evolve(settings: IssuerSettings, **changes: Any) -> IssuerSettings:
    import attrs

    return attrs.evolve(settings, **changes)


# -- a real mepd ----------------------------------------------------------------------


class Site:
    def __init__(self, daemon: RunningDaemon, op: OpenIDProvider, accounts: dict[str, str]):
        self.daemon = daemon
        self.op = op
        self.accounts = accounts  # issuer name -> account alice of that issuer maps to

    def probe(self, token: str) -> httpx.Response:
        """A request that needs only authentication (404 task.not_found when the token
        is accepted: someone else's task and a missing one look the same)."""
        with self.daemon.client(token, timeout=30) as client:
            return client.get(f"/v1/tasks/{uuid.uuid4()}")

    def accepted(self, token: str) -> bool:
        r = self.probe(token)
        assert r.status_code in (401, 404), r.text
        return r.status_code == 404

    def audit(self) -> list[dict[str, Any]]:
        path = self.daemon.state_dir / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line]


def _mapping(op: OpenIDProvider, accounts: dict[str, str]) -> list[dict[str, Any]]:
    rules = [
        {
            "source": "{identity_provider} {username}",
            "match": re.escape(f"{op.issuers[name]} alice"),
            "output": account,
        }
        for name, account in accounts.items()
    ]
    return [
        {
            "DATA_TYPE": "expression_identity_mapping#1.0.0",
            "mep_match_syntax": "python",
            "mappings": rules,
        }
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, oidc_provider: OpenIDProvider) -> Iterator[Site]:
    from tests import accounts as posix

    op = oidc_provider
    made = [posix.create_account().pw_name for _ in range(2)] if ROOT else ["nobody1", "nobody2"]
    accounts = dict(zip(("a", "b"), made, strict=True))
    top = tmp_path_factory.mktemp("oidc-site")
    (top / "introspection-secret").parent.mkdir(parents=True, exist_ok=True)
    secret = top / "introspection-secret"
    secret.write_text(INTROSPECTION_CLIENT[1])
    secret.chmod(0o600)
    jwt_extra = {"audience": API_AUDIENCE, "jwks_min_age": 1}
    issuers = [
        {"type": "local"},
        {"type": "jwt", "issuer": op.issuers["a"], **jwt_extra},
        {"type": "jwt", "issuer": op.issuers["b"], **jwt_extra},
        {
            "type": "introspection",
            "issuer": op.issuers["a"],
            "audience": OPAQUE_AUDIENCE,
            "client_id": INTROSPECTION_CLIENT[0],
            "client_secret_file": str(secret),
            "cache_seconds": 0,
            "accept_client_tokens": True,
        },
    ]
    config = write_deployment(
        top,
        python="/usr/bin/python3",
        # Issuer b's callers may not read endpoint status (a policy on the issuer).
        policy_extra=[f"p, issuer:{op.issuers['b']}, hpc, user:*, read_status, -, deny"],
        settings_extra={"issuers": issuers},
    )
    (top / "mapping.json").write_text(json.dumps(_mapping(op, accounts)))
    try:
        with running_daemon(config, top / "state") as daemon:
            yield Site(daemon, op, accounts)
    finally:
        if ROOT:
            for name in made:
                posix.delete_account(name)


def test_daemon_accepts_tokens_of_both_issuers_found_by_discovery(site: Site) -> None:
    for name in ("a", "b"):
        assert site.accepted(site.op.client_credentials(name)["access_token"])
        assert site.accepted(site.op.device_login(name, "carol")["access_token"])


def test_a_new_key_is_accepted_within_5_s_of_a_rotation(site: Site) -> None:
    op = site.op
    assert site.accepted(op.client_credentials("a")["access_token"])
    kids = op.rotate("a")
    token = op.client_credentials("a")["access_token"]
    assert jwt.get_unverified_header(token)["kid"] == kids[0]
    assert wait_until(lambda: site.accepted(token), deadline=5.0)


def test_a_removed_key_is_refused_after_the_refresh(site: Site) -> None:
    op = site.op
    op.rotate("a")
    old = op.client_credentials("a")["access_token"]
    assert site.accepted(old)
    op.rotate("a")
    assert site.accepted(old)  # still listed by the provider
    op.retire("a")  # the old key leaves the JWKS
    refused = wait_until(lambda: not site.accepted(old), deadline=15.0)
    assert refused, "a token of a removed key was still accepted"
    error = site.probe(old).json()["error"]
    assert error["reason"] == "auth.invalid_token"


@pytest.mark.parametrize(
    "sub",
    ["alice\nroot", "alice\x1b[31m", "\x00", "x" * 6000, "ü" * 6000],
    ids=["newline", "escape", "nul", "6000", "6000-non-ascii"],
)
def test_identities_with_control_characters_or_6000_characters_get_4xx(
    site: Site, sub: str
) -> None:
    op = site.op
    for claims in (
        claims_of(op, "a", sub=sub),
        claims_of(op, "a", preferred_username=sub),
        claims_of(op, "a", email=sub),
    ):
        token = op.sign("a", claims)
        with site.daemon.client(token, timeout=30) as client:
            for r in (
                client.post("/v1/endpoints/hpc/submit", json={"tasks": []}),
                client.get("/v1/endpoints/hpc/status"),
            ):
                assert 400 <= r.status_code < 500, (r.status_code, r.text)
                assert r.json()["error"]["reason"] == "auth.invalid_token"


def test_a_jwt_without_exp_is_refused_by_the_daemon(site: Site) -> None:
    op = site.op
    assert site.accepted(op.sign("a", claims_of(op, "a")))
    assert not site.accepted(op.sign("a", claims_of(op, "a", exp=None)))


def test_an_id_token_is_refused_by_the_daemon(site: Site) -> None:
    login = site.op.device_login("a", "alice")
    assert site.accepted(login["access_token"])
    assert not site.accepted(login["id_token"])


@pytest.mark.root
def test_the_same_sub_of_two_issuers_maps_to_two_accounts(site: Site) -> None:
    op = site.op
    tokens = {name: op.device_login(name, "alice")["access_token"] for name in ("a", "b")}
    subs = {jwt.decode(t, options={"verify_signature": False})["sub"] for t in tokens.values()}
    assert subs == {"alice"}
    with site.daemon.client(tokens["a"]) as client:
        r = client.get("/v1/endpoints/hpc/status")
        assert r.status_code == 200, r.text
    with site.daemon.client(tokens["b"]) as client:
        r = client.get("/v1/endpoints/hpc/status")
        # Mapped (to b's account), then denied by the policy line on issuer b.
        assert r.status_code == 403, r.text
    resolved = {
        rec["issuer"]: rec["account"]
        for rec in site.audit()
        if rec.get("event") == "identity.mapping_resolved" and rec.get("identities") == ["alice"]
    }
    assert resolved == {op.issuers["a"]: site.accounts["a"], op.issuers["b"]: site.accounts["b"]}
    decided = [
        rec
        for rec in site.audit()
        if rec.get("event") == "authz.decided" and rec.get("issuer") == op.issuers["b"]
    ]
    assert decided and decided[-1]["allowed"] is False


def test_an_unreachable_issuer_is_503_with_retry_after_on_every_retry(site: Site) -> None:
    op = site.op
    op.rotate("b")  # a key the daemon has not seen: the answer needs the provider
    token = op.client_credentials("b")["access_token"]
    op.down("b")
    try:
        for _ in range(3):
            r = site.probe(token)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["reason"] == "auth.issuer_unavailable"
            assert int(r.headers["Retry-After"]) > 0
    finally:
        op.up("b")
    assert wait_until(lambda: site.accepted(token), deadline=10.0)


def test_introspection_over_the_daemon_and_its_provider_down(site: Site) -> None:
    op = site.op
    opaque = op.client_credentials("a", "urn:mep:opaque")["access_token"]
    assert site.accepted(opaque)
    assert not site.accepted(op.client_credentials("a", None)["access_token"])  # no aud
    op.down("a")
    try:
        for _ in range(2):
            r = site.probe(opaque)
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"]
    finally:
        op.up("a")
    op.revoke("a", opaque)
    assert not site.accepted(opaque)


def test_every_issuer_is_recorded_in_the_audit_log(site: Site) -> None:
    op = site.op
    token = op.device_login("a", f"u{secrets.token_hex(3)}")["access_token"]
    with site.daemon.client(token) as client:
        assert client.get("/v1/endpoints/hpc/status").status_code == 403  # no mapping
    failed = [r for r in site.audit() if r.get("event") == "identity.mapping_failed"]
    assert failed and failed[-1]["issuer"] == op.issuers["a"]
