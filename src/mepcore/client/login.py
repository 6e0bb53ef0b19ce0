"""Logging in to a mepd service (``mep login``) and the token the client sends.

mepd says how to log in at ``GET /v1/auth``: the OpenID providers it trusts (issuer,
audience) and, for each, the public client a user logs in with. ``device_login`` runs
the OAuth 2.0 device authorization grant (RFC 8628) against the provider found by
discovery: the user opens a URL, enters a code, signs in; ``client_credentials_login``
is the mode for robots (a client id and a secret file). The OAuth exchanges are
authlib's (``OAuth2Client`` on httpx); this module writes no protocol of its own
beyond reading the two metadata documents.

Tokens are kept per daemon URL in one JSON file, ``$XDG_CONFIG_HOME/mep/tokens.json``
(``~/.config/mep/tokens.json``), mode 0600 in a 0700 directory, replaced whole on each
change. ``LoginAuth`` (an ``httpx.Auth``) sends the stored access token, refreshes it
before it expires (with the refresh token, or a new client-credentials grant for a
robot) and once more when the service answers 401 ``auth.expired_token``, so a session
outlives any one token.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx

from mepcore.client.errors import ClientError

with warnings.catch_warnings():
    # Recent authlib prefers the httpx2 package and warns when it falls back to httpx,
    # which this client uses everywhere else (the OAuth client is the same). Its
    # module turns its own warnings on at import: silenced after that, for this import.
    import authlib.deprecate  # noqa: F401 - imported first, see above

    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client, OAuthError

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
TOKENS_FILE = Path("mep") / "tokens.json"
# Renew a token this long before it expires: a quarter of its life, at most a minute.
MAX_REFRESH_MARGIN = 60.0
DEVICE = "device"
CLIENT_CREDENTIALS = "client_credentials"

Prompt = Callable[[str, str, str], None]  # (verification URI, user code, complete URI)


def tokens_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where logins are kept: ``$XDG_CONFIG_HOME/mep/tokens.json`` (XDG Base Directory;
    ``~/.config`` when the variable is unset or not absolute)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / TOKENS_FILE


def _key(url: str) -> str:
    return url.rstrip("/")


@attrs.define
class TokenStore:
    """The logins of one user, by daemon URL, in a 0600 file written whole."""

    path: Path

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ClientError("client.login_required", f"{self.path}: unreadable: {exc}") from exc
        return data if isinstance(data, dict) else {}

    def get(self, url: str) -> dict[str, Any] | None:
        entry = self.load().get(_key(url))
        return entry if isinstance(entry, dict) else None

    def put(self, url: str, entry: Mapping[str, Any]) -> None:
        data = self.load()
        data[_key(url)] = dict(entry)
        self._write(data)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a login is renewed, so that processes sharing the file (several
        scripts, an Executor per process) renew it once and never spend a refresh
        token another one has already exchanged."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove(self, url: str) -> bool:
        data = self.load()
        found = data.pop(_key(url), None) is not None
        if found:
            self._write(data)
        return found

    def _write(self, data: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=self.path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _get_json(url: str, verify: bool | str, what: str) -> dict[str, Any]:
    try:
        r = httpx.get(url, timeout=30, verify=verify, follow_redirects=False)
        r.raise_for_status()
        answer = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ClientError("client.login_failed", f"{what} ({url}): {exc}") from exc
    if not isinstance(answer, dict):
        raise ClientError("client.login_failed", f"{what} ({url}) is not a JSON object")
    return answer


def login_choices(url: str, verify: bool | str = True) -> list[dict[str, Any]]:
    """The providers the service at ``url`` trusts (``GET /v1/auth``)."""
    issuers = _get_json(_key(url) + "/v1/auth", verify, "the service's login metadata")
    found = issuers.get("issuers")
    return [i for i in found if isinstance(i, dict)] if isinstance(found, list) else []


def provider_endpoints(issuer: str, verify: bool | str = True) -> dict[str, Any]:
    """The provider's metadata (OpenID Connect Discovery), checked to name ``issuer``."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    meta = _get_json(url, verify, "the provider's metadata")
    if meta.get("issuer") != issuer:
        raise ClientError("client.login_failed", f"{url} does not describe {issuer}")
    return meta


def _oauth(entry: Mapping[str, Any], verify: bool | str, secret: str | None) -> OAuth2Client:
    return OAuth2Client(
        client_id=entry["client_id"],
        client_secret=secret,
        token_endpoint_auth_method="client_secret_basic" if secret else "none",
        verify=verify,
        timeout=30,
    )


def _with_expiry(token: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a token response that are kept, with ``expires_at`` set."""
    kept = {k: token[k] for k in ("access_token", "refresh_token", "expires_at") if k in token}
    if "expires_at" not in kept and isinstance(token.get("expires_in"), int | float):
        kept["expires_at"] = time.time() + float(token["expires_in"])
    if "refresh_token" not in kept and "refresh_token" in token:
        kept["refresh_token"] = token["refresh_token"]
    return kept


def choose_issuer(
    choices: list[dict[str, Any]], issuer: str | None, *, device: bool
) -> dict[str, Any]:
    usable = [c for c in choices if not device or c.get("device_client_id")]
    if issuer is not None:
        usable = [c for c in usable if c.get("issuer") == issuer]
    if not usable:
        what = "device login" if device else "login"
        raise ClientError("client.login_failed", f"the service offers no {what} for {issuer}")
    return usable[0]


def _poll_device(
    oauth: OAuth2Client, token_endpoint: str, device: Mapping[str, Any], sleep: Any
) -> dict[str, Any]:
    """Ask for the token until the user has signed in (RFC 8628 section 3.5)."""
    interval = float(device.get("interval") or 5)
    deadline = time.monotonic() + float(device.get("expires_in") or 600)
    while True:
        try:
            token: dict[str, Any] = oauth.fetch_token(
                token_endpoint, grant_type=DEVICE_GRANT, device_code=device["device_code"]
            )
            return token
        except OAuthError as exc:
            if exc.error == "slow_down":
                interval += 5
            elif exc.error != "authorization_pending":
                raise ClientError("client.login_failed", f"{exc.error}: {exc.description}") from exc
        if time.monotonic() + interval > deadline:
            raise ClientError("client.login_failed", "the login code expired; run mep login again")
        sleep(interval)


def device_login(
    url: str,
    prompt: Prompt,
    *,
    issuer: str | None = None,
    store: TokenStore | None = None,
    verify: bool | str = True,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Log in to the service at ``url`` with the device flow; the stored login.

    ``prompt(verification_uri, user_code, verification_uri_complete)`` tells the user
    where to go; polling for the token starts when it returns."""
    choice = choose_issuer(login_choices(url, verify), issuer, device=True)
    meta = provider_endpoints(choice["issuer"], verify)
    entry: dict[str, Any] = {
        "mode": DEVICE,
        "issuer": choice["issuer"],
        "client_id": choice["device_client_id"],
        "token_endpoint": meta["token_endpoint"],
    }
    extra = {"resource": choice["resource"]} if choice.get("resource") else {}
    with _oauth(entry, verify, None) as oauth:
        try:
            r = oauth.request(
                "POST",
                meta["device_authorization_endpoint"],
                data={
                    "client_id": entry["client_id"],
                    "scope": " ".join(choice.get("scopes", [])),
                    **extra,
                },
                withhold_token=True,
            )
            r.raise_for_status()
            device = r.json()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise ClientError("client.login_failed", f"device authorization: {exc}") from exc
        complete = device.get("verification_uri_complete") or device["verification_uri"]
        prompt(device["verification_uri"], device["user_code"], complete)
        entry["token"] = _with_expiry(_poll_device(oauth, entry["token_endpoint"], device, sleep))
    (store or TokenStore(tokens_path())).put(url, entry)
    return entry


def client_credentials_login(
    url: str,
    client_id: str,
    secret_file: Path,
    *,
    issuer: str | None = None,
    store: TokenStore | None = None,
    verify: bool | str = True,
) -> dict[str, Any]:
    """Log a robot in with client credentials; the secret stays in ``secret_file``
    (its path is stored, read again at each renewal)."""
    choice = choose_issuer(login_choices(url, verify), issuer, device=False)
    meta = provider_endpoints(choice["issuer"], verify)
    entry: dict[str, Any] = {
        "mode": CLIENT_CREDENTIALS,
        "issuer": choice["issuer"],
        "client_id": client_id,
        "client_secret_file": str(secret_file.resolve()),
        "token_endpoint": meta["token_endpoint"],
    }
    if choice.get("resource"):
        entry["resource"] = choice["resource"]
    login = Login(url, store or TokenStore(tokens_path()), entry, verify=verify)
    login.renew()
    return login.entry


@attrs.define
class Login:
    """One stored login, kept fresh: ``access_token()`` renews before expiry."""

    url: str
    store: TokenStore
    entry: dict[str, Any]
    verify: bool | str = True
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    @classmethod
    def stored(cls, url: str, store: TokenStore, verify: bool | str = True) -> Login | None:
        entry = store.get(url)
        return None if entry is None else cls(url, store, entry, verify)

    def _due(self) -> bool:
        token = self.entry.get("token") or {}
        expires = token.get("expires_at")
        if not token.get("access_token"):
            return True
        if not isinstance(expires, int | float):
            return False
        issued = float(token.get("issued_at", expires - 4 * MAX_REFRESH_MARGIN))
        margin = min(MAX_REFRESH_MARGIN, max(0.0, (expires - issued) / 4))
        return time.time() >= expires - margin

    def access_token(self, *, renew: bool = False) -> str:
        """The access token; renewed first when due or ``renew`` (the service refused
        this one) — unless another process sharing the file already did."""
        with self._lock:
            if renew or self._due():
                with self.store.locked():
                    if not self._adopt_stored():
                        self._renew()
            token: str = self.entry["token"]["access_token"]
            return token

    def _adopt_stored(self) -> bool:
        """Take the stored login if another process renewed it since we read it."""
        stored = self.store.get(self.url)
        if stored is None:  # mep logout: the session ends here too
            raise ClientError("client.login_required", f"logged out of {self.url}: mep login")
        ours = (self.entry.get("token") or {}).get("access_token")
        if (stored.get("token") or {}).get("access_token") == ours:
            return False
        self.entry = stored
        return not self._due()

    def renew(self) -> None:
        with self._lock, self.store.locked():
            self._renew()

    def _renew(self) -> None:
        mode = self.entry.get("mode")
        old = self.entry.get("token") or {}
        secret = None
        if mode == CLIENT_CREDENTIALS:
            try:
                secret = Path(self.entry["client_secret_file"]).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ClientError("client.login_required", f"client secret: {exc}") from exc
        elif not old.get("refresh_token"):
            raise ClientError("client.login_required", "the login has expired: run mep login")
        with _oauth(self.entry, self.verify, secret) as oauth:
            try:
                if mode == CLIENT_CREDENTIALS:
                    extra = {"resource": self.entry["resource"]} if "resource" in self.entry else {}
                    token = oauth.fetch_token(
                        self.entry["token_endpoint"], grant_type="client_credentials", **extra
                    )
                else:
                    token = oauth.refresh_token(
                        self.entry["token_endpoint"], refresh_token=old["refresh_token"]
                    )
            except (OAuthError, httpx.HTTPError) as exc:
                raise ClientError(
                    "client.login_required", f"renewing the login failed ({exc}): run mep login"
                ) from exc
        fresh = _with_expiry(token)
        fresh.setdefault("refresh_token", old.get("refresh_token"))  # not rotated
        fresh["issued_at"] = time.time()
        self.entry["token"] = {k: v for k, v in fresh.items() if v is not None}
        self.store.put(self.url, self.entry)


def _expired(response: httpx.Response) -> bool:
    if response.status_code != 401:
        return False
    try:
        return bool(response.json()["error"]["reason"] == "auth.expired_token")
    except (ValueError, KeyError, TypeError):
        return False


@attrs.define
class LoginAuth(httpx.Auth):
    """Sends the login's access token; renews it when due and once on 401
    ``auth.expired_token`` (the service's clock, not ours, decides)."""

    login: Login
    requires_response_body = True

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.login.access_token()}"
        response = yield request
        if _expired(response):
            request.headers["Authorization"] = f"Bearer {self.login.access_token(renew=True)}"
            yield request
