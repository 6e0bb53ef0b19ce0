"""Authentication: bearer tokens turned into a ``Caller`` (identity set + attributes).

Three kinds of issuer, configured in the settings:

- ``local``: mepd's own issuer. An Ed25519 key in the state directory (created with
  mode 0600 on first use) signs JWTs (``EdDSA``); ``mepd token issue`` prints one.
- ``jwt``: access tokens of an OpenID Connect provider (RFC 9068), verified against its
  JWKS: a file, a ``jwks_url``, or — with ``issuer`` alone — the ``jwks_uri`` of the
  provider's ``.well-known/openid-configuration``. The ``typ`` header must be one of
  the issuer's ``token_types`` (``at+jwt`` by default), so an ID token is never an
  access token; ``exp``, ``iat`` or ``nbf``, ``aud`` and ``iss`` are required. Only
  asymmetric algorithms are ever accepted (never ``none``; no HMAC, so a public key
  can never act as an HMAC secret).
- ``introspection``: OAuth2 token introspection (RFC 7662) at ``url`` (or the
  provider's ``introspection_endpoint``); answers are cached for at most the token's
  remaining lifetime and the configured ``cache_seconds``, in a cache bounded in
  entries. With an ``audience`` configured an answer must name it in ``aud``.

The JWKS cache follows the provider (``_KeyCache``): it is used for the answer's
``Cache-Control`` max-age (within the issuer's ``jwks_min_age``/``jwks_max_age``),
then fetched again, and a key missing from the newest set is no longer trusted. An
unknown ``kid`` triggers a fetch that started after the request arrived, at most one
per ``KID_REFRESH_INTERVAL`` per issuer: a flood of forged key ids costs the provider
one request a second and delays a genuine new-key token by at most that interval.
When the answer depends on a provider that cannot be reached, the reason is
``auth.issuer_unavailable`` (HTTP 503, retry-able), on every retry alike.

The issuer is part of the identity: the primary identity carries it as the fields
``identity_provider`` and ``iss`` (for mapping rules), ``Caller.issuer`` is recorded
in the audit log and is part of ``Caller.owner`` (task ownership). Identity fields with
control characters or longer than ``MAX_FIELD_CHARS`` make the token invalid.

Library: PyJWT parses JWKS documents and checks signatures and claims; this module
writes no crypto. PyJWT's own ``PyJWKClient`` is not used because it fetches with
blocking ``urllib`` on the event loop, and neither honours ``Cache-Control`` nor
rate-limits per issuer; fetches here are ``httpx`` (async, bounded in size and time,
no redirects). This module deliberately knows nothing about mapping or policy: it
answers "who is this", or raises ``AuthError`` with a reason code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mepcore.errors import AuthError
from mepcore.types import Identity, IdentitySet
from mepd.settings import ASYMMETRIC_ALGORITHMS, ClaimNames, IssuerSettings

MAX_TOKEN_BYTES = 16 * 1024
MAX_JWKS_BYTES = 1024 * 1024
MAX_FIELD_CHARS = 1024
# Unknown key ids: at most one JWKS fetch per issuer per this many seconds.
KID_REFRESH_INTERVAL = 1.0
# A JWKS answer without a max-age is used this long (within the issuer's bounds).
DEFAULT_JWKS_AGE = 300.0
# When a due refresh fails, the keys in hand are still used this much longer.
JWKS_STALE_GRACE = 600.0
FETCH_TIMEOUT = 5.0
LOCAL_KEY_FILE = "local_issuer.pem"
LOCAL_AUDIENCE = "mepd"
VERIFIED_CACHE_SECONDS = 300.0
# Claims only an ID token carries (OpenID Connect Core 2, 3.1.3.6, 3.3.2.11).
ID_TOKEN_CLAIMS = ("nonce", "at_hash", "c_hash", "s_hash")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?([0-9]{1,10})\"?\s*(?:,|$)", re.IGNORECASE)


@attrs.frozen
class Caller:
    """An authenticated caller: the identity set and what the issuer said about it."""

    identities: IdentitySet
    issuer: str
    mfa: bool = False
    auth_time: float | None = None

    @property
    def owner(self) -> str:
        """The key tasks are owned by: the issuer plus the primary identity id."""
        return f"{self.issuer}|{self.identities.primary.id}"

    def auth_age(self, now: float) -> float | None:
        return None if self.auth_time is None else max(0.0, now - self.auth_time)


def local_identity_id(username: str) -> str:
    """Stable identity id of a local-issuer identity (same username, same id)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mepd-local:{username}"))


def _check_field(name: str, value: str) -> str:
    """An identity field as the token gave it, refused when it cannot be a name."""
    if len(value) > MAX_FIELD_CHARS:
        raise AuthError("auth.invalid_token", f"claim for {name!r} is too long")
    if not value.isprintable():
        raise AuthError("auth.invalid_token", f"claim for {name!r} has control characters")
    return value


def _check_identity(identity: Identity) -> Identity:
    for name, value in identity.fields.items():
        if isinstance(value, str):
            _check_field(name, value)
    return identity


def _linked_identities(claims: Mapping[str, Any], names: ClaimNames) -> list[Identity]:
    linked = claims.get(names.linked) or []
    if not isinstance(linked, list) or len(linked) > 64:
        raise AuthError("auth.invalid_token", f"claim {names.linked!r} is not a short list")
    found: list[Identity] = []
    for item in linked:
        if isinstance(item, str) and item:
            other = Identity(item, {"id": item})
        elif isinstance(item, Mapping):
            try:
                other = Identity.from_mapping(item)
            except Exception as exc:
                raise AuthError("auth.invalid_token", "invalid linked identity") from exc
        else:
            raise AuthError("auth.invalid_token", "invalid linked identity")
        found.append(_check_identity(other))
    return found


def caller_from_claims(claims: Mapping[str, Any], names: ClaimNames, issuer: str) -> Caller:
    """Build a caller from verified claims; a claim of the wrong type is an invalid token.

    The primary identity gets the issuer as ``identity_provider`` and ``iss``, and the
    OAuth client as ``client_id`` when the token names one."""
    ident = claims.get(names.id)
    if not isinstance(ident, str) or not ident:
        raise AuthError("auth.invalid_token", f"claim {names.id!r} missing or not a string")
    fields: dict[str, Any] = {"id": _check_field("id", ident)}
    for field in ("username", "email", "name"):
        value = claims.get(getattr(names, field))
        if isinstance(value, str):
            fields[field] = _check_field(field, value)
    client = claims.get("client_id")
    if isinstance(client, str) and client:
        fields["client_id"] = _check_field("client_id", client)
    fields["identity_provider"] = fields["iss"] = issuer
    identities = [Identity(ident, fields)]
    for other in _linked_identities(claims, names):
        if all(other.id != i.id for i in identities):
            identities.append(other)
    mfa_claim = claims.get(names.mfa)
    mfa = mfa_claim is True or (isinstance(mfa_claim, list) and "mfa" in mfa_claim)
    auth_time = claims.get(names.auth_time, claims.get("iat"))
    return Caller(
        identities=IdentitySet(tuple(identities)),
        issuer=issuer,
        mfa=mfa,
        auth_time=float(auth_time) if isinstance(auth_time, int | float) else None,
    )


# -- the local issuer -----------------------------------------------------------------


def load_or_create_local_key(state_dir: Path) -> Ed25519PrivateKey:
    """The local issuer's key; created (mode 0600, never overwritten) if absent."""
    path = state_dir / LOCAL_KEY_FILE
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            data = path.read_bytes()  # another process created it first
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            return key
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise AuthError("auth.issuer_unavailable", f"{path} is not an Ed25519 private key")
    return loaded


def issue_local_token(
    key: Ed25519PrivateKey,
    settings: IssuerSettings,
    username: str,
    *,
    linked: Sequence[str] = (),
    mfa: bool = False,
    ttl: float = 3600.0,
    now: float | None = None,
    email: str | None = None,
) -> str:
    """A token of the local issuer for ``username`` (its identity id is derived from it)."""
    now = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "aud": settings.audience or LOCAL_AUDIENCE,
        "sub": local_identity_id(username),
        "preferred_username": username,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + ttl),
        "jti": uuid.uuid4().hex,
        "auth_time": int(now),
        "mfa": bool(mfa),
        "identity_set": [{"id": local_identity_id(name), "username": name} for name in linked],
    }
    if email:
        claims["email"] = email
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": "at+jwt"})


# -- fetching from a provider ---------------------------------------------------------


async def _get_bounded(http: httpx.AsyncClient, url: str, what: str) -> tuple[bytes, httpx.Headers]:
    """GET a small document (no redirects, bounded in size and time)."""
    try:
        async with http.stream("GET", url, timeout=FETCH_TIMEOUT) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise AuthError("auth.issuer_unavailable", f"{what} document too large")
            return bytes(body), response.headers
    except httpx.HTTPError as exc:
        raise AuthError("auth.issuer_unavailable", f"{what} fetch failed: {exc}") from exc


async def discover(http: httpx.AsyncClient, issuer: str) -> Mapping[str, Any]:
    """The provider's metadata (OpenID Connect Discovery 1.0), checked to name
    ``issuer`` exactly as configured."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    body, _ = await _get_bounded(http, url, "discovery")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise AuthError("auth.issuer_unavailable", f"{url}: not JSON") from exc
    if not isinstance(doc, Mapping) or doc.get("issuer") != issuer:
        raise AuthError("auth.issuer_unavailable", f"{url} does not describe {issuer!r}")
    return doc


def _endpoint_of(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        raise AuthError("auth.issuer_unavailable", f"discovery document has no {name}")
    return value


def _max_age(headers: httpx.Headers) -> float | None:
    """The ``Cache-Control`` max-age of an answer (0 for no-store/no-cache), or None."""
    value = headers.get("cache-control", "")
    if re.search(r"no-store|no-cache", value, re.IGNORECASE):
        return 0.0
    found = _MAX_AGE.search(value)
    return float(found.group(1)) if found else None


def _parse_jwks(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
        keyset = jwt.PyJWKSet.from_dict(doc)
    except (ValueError, jwt.PyJWTError) as exc:
        raise AuthError("auth.issuer_unavailable", f"invalid JWKS: {exc}") from exc
    keys: dict[str, Any] = {}
    for jwk in keyset.keys:
        if jwk.key_type == "oct":
            continue  # symmetric keys are never trusted for verification
        keys[jwk.key_id or ""] = jwk.key
    return keys


# -- the JWKS cache -------------------------------------------------------------------


@attrs.define
class _KeyCache:
    """The keys of one issuer: static (a file, the local key) or fetched from the
    provider and kept as its ``Cache-Control`` says (monotonic clock throughout)."""

    settings: IssuerSettings
    keys: dict[str, Any] = attrs.field(factory=dict)  # kid ("" if none) -> key object
    static: bool = False
    fetch_started: float = -math.inf  # the last fetch attempt
    fetch_ok: bool = False  # how that attempt went
    fresh_until: float = -math.inf  # used without asking the provider until then
    stale_until: float = -math.inf  # used after a failed refresh until then
    last_error: str = ""
    jwks_url: str | None = None  # configured, or found by discovery
    _locks: dict[int, asyncio.Lock] = attrs.field(factory=dict)

    def _lock(self) -> asyncio.Lock:
        # One lock per event loop (tests run several loops; the daemon runs one).
        loop = id(asyncio.get_running_loop())
        if loop not in self._locks:
            self._locks.clear()
            self._locks[loop] = asyncio.Lock()
        return self._locks[loop]

    def adopt(self, old: _KeyCache) -> None:
        """Carry the fetched state of the cache a reload replaces."""
        if old.settings.jwks_url == self.settings.jwks_url and not self.static:
            for name in ("keys", "fetch_started", "fetch_ok", "fresh_until", "stale_until"):
                setattr(self, name, getattr(old, name))
            self.jwks_url = old.jwks_url

    def find(self, kid: str) -> Any:
        if kid in self.keys:
            return self.keys[kid]
        if not kid and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return None

    async def fresh(self, http: httpx.AsyncClient) -> None:
        """Refresh the keys when their age is up; stale keys are used for a grace time
        while the provider cannot be reached, then it is ``auth.issuer_unavailable``."""
        if self.static or time.monotonic() < self.fresh_until:
            return
        async with self._lock():
            now = time.monotonic()
            if now < self.fresh_until:
                return
            if now - self.fetch_started >= KID_REFRESH_INTERVAL:
                with contextlib.suppress(AuthError):  # its error is kept in last_error
                    await self._fetch(http)
            if time.monotonic() >= max(self.fresh_until, self.stale_until):
                raise AuthError("auth.issuer_unavailable", self.last_error or "no JWKS yet")

    async def refresh_for(self, http: httpx.AsyncClient, arrived: float) -> None:
        """A fetch that started after ``arrived`` (an unknown kid): the one another
        request already waited for, or a new one at most once per interval."""
        if self.static:
            return
        async with self._lock():
            if self.fetch_started < arrived:
                wait = self.fetch_started + KID_REFRESH_INTERVAL - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the per-issuer rate limit
                with contextlib.suppress(AuthError):  # its error is kept in last_error
                    await self._fetch(http)
            if not self.fetch_ok:
                raise AuthError("auth.issuer_unavailable", self.last_error or "JWKS fetch failed")

    async def _fetch(self, http: httpx.AsyncClient) -> None:
        self.fetch_started = time.monotonic()
        self.fetch_ok = False
        try:
            if self.jwks_url is None:
                doc = await discover(http, self.settings.issuer)
                self.jwks_url = _endpoint_of(doc, "jwks_uri")
            body, headers = await _get_bounded(http, self.jwks_url, "JWKS")
            keys = _parse_jwks(body.decode("utf-8", "replace"))
        except AuthError as exc:
            self.last_error = exc.detail
            if self.settings.jwks_url is None:
                self.jwks_url = None  # discover again next time
            raise
        age = _max_age(headers)
        age = DEFAULT_JWKS_AGE if age is None else age
        age = min(max(age, self.settings.jwks_min_age), self.settings.jwks_max_age)
        now = time.monotonic()
        self.keys = keys  # keys missing from the newest set are dropped
        self.fresh_until = now + age
        self.stale_until = now + age + JWKS_STALE_GRACE
        self.fetch_ok = True


# -- verification ---------------------------------------------------------------------


def _normal_type(value: str) -> str:
    """A ``typ`` as RFC 7515 4.1.9 compares it: case-insensitive, ``application/``
    optional."""
    value = value.lower()
    return value.removeprefix("application/")


@attrs.define
class _JwtVerifier:
    """Verifies JWTs of one issuer (the local one or an OIDC provider)."""

    settings: IssuerSettings
    algorithms: tuple[str, ...]
    token_types: frozenset[str] = frozenset({"at+jwt"})
    cache: _KeyCache = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.cache is None:
            self.cache = _KeyCache(self.settings)
            self.cache.jwks_url = self.settings.jwks_url

    def load_static(self, public_key: Ed25519PublicKey | None = None) -> None:
        if public_key is not None:
            self.cache.keys = {"": public_key}
            self.cache.static = True
        elif self.settings.jwks_file is not None:
            path = self.settings.jwks_file
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise AuthError("auth.issuer_unavailable", f"cannot read JWKS: {exc}") from exc
            try:
                self.cache.keys = _parse_jwks(text)
            except AuthError as exc:
                raise AuthError("auth.issuer_unavailable", f"{path}: {exc.detail}") from exc
            self.cache.static = True

    async def key_for(self, kid: str, http: httpx.AsyncClient, arrived: float) -> Any:
        """The key for ``kid`` in the newest set, or None."""
        await self.cache.fresh(http)
        key = self.cache.find(kid)
        if key is None and not self.cache.static:
            await self.cache.refresh_for(http, arrived)
            key = self.cache.find(kid)
        return key

    def _check_header(self, header: Mapping[str, Any]) -> str:
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthError("auth.invalid_token", f"algorithm {alg!r} is not allowed")
        typ = header.get("typ")
        if typ is not None and not isinstance(typ, str):
            raise AuthError("auth.invalid_token", "typ is not a string")
        if _normal_type(typ or "") not in self.token_types:
            raise AuthError(
                "auth.invalid_token",
                f"token type {typ!r} is not an access token type of this issuer",
            )
        return str(alg)

    async def verify(
        self, token: str, header: Mapping[str, Any], http: httpx.AsyncClient, arrived: float
    ) -> Caller:
        alg = self._check_header(header)
        raw_kid = header.get("kid")
        kid = raw_kid if isinstance(raw_kid, str) else ""
        key = await self.key_for(kid, http, arrived)
        if key is None:
            raise AuthError("auth.invalid_token", f"no key with kid {kid!r}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.settings.audience or LOCAL_AUDIENCE,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway if self.settings.type == "jwt" else 5.0,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("auth.expired_token", str(exc)) from exc
        except jwt.PyJWTError as exc:
            raise AuthError("auth.invalid_token", str(exc)) from exc
        if "iat" not in claims and "nbf" not in claims:
            raise AuthError("auth.invalid_token", 'token has neither "iat" nor "nbf"')
        if any(name in claims for name in ID_TOKEN_CLAIMS) or claims.get("typ") == "ID":
            raise AuthError("auth.invalid_token", "an ID token is not an access token")
        return caller_from_claims(claims, self.settings.claims, self.settings.issuer)

    def trusts(self, kid: str) -> bool:
        return self.cache.find(kid) is not None


@attrs.define
class _Introspector:
    """RFC 7662 introspection with a cache bounded by entries and token expiry."""

    settings: IssuerSettings
    max_entries: int
    _secret: str = ""
    _cache: dict[str, tuple[float, Caller]] = attrs.field(factory=dict)
    _url: str | None = None  # configured, or found by discovery

    def load_static(self) -> None:
        assert self.settings.client_secret_file is not None
        try:
            self._secret = self.settings.client_secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AuthError("auth.issuer_unavailable", f"cannot read client secret: {exc}") from exc
        self._url = self.settings.url

    async def _ask(self, token: str, http: httpx.AsyncClient) -> Any:
        assert self.settings.client_id is not None
        if self._url is None:
            doc = await discover(http, self.settings.issuer)
            self._url = _endpoint_of(doc, "introspection_endpoint")
        try:
            response = await http.post(
                self._url,
                data={"token": token},
                auth=(self.settings.client_id, self._secret),
                timeout=FETCH_TIMEOUT,
            )
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self._url = self.settings.url  # discover again next time
            raise AuthError("auth.issuer_unavailable", f"introspection failed: {exc}") from exc

    def _claims(self, answer: Any, now: float) -> Mapping[str, Any]:
        """The claims of an active answer (checked), with the client as the subject of
        a token without one when the issuer accepts client tokens."""
        if not isinstance(answer, Mapping) or answer.get("active") is not True:
            raise AuthError("auth.invalid_token", "introspection: token not active")
        exp = answer.get("exp")
        if isinstance(exp, int | float) and exp <= now:
            raise AuthError("auth.expired_token", "introspection: token expired")
        if self.settings.audience is not None:
            aud = answer.get("aud")
            auds = aud if isinstance(aud, list) else [aud]
            if aud is None:
                raise AuthError("auth.invalid_token", "introspection: no audience")
            if self.settings.audience not in auds:
                raise AuthError("auth.invalid_token", "introspection: wrong audience")
        id_claim = self.settings.claims.id
        client = answer.get("client_id")
        if id_claim not in answer and self.settings.accept_client_tokens and client:
            return {**answer, id_claim: client}
        return answer

    async def verify(self, token: str, http: httpx.AsyncClient) -> Caller:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[digest]
        claims = self._claims(await self._ask(token, http), now)
        caller = caller_from_claims(claims, self.settings.claims, self.settings.issuer)
        exp = claims.get("exp")
        until = now + self.settings.cache_seconds
        if isinstance(exp, int | float):
            until = min(until, float(exp))
        if until > now:
            while len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[digest] = (until, caller)
        return caller


@attrs.frozen
class IssuerKeys:
    """Every issuer's keys, read and not yet in force."""

    verifiers: dict[str, _JwtVerifier]
    introspectors: list[_Introspector]


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("auth.missing_token", "no Authorization header")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("auth.missing_token", "Authorization is not a bearer token")
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("auth.invalid_token", "token too long")
    return token


def _peek(token: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The header and claims of a JWT, unverified (to choose the issuer); no header
    when the token is not a JWT. One parse of the token gives both (what
    ``get_unverified_header`` and ``decode`` check, at half the cost of the two)."""
    try:
        decoded = jwt.api_jwt.decode_complete(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None, {}
    return decoded["header"], decoded["payload"]


@attrs.define
class Authenticator:
    """All configured issuers. ``reload()`` re-reads key files; ``authenticate`` is async."""

    issuers: tuple[IssuerSettings, ...]
    state_dir: Path
    introspection_cache_entries: int = 10_000
    _jwt: dict[str, _JwtVerifier] = attrs.field(factory=dict)
    _introspectors: list[_Introspector] = attrs.field(factory=list)
    _http: httpx.AsyncClient | None = None
    # Verified JWTs: token -> (valid until, caller, kid). A signature check costs
    # ~0.3 ms; a client sends the same token many times. Bounded, never past the
    # expiry, and only while the issuer's newest key set still holds the token's key.
    _verified: dict[str, tuple[float, Caller, str]] = attrs.field(factory=dict)

    def load(self) -> None:
        """Read the keys (creating the local issuer's key on first start)."""
        self.install(self.prepare())

    def install(self, keys: IssuerKeys) -> None:
        """Put keys read by ``prepare`` in force, all at once."""
        self._jwt = keys.verifiers
        self._introspectors = keys.introspectors
        self._verified = {}

    def _jwt_verifier(self, issuer: IssuerSettings) -> _JwtVerifier:
        algs = tuple(a for a in issuer.algorithms if a in ASYMMETRIC_ALGORITHMS)
        types = frozenset(_normal_type(t) for t in issuer.token_types)
        verifier = _JwtVerifier(issuer, algs, types)
        old = self._jwt.get(issuer.issuer)
        if issuer.jwks_file is not None:
            verifier.load_static()
        elif old is not None:
            verifier.cache.adopt(old.cache)  # fetched keys carry over a reload
        return verifier

    def prepare(self) -> IssuerKeys:
        """Read every issuer's keys without putting them in force (a reload installs
        them only if everything else loaded too)."""
        verifiers: dict[str, _JwtVerifier] = {}
        introspectors: list[_Introspector] = []
        for issuer in self.issuers:
            if issuer.type == "local":
                # mep's own tokens: "at+jwt", or "JWT" (issued before mep set the type).
                verifier = _JwtVerifier(issuer, ("EdDSA",), frozenset({"at+jwt", "jwt", ""}))
                verifier.load_static(load_or_create_local_key(self.state_dir).public_key())
                verifiers[issuer.issuer] = verifier
            elif issuer.type == "jwt":
                verifiers[issuer.issuer] = self._jwt_verifier(issuer)
            else:
                intro = _Introspector(issuer, self.introspection_cache_entries)
                intro.load_static()
                introspectors.append(intro)
        return IssuerKeys(verifiers, introspectors)

    def login_metadata(self) -> dict[str, Any]:
        """What a client needs to log in (public: ``GET /v1/auth``): each OpenID
        provider's issuer and audience, the resource indicator to ask tokens for when
        the provider needs one, and the public client for device login when the
        administrator named one."""
        issuers = []
        for issuer in self.issuers:
            if issuer.type != "jwt":
                continue
            entry: dict[str, Any] = {"issuer": issuer.issuer, "audience": issuer.audience}
            if issuer.login_resource:
                entry["resource"] = issuer.login_resource
            if issuer.device_client_id:
                entry["device_client_id"] = issuer.device_client_id
                entry["scopes"] = list(issuer.device_scopes)
            issuers.append(entry)
        return {"issuers": issuers}

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        return self._http

    async def authenticate(self, authorization: str | None) -> Caller:
        token = _bearer(authorization)
        arrived = time.monotonic()
        header, unverified = _peek(token)
        if header is not None:
            iss = unverified.get("iss")
            verifier = self._jwt.get(iss) if isinstance(iss, str) else None
            if verifier is not None:
                return await self._verify_jwt(verifier, token, header, unverified, arrived)
        if self._introspectors:
            last: AuthError | None = None
            for intro in self._introspectors:
                try:
                    return await intro.verify(token, self._client())
                except AuthError as exc:
                    last = exc
            assert last is not None
            raise last
        if header is None:
            raise AuthError("auth.invalid_token", "token is not a JWT")
        raise AuthError("auth.unknown_issuer", f"issuer {unverified.get('iss')!r} not trusted")

    async def _verify_jwt(
        self,
        verifier: _JwtVerifier,
        token: str,
        header: Mapping[str, Any],
        unverified: Mapping[str, Any],
        arrived: float,
    ) -> Caller:
        http = self._client()
        hit = self._verified.get(token)
        if hit is not None:
            if hit[0] > time.time():
                await verifier.cache.fresh(http)
                if verifier.trusts(hit[2]):
                    return hit[1]
            del self._verified[token]
        caller = await verifier.verify(token, header, http, arrived)
        exp = unverified.get("exp")
        if isinstance(exp, int | float):
            until = min(float(exp), time.time() + VERIFIED_CACHE_SECONDS)
            while len(self._verified) >= self.introspection_cache_entries:
                self._verified.pop(next(iter(self._verified)))
            kid = header.get("kid")
            self._verified[token] = (until, caller, kid if isinstance(kid, str) else "")
        return caller
