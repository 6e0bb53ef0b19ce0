"""``mep login``, ``mep logout`` and ``mep whoami`` (registered in ``mepcore.client.cli``).

``mep login`` logs the user in to the daemon at ``--url``/``MEP_URL`` with the device
flow (a URL to open and a code to enter), or a robot with ``--client-id`` and
``--client-secret-file``; the login is kept per daemon URL (``mepcore.client.login``)
and used by ``mep`` and the ``Executor`` whenever no token is given.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from mepcore.client import login
from mepcore.client.errors import ClientError
from mepcore.client.service import Client


def login_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--issuer", help="the provider to use when the service trusts several")
    parser.add_argument("--client-id", help="log a robot in with client credentials")
    parser.add_argument(
        "--client-secret-file", type=Path, help="the robot's client secret (with --client-id)"
    )


def _verify(client: Client) -> bool | str:
    return client.ca_bundle or client.verify


def _prompt(uri: str, code: str, complete: str) -> None:
    print(f"Open {complete}\n(or {uri} and enter the code {code}) to log in.", file=sys.stderr)
    print("Waiting for the login to finish…", file=sys.stderr)


def run_login(args: argparse.Namespace, client: Client) -> int:
    store = login.TokenStore(login.tokens_path())
    if args.client_id:
        if args.client_secret_file is None:
            raise ClientError("mep.invalid_input", "--client-id needs --client-secret-file")
        entry = login.client_credentials_login(
            client.url,
            args.client_id,
            args.client_secret_file,
            issuer=args.issuer,
            store=store,
            verify=_verify(client),
        )
    else:
        entry = login.device_login(
            client.url, _prompt, issuer=args.issuer, store=store, verify=_verify(client)
        )
    print(f"Logged in to {client.url} through {entry['issuer']} ({store.path}).")
    return 0


def run_logout(args: argparse.Namespace, client: Client) -> int:
    store = login.TokenStore(login.tokens_path())
    if store.remove(client.url):
        print(f"Logged out of {client.url}.")
    else:
        print(f"Not logged in to {client.url}.")
    return 0


def _claims(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified (to show them; the service verifies), or {}."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def run_whoami(args: argparse.Namespace, client: Client) -> int:
    found = login.TokenStore(login.tokens_path()).get(client.url)
    if found is None:
        raise ClientError("client.login_required", f"not logged in to {client.url}: mep login")
    token = found.get("token") or {}
    claims = _claims(token.get("access_token", ""))
    lines = {
        "service": client.url,
        "issuer": found.get("issuer"),
        "subject": claims.get("sub"),
        "username": claims.get("preferred_username") or claims.get("username"),
        "client": found.get("client_id"),
        "mode": found.get("mode"),
    }
    expires = token.get("expires_at")
    if isinstance(expires, int | float):
        left = int(expires - time.time())
        lines["token"] = f"expires in {left} s" if left > 0 else "expired (renewed on next use)"
    for name, value in lines.items():
        if value is not None:
            print(f"{name}: {value}")
    return 0
