"""Authentication: bearer tokens turned into a ``Caller`` (identity set + attributes).

Three kinds of issuer, configured in the settings:

- ``local``: mepd's own issuer. An Ed25519 key in the state directory (created with
  mode 0600 on first use) signs JWTs (``EdDSA``); ``mepd token issue`` prints one.
- ``jwt``: tokens of an OpenID Connect provider, verified against its JWKS (a file, or
  a URL fetched with a bounded refresh when an unknown ``kid`` shows up), with issuer,
  audience, expiry, not-before and a small leeway. Only asymmetric algorithms are ever
  accepted (never ``none``; no HMAC, so a public key can never act as an HMAC secret).
- ``introspection``: OAuth2 token introspection (RFC 7662); answers are cached for at
  most the token's remaining lifetime and the configured ``cache_seconds``, in a cache
  bounded in entries.

Which claims become identity fields is per issuer (``ClaimNames``). Signature checks are
PyJWT's; this module writes no crypto. It deliberately knows nothing about mapping or
policy: it answers "who is this", or raises ``AuthError`` with a reason code.
"""

from __future__ import annotations

import hashlib
import json
import os
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
JWKS_REFRESH_INTERVAL = 60.0
LOCAL_KEY_FILE = "local_issuer.pem"
LOCAL_AUDIENCE = "mepd"
VERIFIED_CACHE_SECONDS = 300.0


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


def caller_from_claims(claims: Mapping[str, Any], names: ClaimNames, issuer: str) -> Caller:
    """Build a caller from verified claims; a claim of the wrong type is an invalid token."""
    ident = claims.get(names.id)
    if not isinstance(ident, str) or not ident:
        raise AuthError("auth.invalid_token", f"claim {names.id!r} missing or not a string")
    fields: dict[str, Any] = {"id": ident}
    for field in ("username", "email", "name"):
        value = claims.get(getattr(names, field))
        if isinstance(value, str):
            fields[field] = value
    identities = [Identity(ident, fields)]
    linked = claims.get(names.linked) or []
    if not isinstance(linked, list) or len(linked) > 64:
        raise AuthError("auth.invalid_token", f"claim {names.linked!r} is not a short list")
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
    return jwt.encode(claims, key, algorithm="EdDSA")


# -- verification ---------------------------------------------------------------------


@attrs.define
class _JwtVerifier:
    """Verifies JWTs of one issuer (the local one or an OIDC provider)."""

    settings: IssuerSettings
    algorithms: tuple[str, ...]
    _keys: dict[str, Any] = attrs.field(factory=dict)  # kid ("" if none) -> key object
    _fetched_at: float = -1e18

    def load_static(self, public_key: Ed25519PublicKey | None = None) -> None:
        if public_key is not None:
            self._keys = {"": public_key}
        elif self.settings.jwks_file is not None:
            path = self.settings.jwks_file
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise AuthError("auth.issuer_unavailable", f"cannot read JWKS: {exc}") from exc
            try:
                self._keys = _parse_jwks(text)
            except AuthError as exc:
                raise AuthError("auth.issuer_unavailable", f"{path}: {exc.detail}") from exc

    async def _refresh(self, http: httpx.AsyncClient) -> None:
        url = self.settings.jwks_url
        now = time.monotonic()
        if url is None or now - self._fetched_at < JWKS_REFRESH_INTERVAL:
            return
        self._fetched_at = now
        try:
            async with http.stream("GET", url, timeout=5.0) as response:
                response.raise_for_status()
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise AuthError("auth.issuer_unavailable", "JWKS document too large")
        except httpx.HTTPError as exc:
            raise AuthError("auth.issuer_unavailable", f"JWKS fetch failed: {exc}") from exc
        self._keys = _parse_jwks(body.decode("utf-8", "replace"))

    async def verify(
        self, token: str, header: Mapping[str, Any], http: httpx.AsyncClient
    ) -> Caller:
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthError("auth.invalid_token", f"algorithm {alg!r} is not allowed")
        raw_kid = header.get("kid")
        kid = raw_kid if isinstance(raw_kid, str) else ""
        key = self._find(kid)
        if key is None:
            await self._refresh(http)
            key = self._find(kid)
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
        return caller_from_claims(claims, self.settings.claims, self.settings.issuer)

    def _find(self, kid: str) -> Any:
        if kid in self._keys:
            return self._keys[kid]
        if not kid and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return None


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


@attrs.define
class _Introspector:
    """RFC 7662 introspection with a cache bounded by entries and token expiry."""

    settings: IssuerSettings
    max_entries: int
    _secret: str = ""
    _cache: dict[str, tuple[float, Caller]] = attrs.field(factory=dict)

    def load_static(self) -> None:
        assert self.settings.client_secret_file is not None
        try:
            self._secret = self.settings.client_secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AuthError("auth.issuer_unavailable", f"cannot read client secret: {exc}") from exc

    async def verify(self, token: str, http: httpx.AsyncClient) -> Caller:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[digest]
        assert self.settings.url is not None
        assert self.settings.client_id is not None
        try:
            response = await http.post(
                self.settings.url,
                data={"token": token},
                auth=(self.settings.client_id, self._secret),
                timeout=5.0,
            )
            response.raise_for_status()
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthError("auth.issuer_unavailable", f"introspection failed: {exc}") from exc
        if not isinstance(answer, Mapping) or answer.get("active") is not True:
            raise AuthError("auth.invalid_token", "introspection: token not active")
        exp = answer.get("exp")
        if isinstance(exp, int | float) and exp <= now:
            raise AuthError("auth.expired_token", "introspection: token expired")
        if self.settings.audience is not None and "aud" in answer:
            aud = answer["aud"]
            auds = aud if isinstance(aud, list) else [aud]
            if self.settings.audience is not None and self.settings.audience not in auds:
                raise AuthError("auth.invalid_token", "introspection: wrong audience")
        caller = caller_from_claims(answer, self.settings.claims, self.settings.url)
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


@attrs.define
class Authenticator:
    """All configured issuers. ``reload()`` re-reads key files; ``authenticate`` is async."""

    issuers: tuple[IssuerSettings, ...]
    state_dir: Path
    introspection_cache_entries: int = 10_000
    _jwt: dict[str, _JwtVerifier] = attrs.field(factory=dict)
    _introspectors: list[_Introspector] = attrs.field(factory=list)
    _http: httpx.AsyncClient | None = None
    # Verified JWTs: token -> (valid until, caller). A signature check costs ~0.3 ms;
    # a client sends the same token many times. Bounded, and never past the expiry.
    _verified: dict[str, tuple[float, Caller]] = attrs.field(factory=dict)

    def load(self) -> None:
        """Read the keys (creating the local issuer's key on first start)."""
        self.install(self.prepare())

    def install(self, keys: IssuerKeys) -> None:
        """Put keys read by ``prepare`` in force, all at once."""
        self._jwt = keys.verifiers
        self._introspectors = keys.introspectors
        self._verified = {}

    def prepare(self) -> IssuerKeys:
        """Read every issuer's keys without putting them in force (a reload installs
        them only if everything else loaded too)."""
        verifiers: dict[str, _JwtVerifier] = {}
        introspectors: list[_Introspector] = []
        for issuer in self.issuers:
            if issuer.type == "local":
                verifier = _JwtVerifier(issuer, ("EdDSA",))
                verifier.load_static(load_or_create_local_key(self.state_dir).public_key())
                verifiers[issuer.issuer] = verifier
            elif issuer.type == "jwt":
                algs = tuple(a for a in issuer.algorithms if a in ASYMMETRIC_ALGORITHMS)
                verifier = _JwtVerifier(issuer, algs)
                old = self._jwt.get(issuer.issuer)
                if issuer.jwks_file is not None:
                    verifier.load_static()
                elif old is not None:
                    verifier._keys = old._keys  # URL keys refresh lazily
                verifiers[issuer.issuer] = verifier
            else:
                intro = _Introspector(issuer, self.introspection_cache_entries)
                intro.load_static()
                introspectors.append(intro)
        return IssuerKeys(verifiers, introspectors)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        return self._http

    async def authenticate(self, authorization: str | None) -> Caller:
        if not authorization:
            raise AuthError("auth.missing_token", "no Authorization header")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("auth.missing_token", "Authorization is not a bearer token")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("auth.invalid_token", "token too long")
        hit = self._verified.get(token)
        if hit is not None:
            if hit[0] > time.time():
                return hit[1]
            del self._verified[token]
        header: dict[str, Any] | None
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            header = None
            unverified = {}
        if header is not None:
            iss = unverified.get("iss")
            verifier = self._jwt.get(iss) if isinstance(iss, str) else None
            if verifier is not None:
                caller = await verifier.verify(token, header, self._client())
                exp = unverified.get("exp")
                if isinstance(exp, int | float):
                    until = min(float(exp), time.time() + VERIFIED_CACHE_SECONDS)
                    while len(self._verified) >= self.introspection_cache_entries:
                        self._verified.pop(next(iter(self._verified)))
                    self._verified[token] = (until, caller)
                return caller
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
