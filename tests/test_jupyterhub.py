"""``mepcore.contrib.jupyterhub`` inside a real JupyterHub, started on 127.0.0.1 by this module.

The hub is JupyterHub from PyPI (the ``jupyterhub`` extra) with configurable-http-proxy
from npm, started once for the module and stopped at its end. It authenticates with
``DummyAuthenticator`` behind ``MepAuthenticatorMixin`` (the login itself is not under
test: any password passes), maps ``<account>@hub.example`` with a mep mapping file,
decides spawns with a mep Casbin policy, and starts servers with JupyterHub's own
``LocalProcessSpawner``. The "server" is a stand-in of a few lines run by Debian's
``/usr/bin/python3`` that answers every request with the uid, gid and groups it runs
as, so a test reads through the hub's proxy which account its server really is.

Checked: an allowed login's server starts as the mapped account (a real account from
``make_account``) and is offered only the profiles the policy allows it (another one
is refused with ``authz.denied``); an account the policy denies is refused with the
policy's reason (``authz.explicit_deny``), on the form and over the REST API, and no
process runs as it; the login's own principals (``domain:hub.example``) reach the policy
through ``auth_state``; unmapped and unsafe logins are refused at the login, saying why
only in the hub's log. A second hub, given a broken mapping file, refuses to start.

JupyterHub runs from its own virtual environment under /var/tmp (built once, shared
between runs, keyed by the dependencies and this checkout): installed into the project's
.venv, the extra's ``jsonschema[format-nongpl]`` makes every ``import jsonschema`` there
seconds slower. configurable-http-proxy comes from ``$MEP_TEST_CHP`` (.ci/run installs
it), from PATH, or is installed here with npm. When either cannot be installed the module
is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from tests.accounts import create_group, delete_group

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
BASE = Path("/var/tmp/mep-test-jupyterhub")
SYSTEM_PYTHON = "/usr/bin/python3"
DOMAIN = "hub.example"
ENDPOINT = "jupyterhub"
INSTALL_TIMEOUT = 900
START_TIMEOUT = 120
SPAWN_TIMEOUT = 60
# A hub environment nobody used for this long is removed when another one is built.
PRUNE_AFTER = 7 * 86_400

STANDIN = '''\
"""A single-user server stand-in: answers every GET with who it runs as."""
import http.server, json, os, pwd, urllib.parse

url = urllib.parse.urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({
            "resuid": os.getresuid(),
            "resgid": os.getresgid(),
            "groups": sorted(os.getgroups()),
            "user": pwd.getpwuid(os.getuid()).pw_name,
            "home": os.environ.get("HOME"),
            "cwd": os.getcwd(),
            "path": self.path,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((url.hostname, url.port), Handler).serve_forever()
'''

CONFIG = '''\
from jupyterhub.auth import DummyAuthenticator

from mepcore.contrib.jupyterhub import (
    MepAuthenticatorMixin,
    mep_options_form,
    mep_options_from_form,
)


class MepDummyAuthenticator(MepAuthenticatorMixin, DummyAuthenticator):
    """Any password: the login check is not under test, the mapping and policy are."""


settings = {settings!r}
c = get_config()  # noqa: F821
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = settings["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
c.JupyterHub.db_url = "sqlite:///" + settings["state"] + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = settings["state"] + "/cookie_secret"
c.JupyterHub.cleanup_servers = True
c.ConfigurableHTTPProxy.command = [settings["chp"]]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:%d" % settings["proxy_api_port"]
c.ConfigurableHTTPProxy.pid_file = settings["state"] + "/proxy.pid"
c.JupyterHub.authenticator_class = MepDummyAuthenticator
c.MepDummyAuthenticator.mep_mapping_file = settings["mapping"]
c.MepDummyAuthenticator.mep_policy_files = [settings["policy"]]
c.MepDummyAuthenticator.mep_endpoint = "{endpoint}"
c.MepDummyAuthenticator.mep_profiles = {{
    "default": "Default (CPU)",
    "gpu": "GPU node",
    "campus": "For logins of the campus",
}}
# The login's own principals (domain:hub.example) reach the policy through auth_state.
c.Authenticator.enable_auth_state = True
c.Spawner.options_form = mep_options_form
c.Spawner.options_from_form = mep_options_from_form
c.Spawner.cmd = ["{system_python}", settings["standin"]]
c.Spawner.start_timeout = {spawn_timeout}
c.Spawner.http_timeout = {spawn_timeout}
c.JupyterHub.services = [{{"name": "mep-test", "api_token": settings["token"]}}]
c.JupyterHub.load_roles = [
    {{
        "name": "mep-test",
        "scopes": ["admin:users", "admin:servers", "list:users"],
        "services": ["mep-test"],
    }}
]
'''


def _deadline_poll(what: str, timeout: float, check: Any) -> Any:
    """Call ``check`` until it returns something truthy, or fail after ``timeout``."""
    pause = threading.Event()
    end = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        pause.wait(0.25)


# -- JupyterHub's environment and configurable-http-proxy ---------------------------------


def _extra_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["jupyterhub"]]


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def hub_python() -> Path:
    """The interpreter of a virtual environment with this checkout and the ``jupyterhub``
    extra installed (editable), built under an exclusive lock if it is not there yet."""
    key = hashlib.sha256(json.dumps([str(ROOT), _extra_requirements()]).encode()).hexdigest()
    venv = BASE / f"venv-{key[:16]}"
    marker = venv / ".complete"
    BASE.mkdir(mode=0o755, exist_ok=True)
    with open(BASE / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            shutil.rmtree(venv, ignore_errors=True)
            _prune(keep=venv)
            for argv in (
                [SYSTEM_PYTHON, "-m", "venv", str(venv)],
                [
                    str(venv / "bin/python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "-e",
                    f"{ROOT}[jupyterhub]",
                ],
            ):
                try:
                    done = subprocess.run(
                        argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
                    )
                except subprocess.TimeoutExpired:
                    pytest.skip(f"jupyterhub could not be installed in {INSTALL_TIMEOUT} s")
                if done.returncode != 0:
                    shutil.rmtree(venv, ignore_errors=True)
                    pytest.skip(
                        f"jupyterhub could not be installed ({' '.join(argv[:4])} …):\n"
                        + _tail(done.stdout + done.stderr)
                    )
            marker.touch()
        os.utime(marker)
    return venv / "bin/python"


def _prune(keep: Path) -> None:
    for old in BASE.glob("venv-*"):
        marker = old / ".complete"
        stale = not marker.exists() or time.time() - marker.stat().st_mtime > PRUNE_AFTER
        if old != keep and stale:
            shutil.rmtree(old, ignore_errors=True)


def proxy_command() -> str:
    """configurable-http-proxy: ``$MEP_TEST_CHP``, on PATH, or installed here with npm."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: configurable-http-proxy needs it (apt install nodejs)")
    given = os.environ.get("MEP_TEST_CHP")
    if given:
        if not os.access(given, os.X_OK):
            pytest.fail(f"MEP_TEST_CHP={given} is not an executable")
        return given
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot install configurable-http-proxy")
    prefix = BASE / "chp"
    command = prefix / "node_modules/.bin/configurable-http-proxy"
    BASE.mkdir(mode=0o755, exist_ok=True)
    with open(BASE / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.access(command, os.X_OK):
            argv = [npm, "install", "--no-fund", "--no-audit", "--prefix", str(prefix)]
            argv.append("configurable-http-proxy")
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
                )
            except subprocess.TimeoutExpired:
                pytest.skip(f"configurable-http-proxy: npm install took over {INSTALL_TIMEOUT} s")
            if done.returncode != 0 or not os.access(command, os.X_OK):
                pytest.skip(
                    "configurable-http-proxy could not be installed with npm:\n"
                    + _tail(done.stdout + done.stderr)
                )
    return str(command)


# -- the hub -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.frozen
class Hub:
    url: str
    token: str
    log: Path
    policy: Path
    standin: Path
    deny_group: str
    gpu_group: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"token {self.token}"}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            return client.request(method, f"/hub/api{path}", headers=headers, **kwargs)

    def server(self, name: str) -> dict[str, Any] | None:
        answer = self.api("GET", f"/users/{name}")
        answer.raise_for_status()
        server: dict[str, Any] | None = answer.json().get("servers", {}).get("")
        return server

    def stop(self, name: str) -> None:
        if self.api("GET", f"/users/{name}").status_code != 200:
            return
        self.api("DELETE", f"/users/{name}/server")
        _deadline_poll(f"{name}'s server stopped", SPAWN_TIMEOUT, lambda: not self.server(name))


def _policy(deny_group: str, gpu_group: str) -> str:
    return "\n".join(
        [
            "# mep policy of the test hub (endpoint 'jupyterhub')",
            f"p, **, {ENDPOINT}, user:*, map_identity, uid_ge:1000, allow",
            f"p, **, {ENDPOINT}, template:default, start_endpoint, uid_ge:1000, allow",
            f"p, group:{gpu_group}, {ENDPOINT}, template:gpu, start_endpoint, uid_ge:1000, allow",
            f"p, group:{deny_group}, {ENDPOINT}, template:*, start_endpoint, -, deny",
            f"p, domain:{DOMAIN}, {ENDPOINT}, template:campus, start_endpoint, uid_ge:1000, allow",
            "",
        ]
    )


def _mapping() -> list[dict[str, Any]]:
    return [
        {
            "DATA_TYPE": "expression_identity_mapping#1.0.0",
            "mappings": [{"source": "{username}", "match": r"(.*)@hub\.example", "output": "{0}"}],
        }
    ]


def _wait_for_hub(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    def up() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the hub exited with {process.returncode}:\n{_tail(log.read_text(), 40)}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/hub/api", timeout=5).status_code == 200
        return False

    _deadline_poll("the hub answering on /hub/api", START_TIMEOUT, up)


def _stop_hub(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the hub stops its servers and the proxy), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@attrs.frozen
class Runtime:
    """JupyterHub's interpreter and configurable-http-proxy."""

    python: Path
    chp: str


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    if os.geteuid() != 0:
        pytest.skip("needs root: the hub starts servers as real accounts")
    return Runtime(hub_python(), proxy_command())


def _start_hub(
    runtime: Runtime, work: Path, mapping: Path, policy: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    """Write the hub's configuration into ``work`` and start it (not waiting for it)."""
    # The stand-in is run by the accounts themselves: world-readable; the hub's state
    # (database, cookie secret) is root's alone.
    work.chmod(0o755)
    state = work / "state"
    state.mkdir(mode=0o700)
    standin = work / "standin.py"
    standin.write_text(STANDIN)
    standin.chmod(0o644)
    settings: dict[str, Any] = {
        "port": _free_port(),
        "hub_port": _free_port(),
        "proxy_api_port": _free_port(),
        "state": str(state),
        "chp": runtime.chp,
        "mapping": str(mapping),
        "policy": str(policy),
        "standin": str(standin),
        "token": secrets.token_hex(16),
    }
    config = work / "jupyterhub_config.py"
    config.write_text(
        CONFIG.format(
            settings=settings,
            endpoint=ENDPOINT,
            system_python=SYSTEM_PYTHON,
            spawn_timeout=SPAWN_TIMEOUT,
        )
    )
    log = work / "hub.log"
    env = {
        "PATH": f"{runtime.python.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(runtime.python), "-m", "jupyterhub", "-f", str(config), "--debug"],
            cwd=state,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, settings, log


@pytest.fixture(scope="module")
def hub(runtime: Runtime) -> Iterator[Hub]:
    work = Path(tempfile.mkdtemp(prefix="mep-test-jupyterhub-"))
    deny_group = create_group()
    gpu_group = create_group()
    process: subprocess.Popen[bytes] | None = None
    try:
        mapping = work / "mapping.json"
        mapping.write_text(json.dumps(_mapping()))
        policy = work / "policy.csv"
        policy.write_text(_policy(deny_group, gpu_group))
        process, settings, log = _start_hub(runtime, work, mapping, policy)
        url = f"http://127.0.0.1:{settings['port']}"
        _wait_for_hub(process, url, log)
        standin = Path(settings["standin"])
        yield Hub(url, settings["token"], log, policy, standin, deny_group, gpu_group)
    finally:
        if process is not None:
            _stop_hub(process)
        delete_group(deny_group)
        delete_group(gpu_group)
        shutil.rmtree(work, ignore_errors=True)


# -- a browser's session -------------------------------------------------------------------

# The login form has a hidden _xsrf field; every page has the token in its script.
_XSRF = re.compile(r'name="_xsrf"\s+value="([^"]+)"|xsrf_token:\s*"([^"]+)"')


def _xsrf(page: httpx.Response) -> str:
    found = _XSRF.search(page.text)
    assert found, f"no xsrf token in {page.url}:\n{page.text[:500]}"
    return found.group(1) or found.group(2)


@contextlib.contextmanager
def browser(hub: Hub) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hub.url, follow_redirects=False, timeout=30) as client:
        yield client


def login(client: httpx.Client, name: str) -> httpx.Response:
    page = client.get("/hub/login")
    assert page.status_code == 200, page.text[:500]
    return client.post(
        "/hub/login", data={"username": name, "password": "any", "_xsrf": _xsrf(page)}
    )


def spawn(client: httpx.Client, name: str, profile: str) -> httpx.Response:
    form = client.get(f"/hub/spawn/{name}")
    assert form.status_code == 200, form.text[:500]
    return client.post(f"/hub/spawn/{name}", data={"profile": profile, "_xsrf": _xsrf(form)})


def offered_profiles(client: httpx.Client, name: str) -> list[str]:
    form = client.get(f"/hub/spawn/{name}")
    assert form.status_code == 200, form.text[:500]
    return re.findall(r'<option value="([^"]+)"', form.text)


def standins_of(hub: Hub, uid: int) -> list[int]:
    """Processes of ``uid`` running this hub's stand-in (other processes of a reused uid,
    left by other test runs, do not count)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid and str(hub.standin).encode() in (
                    (entry / "cmdline").read_bytes()
                ):
                    found.append(int(entry.name))
    return found


# -- the tests -----------------------------------------------------------------------------


def test_an_allowed_login_starts_its_server_as_the_mapped_account(
    hub: Hub,
    make_account,  # type: ignore[no-untyped-def]
) -> None:
    entry = make_account()
    name = entry.pw_name
    with browser(hub) as client:
        answer = login(client, f"{name}@{DOMAIN}")
        assert answer.status_code == 302, answer.text[:800]
        # The hub's user is the mapped account, not the login name.
        assert hub.api("GET", f"/users/{name}").status_code == 200
        assert hub.api("GET", f"/users/{name}@{DOMAIN}").status_code == 404

        # Offered only what the policy allows; a profile it does not allow is refused.
        assert offered_profiles(client, name) == ["default", "campus"]
        refused = spawn(client, name, "gpu")
        assert refused.status_code == 403, refused.text[:800]
        assert "the policy does not allow this request (authz.denied)" in refused.text
        assert not hub.server(name)

        started = spawn(client, name, "default")
        assert started.status_code == 302, started.text[:800]
        try:
            _deadline_poll(
                f"{name}'s server ready",
                SPAWN_TIMEOUT,
                lambda: (hub.server(name) or {}).get("ready"),
            )
            whoami = client.get(f"/user/{name}/whoami")
            assert whoami.status_code == 200, whoami.text[:800]
            seen = whoami.json()
            assert seen["user"] == name
            assert seen["resuid"] == [entry.pw_uid] * 3
            assert seen["resgid"] == [entry.pw_gid] * 3
            assert 0 not in seen["groups"]
            assert seen["home"] == entry.pw_dir
            assert seen["path"] == f"/user/{name}/whoami"
            assert (hub.server(name) or {}).get("user_options") == {"profile": "default"}
        finally:
            hub.stop(name)
    assert f"mep: {name} starts profile 'default'" in hub.log_text()


def test_a_group_the_policy_grants_is_offered_and_starts_that_profile(
    hub: Hub,
    make_account,  # type: ignore[no-untyped-def]
) -> None:
    entry = make_account(groups=[hub.gpu_group])
    name = entry.pw_name
    with browser(hub) as client:
        assert login(client, f"{name}@{DOMAIN}").status_code == 302
        assert offered_profiles(client, name) == ["default", "gpu", "campus"]
        assert spawn(client, name, "gpu").status_code == 302
        try:
            _deadline_poll(
                f"{name}'s server ready",
                SPAWN_TIMEOUT,
                lambda: (hub.server(name) or {}).get("ready"),
            )
            seen = client.get(f"/user/{name}/whoami").json()
            assert seen["resuid"] == [entry.pw_uid] * 3
        finally:
            hub.stop(name)


def test_a_denied_account_is_refused_with_the_policys_reason(
    hub: Hub,
    make_account,  # type: ignore[no-untyped-def]
) -> None:
    entry = make_account(groups=[hub.deny_group])
    name = entry.pw_name
    with browser(hub) as client:
        # It maps (the login is fine); the policy refuses it every server.
        assert login(client, f"{name}@{DOMAIN}").status_code == 302
        assert offered_profiles(client, name) == []
        refused = spawn(client, name, "default")
    assert refused.status_code == 403, refused.text[:800]
    assert "the policy does not allow this request (authz.explicit_deny)" in refused.text
    # Over the REST API (no profile: the default one) the same reason, as JSON.
    by_api = hub.api("POST", f"/users/{name}/server")
    assert by_api.status_code == 403, by_api.text
    assert by_api.json()["message"] == (
        "the policy does not allow this request (authz.explicit_deny)"
    )
    assert not hub.server(name)
    assert standins_of(hub, entry.pw_uid) == []
    # The administrator's log names the policy line that denied it.
    deny_line = 5  # the 'deny' line of _policy(), counting its comment
    assert f"{hub.policy}:{deny_line}" in hub.log_text()


@pytest.mark.parametrize(
    ("login_name", "shown", "logged"),
    [
        (
            "someone@elsewhere.example",
            "your identity is not mapped to a local account (identity.no_mapping)",
            "identity.no_mapping",
        ),
        (
            f"root@{DOMAIN}",
            "your identity maps to an account that may not be used (identity.account_refused)",
            "identity.account_root",
        ),
        (
            f"meptnosuchaccount@{DOMAIN}",
            "your identity maps to an account that may not be used (identity.account_refused)",
            "identity.account_missing",
        ),
    ],
)
def test_unmapped_and_unsafe_logins_are_refused(
    hub: Hub, login_name: str, shown: str, logged: str
) -> None:
    with browser(hub) as client:
        answer = login(client, login_name)
    assert answer.status_code == 403, answer.text[:800]
    assert shown in answer.text
    if logged != "identity.no_mapping":
        assert logged not in answer.text  # why an account was refused is the admin's
    assert f"mep: login {login_name!r} refused: {logged}" in hub.log_text()
    name = login_name.split("@", 1)[0]
    assert hub.api("GET", f"/users/{name}").status_code == 404


def test_the_hub_runs_jupyterhub_from_pypi(hub: Hub) -> None:
    version = httpx.get(f"{hub.url}/hub/api", timeout=10).json()["version"]
    assert int(version.split(".")[0]) >= 5, version


def test_a_broken_mapping_file_stops_the_hub_at_start(runtime: Runtime) -> None:
    work = Path(tempfile.mkdtemp(prefix="mep-test-jupyterhub-broken-"))
    try:
        mapping = work / "mapping.json"
        mapping.write_text('[{"DATA_TYPE": "expression_identity_mapping#1.0.0"}]')
        policy = work / "policy.csv"
        policy.write_text(f"p, **, {ENDPOINT}, template:default, start_endpoint, -, allow\n")
        process, _, log = _start_hub(runtime, work, mapping, policy)
        try:
            code = process.wait(timeout=START_TIMEOUT)
        finally:
            _stop_hub(process)
        text = log.read_text(errors="replace")
        assert code != 0, _tail(text, 40)
        assert f"{mapping}" in text and "mappings" in text, _tail(text, 40)
    finally:
        shutil.rmtree(work, ignore_errors=True)
