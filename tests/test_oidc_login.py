"""``mep login`` against the real OpenID provider (tests/oidc/) and a real mepd: the
public login metadata, device login, a session longer than one token lifetime, renewal
on 401 ``auth.expired_token``, client credentials for robots, whoami and logout."""

from __future__ import annotations

import json
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mepcore.client import cli, login
from mepcore.client.errors import ClientError
from mepcore.client.service import Client
from tests.daemon_harness import RunningDaemon, running_daemon, write_deployment
from tests.oidc import API_AUDIENCE, CLI_CLIENT, SERVICE, OpenIDProvider, browser_login

TOKEN_LIFETIME = 4  # seconds: the provider's access tokens in this module


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, oidc_provider: OpenIDProvider
) -> Iterator[RunningDaemon]:
    op = oidc_provider
    top = tmp_path_factory.mktemp("login-site")
    issuer = {
        "type": "jwt",
        "issuer": op.issuers["a"],
        "audience": API_AUDIENCE,
        "leeway": 0,  # the token's own expiry, to the second
        "jwks_min_age": 1,
        "device_client_id": CLI_CLIENT,
        "device_scopes": ["openid", "offline_access", "mep"],
        "login_resource": "urn:mep:api",  # node-oidc-provider: JWTs for a resource
    }
    config = write_deployment(
        top, python="/usr/bin/python3", settings_extra={"issuers": [{"type": "local"}, issuer]}
    )
    op.set_ttl("a", TOKEN_LIFETIME)
    try:
        with running_daemon(config, top / "state") as running:
            yield running
    finally:
        op.set_ttl("a", 300)


def _authenticated(client: Client) -> bool:
    """A request that needs only a valid token: 404 for a task that is not ours."""
    http = client._connection()
    r = http.get(f"/v1/tasks/{uuid.uuid4()}")
    assert r.status_code in (401, 404), r.text
    return r.status_code == 404


def test_the_login_metadata_is_public(daemon: RunningDaemon, oidc_provider: OpenIDProvider) -> None:
    answer = httpx.get(daemon.url + "/v1/auth", timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {
        "issuers": [
            {
                "issuer": oidc_provider.issuers["a"],
                "audience": API_AUDIENCE,
                "resource": "urn:mep:api",
                "device_client_id": CLI_CLIENT,
                "scopes": ["openid", "offline_access", "mep"],
            }
        ]
    }


def test_a_device_login_outlives_its_tokens(
    daemon: RunningDaemon, oidc_provider: OpenIDProvider, tmp_path: Path
) -> None:
    environ = {"MEP_URL": daemon.url, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    store = login.TokenStore(login.tokens_path(environ))
    shown: list[str] = []

    def user(uri: str, code: str, complete: str) -> None:
        shown.append(code)
        browser_login(complete, "alice")  # what the user does in a browser

    entry = login.device_login(daemon.url, user, store=store)
    assert shown and entry["issuer"] == oidc_provider.issuers["a"]
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    first = entry["token"]["access_token"]
    seen = {first}
    # Keep working for more than two token lifetimes (requests every 0.2 s).
    end = time.time() + 2 * TOKEN_LIFETIME + 1
    with Client.from_environment(environ) as client:
        while time.time() < end:
            assert _authenticated(client)
            seen.add(store.get(daemon.url)["token"]["access_token"])  # type: ignore[index]
            time.sleep(0.2)  # the pace of a polling loop with a deadline
    assert len(seen) >= 3, "the access token was not renewed"


def test_a_401_expired_token_renews_once(
    daemon: RunningDaemon, oidc_provider: OpenIDProvider, tmp_path: Path
) -> None:
    environ = {"MEP_URL": daemon.url, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    store = login.TokenStore(login.tokens_path(environ))
    entry = login.device_login(
        daemon.url, lambda _u, _c, complete: browser_login(complete, "bob"), store=store
    )
    token = entry["token"]
    real_expiry = token["expires_at"]
    # The client believes the token is good for an hour; only the service knows better.
    store.put(daemon.url, {**entry, "token": {**token, "expires_at": time.time() + 3600}})
    while time.time() < real_expiry + 1:
        time.sleep(0.1)  # until the token has expired (a deadline loop)
    with httpx.Client(base_url=daemon.url) as raw:
        r = raw.get(
            f"/v1/tasks/{uuid.uuid4()}",
            headers={"Authorization": "Bearer " + token["access_token"]},
        )
        assert r.json()["error"]["reason"] == "auth.expired_token"
    with Client.from_environment(environ) as client:
        assert _authenticated(client)
    assert store.get(daemon.url)["token"]["access_token"] != token["access_token"]  # type: ignore[index]


def test_processes_sharing_a_login_renew_it_once(daemon: RunningDaemon, tmp_path: Path) -> None:
    store = login.TokenStore(tmp_path / "config" / "mep" / "tokens.json")
    login.device_login(
        daemon.url, lambda _u, _c, complete: browser_login(complete, "carol"), store=store
    )
    # Two processes read the same login; the provider rotates refresh tokens.
    first = login.Login.stored(daemon.url, store)
    second = login.Login.stored(daemon.url, store)
    assert first is not None and second is not None
    renewed = first.access_token(renew=True)
    assert second.access_token(renew=True) == renewed  # taken from the file, not spent
    assert second.access_token(renew=True) != renewed  # and renewed with the newest one
    store.remove(daemon.url)  # mep logout
    with pytest.raises(ClientError) as info:
        first.access_token(renew=True)
    assert info.value.reason == "client.login_required"


def test_a_login_without_a_refresh_token_asks_to_log_in_again(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    environ = {"MEP_URL": daemon.url, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    store = login.TokenStore(login.tokens_path(environ))
    store.put(
        daemon.url,
        {
            "mode": "device",
            "issuer": "x",
            "client_id": CLI_CLIENT,
            "token_endpoint": "http://127.0.0.1:9/token",
            "token": {"access_token": "a.b.c", "expires_at": time.time() - 10},
        },
    )
    with Client.from_environment(environ) as client, pytest.raises(Exception) as info:
        client._connection().get("/v1/tasks/x")
    assert getattr(info.value, "reason", None) == "client.login_required"


def test_robots_log_in_with_client_credentials_and_the_cli(
    daemon: RunningDaemon,
    oidc_provider: OpenIDProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("MEP_TOKEN", raising=False)
    secret = tmp_path / "secret"
    secret.write_text(SERVICE[1] + "\n")
    base = ["--url", daemon.url]
    assert (
        cli.main([*base, "login", "--client-id", SERVICE[0], "--client-secret-file", str(secret)])
        == 0
    )
    assert oidc_provider.issuers["a"] in capsys.readouterr().out
    assert cli.main([*base, "whoami"]) == 0
    out = capsys.readouterr().out
    assert f"subject: {SERVICE[0]}" in out and "mode: client_credentials" in out
    stored = json.loads(login.tokens_path().read_text())
    assert SERVICE[1] not in json.dumps(stored)  # the secret stays in its own file
    # Past the token's lifetime the robot gets a new one by itself.
    end = time.time() + TOKEN_LIFETIME + 1
    with Client.from_environment(
        {"MEP_URL": daemon.url, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    ) as client:
        while time.time() < end:
            assert _authenticated(client)
            time.sleep(0.25)  # the pace of a polling loop with a deadline
    assert cli.main([*base, "logout"]) == 0
    assert cli.main([*base, "whoami"]) == 1
    assert "client.login_required" in capsys.readouterr().err
