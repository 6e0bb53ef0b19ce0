"""A real OpenID provider for the tests: node-oidc-provider on 127.0.0.1.

``tests/oidc/provider.mjs`` runs two issuers (``a`` and ``b``) and a control port in
one node process; ``OpenIDProvider`` starts it and talks to it: access tokens through
client credentials and a scripted device-flow login (the user's browser steps, done
with httpx), key rotation and removal, revocation, and taking an issuer off the network.

The npm packages come from ``MEP_TEST_OIDC_PROVIDER`` (a ``node_modules`` directory;
``.ci/run`` installs oidc-provider into /var/tmp/mep-ci-oidc and sets it); without it,
or without node, the tests that need the provider skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx

SCRIPT = Path(__file__).with_name("provider.mjs")
ENV = "MEP_TEST_OIDC_PROVIDER"
DEFAULT_MODULES = Path("/var/tmp/mep-ci-oidc/node_modules")
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# The provider's clients (tests/oidc/provider.mjs).
SERVICE = ("mep-service", "service-secret")
CLI_CLIENT = "mep-cli"
INTROSPECTION_CLIENT = ("mepd", "mepd-secret")
API_AUDIENCE = "mepd-api"
OPAQUE_AUDIENCE = "mepd-opaque"
_FORM = re.compile(r"<form[^>]*action=\"([^\"]*)\"[^>]*>(.*?)</form>", re.S)
_INPUT = re.compile(r"<input[^>]*>")
_ATTR = re.compile(r"(name|value)=\"([^\"]*)\"")


def unavailable() -> str | None:
    """Why the provider cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (.ci/run installs nodejs and npm)"
    modules = Path(os.environ.get(ENV) or DEFAULT_MODULES)
    if not (modules / "oidc-provider" / "package.json").is_file():
        return f"oidc-provider is not installed in {modules} (set {ENV}; .ci/run installs it)"
    return None


def _form_fields(html: str) -> tuple[str, dict[str, str]] | None:
    found = _FORM.search(html)
    if found is None:
        return None
    fields: dict[str, str] = {}
    for tag in _INPUT.findall(found.group(2)):
        attrs_ = dict(_ATTR.findall(tag))
        if "name" in attrs_:
            fields[attrs_["name"]] = attrs_.get("value", "")
    return found.group(1), fields


def browser_login(verification_uri_complete: str, username: str) -> None:
    """What the user does in a browser for a device login: confirm the code, sign in
    (the provider's development login page takes any password), consent."""
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        page = browser.get(verification_uri_complete)
        for _ in range(8):
            page.raise_for_status()
            if "Sign-in Success" in page.text:
                return
            form = _form_fields(page.text)
            if form is None:
                raise AssertionError(f"no form on {page.url}: {page.text[:300]}")
            action, fields = form
            if "login" in fields:
                fields.update(login=username, password="any")
            page = browser.post(page.url.join(action), data=fields)
    raise AssertionError("the device login did not finish")


@attrs.define
class OpenIDProvider:
    """The running provider: issuer URLs by name and the control URL."""

    issuers: dict[str, str]
    control: str
    process: subprocess.Popen[bytes]

    def metadata(self, name: str) -> dict[str, Any]:
        url = self.issuers[name] + "/.well-known/openid-configuration"
        answer: dict[str, Any] = httpx.get(url, timeout=10).raise_for_status().json()
        return answer

    def _control(self, name: str, action: str, body: dict[str, Any] | None = None) -> Any:
        r = httpx.post(f"{self.control}/{name}/{action}", json=body or {}, timeout=30)
        return r.raise_for_status().json()

    def rotate(self, name: str) -> list[str]:
        """A new signing key first in the JWKS; the key ids, newest first."""
        kids: list[str] = self._control(name, "rotate")["kids"]
        return kids

    def retire(self, name: str) -> list[str]:
        """Every key but the newest leaves the JWKS."""
        kids: list[str] = self._control(name, "retire")["kids"]
        return kids

    def kids(self, name: str) -> list[str]:
        jwks = httpx.get(self.metadata(name)["jwks_uri"], timeout=10).raise_for_status()
        return [k["kid"] for k in jwks.json()["keys"]]

    def sign(self, name: str, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        """Claims signed with the issuer's newest key (``typ`` at+jwt unless changed)."""
        token: str = self._control(name, "sign", {"claims": claims, "header": header or {}})[
            "token"
        ]
        return token

    def down(self, name: str) -> None:
        self._control(name, "down")

    def up(self, name: str) -> None:
        self._control(name, "up")

    def set_ttl(self, name: str, seconds: int) -> None:
        self._control(name, "ttl", {"seconds": seconds})

    def jwks_hits(self, name: str) -> int:
        hits: int = self._control(name, "hits")["jwks"]
        return hits

    def client_credentials(self, name: str, resource: str | None = "urn:mep:api") -> dict[str, Any]:
        """A client-credentials token response (JWT for ``urn:mep:api``, opaque for
        ``urn:mep:opaque``, opaque without an audience for None)."""
        data = {"grant_type": "client_credentials"}
        if resource is not None:
            data.update(resource=resource, scope="mep")
        r = httpx.post(
            self.metadata(name)["token_endpoint"],
            data=data,
            auth=SERVICE,
            timeout=30,
        )
        answer: dict[str, Any] = r.raise_for_status().json()
        return answer

    def device_login(self, name: str, username: str) -> dict[str, Any]:
        """A whole device login (RFC 8628) of ``username``: the token response (access,
        ID and refresh token)."""
        meta = self.metadata(name)
        start = httpx.post(
            meta["device_authorization_endpoint"],
            data={"client_id": CLI_CLIENT, "scope": "openid offline_access profile mep"},
            timeout=30,
        ).raise_for_status()
        device = start.json()
        browser_login(device["verification_uri_complete"], username)
        r = httpx.post(
            meta["token_endpoint"],
            data={
                "grant_type": DEVICE_GRANT,
                "device_code": device["device_code"],
                "client_id": CLI_CLIENT,
            },
            timeout=30,
        )
        answer: dict[str, Any] = r.raise_for_status().json()
        return answer

    def revoke(self, name: str, token: str) -> None:
        httpx.post(
            self.metadata(name)["revocation_endpoint"],
            data={"token": token},
            auth=SERVICE,
            timeout=30,
        ).raise_for_status()


def _read_ready_line(process: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    """The provider's JSON line with its URLs (other lines are its notices)."""
    assert process.stdout is not None
    found: dict[str, Any] = {}

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith('{"issuers"'):
                found.update(json.loads(line))
                break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(deadline)
    if not found:
        process.kill()
        raise RuntimeError(f"the OpenID provider did not start in {deadline}s")
    # Keep draining its notices so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in process.stdout or ()], daemon=True).start()
    return found


@contextmanager
def running_provider(log: Path, *, deadline: float = 60.0) -> Iterator[OpenIDProvider]:
    modules = Path(os.environ.get(ENV) or DEFAULT_MODULES)
    env = {**os.environ, "MEP_OIDC_MODULES": str(modules)}
    with open(log, "ab") as errors:
        process = subprocess.Popen(
            ["node", str(SCRIPT)], stdout=subprocess.PIPE, stderr=errors, env=env
        )
    try:
        ready = _read_ready_line(process, deadline)
        yield OpenIDProvider(ready["issuers"], ready["control"], process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def wait_until(check: Any, *, deadline: float, interval: float = 0.1) -> Any:
    """Poll ``check()`` until it returns something true (returned) or the deadline
    passes (the last value returned)."""
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value or time.monotonic() >= end:
            return value
        time.sleep(interval)  # polling interval of a deadline loop
