"""The ``Executor`` against a real ``mepd serve`` on 127.0.0.1 with real user endpoints.

As root, two identities map to two real accounts created for the run (and removed
after), and user endpoints run as those accounts from a world-readable runtime venv
(``tests/runtime_venv.py``). Not as root the daemon refuses to map anyone to its own
account, so these tests are skipped (``test_client_executor.py`` covers the client's
behaviour against the daemon's API without root).

Functions travel with dill like a scientist's script sends them: they are defined in a
``__main__`` namespace (``REMOTE``), so dill sends them by value.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from mepcore.client import (
    Client,
    Executor,
    RemoteException,
    RequestRefused,
    TaskInfrastructureError,
    pack_function,
)
from tests.daemon_harness import RunningDaemon, start_daemon
from tests.test_client_executor import CountingTransport

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

REMOTE_SOURCE = textwrap.dedent(
    """
    def square(x):
        return x * x

    def add(x, y=0):
        return x + y

    def whoami(tag=None):
        import os, pwd
        return tag, os.getuid(), pwd.getpwuid(os.getuid()).pw_name

    def fail(x):
        raise ValueError(f"no good: {x}")

    def nap(seconds):
        import time
        time.sleep(seconds)
        return seconds
    """
)


def remote_functions() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(REMOTE_SOURCE, "<remote>", "exec"), namespace)
    return namespace


REMOTE = remote_functions()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class Site:
    config: Path
    state_dir: Path
    accounts: dict[str, Any]  # identity username -> password entry
    daemon: RunningDaemon | None = None

    def start(self) -> RunningDaemon:
        self.daemon = start_daemon(self.config, self.state_dir)
        return self.daemon

    def executor(
        self, who: str = "alice@example.org", endpoint: str = "demo", **kwargs: Any
    ) -> Executor:
        assert self.daemon is not None
        return Executor(endpoint, url=self.daemon.url, token=self.daemon.token(who), **kwargs)


def write_site(top: Path, accounts: dict[str, Any], *, port: int = 0) -> Path:
    from tests.runtime_venv import runtime_python

    (top / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
    template_dir = REPO / "examples" / "templates" / "local"
    rules = [
        {
            "source": "{username}",
            "match": username.replace(".", "\\."),
            "output": entry.pw_name,
            "literal": False,
        }
        for username, entry in accounts.items()
    ]
    (top / "mapping.json").write_text(
        json.dumps([{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": rules}])
    )
    (top / "policy.csv").write_text(
        "p, domain:example.org, demo, **, *, -, allow\n"
        "p, domain:example.org, strict, **, *, -, allow\n"
    )
    allowed = pack_function(REMOTE["square"])[0]
    endpoint = {
        "template": str(template_dir / "user_config_template.yaml.j2"),
        "schema": str(template_dir / "user_config_schema.json"),
        "mapping": str(top / "mapping.json"),
        "policy_model": str(REPO / "policies" / "model.conf"),
        "policy": str(top / "policy.csv"),
    }
    settings = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_dir": str(top / "state"),
        "python": runtime_python(),
        "limits": {"drain_timeout": 5},
        "endpoints": [
            {"name": "demo", **endpoint},
            {"name": "strict", **endpoint, "allowed_functions": [allowed]},
        ],
    }
    config = top / "settings.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    return config


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: user endpoints run as real accounts")
    from tests.accounts import create_account, delete_account

    made = {"alice@example.org": create_account(), "bob@example.org": create_account()}
    try:
        yield made
    finally:
        for entry in made.values():
            delete_account(entry.pw_name)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, accounts: dict[str, Any]) -> Iterator[Site]:
    top = tmp_path_factory.mktemp("client-daemon")
    running = Site(write_site(top, accounts), top / "state", accounts)
    running.start()
    try:
        yield running
    finally:
        assert running.daemon is not None
        running.daemon.stop()


def test_ten_thousand_futures_have_correct_results(site: Site) -> None:
    square = REMOTE["square"]
    with site.executor() as ex:
        futures = [ex.submit(square, i) for i in range(10_000)]
        results = [f.result(120) for f in futures]
    assert results == [i * i for i in range(10_000)]


def test_map(site: Site) -> None:
    with site.executor() as ex:
        assert list(ex.map(REMOTE["add"], range(100), range(100), timeout=120)) == [
            2 * i for i in range(100)
        ]


def test_each_identity_runs_as_its_own_account(site: Site) -> None:
    for who, entry in site.accounts.items():
        with site.executor(who) as ex:
            assert ex.submit(REMOTE["whoami"], who).result(60) == (who, entry.pw_uid, entry.pw_name)


def test_remote_exception_type_message_and_traceback(site: Site) -> None:
    with site.executor() as ex:
        exc = ex.submit(REMOTE["fail"], 3).exception(60)
    assert isinstance(exc, RemoteException)
    assert (exc.type_name, exc.message) == ("ValueError", "no good: 3")
    assert 'File "<remote>"' in exc.traceback and "in fail" in exc.traceback


def test_walltime_is_an_infrastructure_failure(site: Site) -> None:
    with site.executor(walltime=1.0) as ex:
        exc = ex.submit(REMOTE["nap"], 30).exception(60)
    assert isinstance(exc, TaskInfrastructureError) and exc.reason == "task.timeout"


def test_cancellation_before_dispatch(site: Site) -> None:
    assert site.daemon is not None
    transport = CountingTransport()
    transport.gate.clear()
    client = Client(site.daemon.url, site.daemon.token("alice@example.org"), transport=transport)
    ex = Executor("demo", client=client)
    try:
        first = ex.submit(REMOTE["square"], 3)
        assert transport.holding.wait(30)
        later = [ex.submit(REMOTE["square"], i) for i in range(4)]
        assert later[0].cancel() and later[2].cancel()
        assert first.cancel() is False
    finally:
        transport.gate.set()
        ex.shutdown(wait=True)
        client.close()
    assert first.result() == 9
    assert [later[1].result(), later[3].result()] == [1, 9]
    assert later[0].cancelled() and later[2].cancelled()


def test_changing_user_endpoint_config_gives_two_user_endpoints(site: Site) -> None:
    who = "bob@example.org"
    with site.executor(who, user_endpoint_config={"max_workers": 1}) as ex:
        one = ex.submit(REMOTE["whoami"], "one")
        ex.user_endpoint_config = {"max_workers": 2, "display_name": "wider"}
        two = ex.submit(REMOTE["whoami"], "two")
        assert one.result(60)[0] == "one" and two.result(60)[0] == "two"
        status = ex.client.status("demo")
    keys = {e["config_key"] for e in status["user_endpoints"]}
    assert len(keys) >= 2


def test_refusals_carry_the_reason(site: Site) -> None:
    with site.executor("mallory@example.org") as ex:
        exc = ex.submit(REMOTE["square"], 2).exception(60)
    assert isinstance(exc, RequestRefused)
    assert (exc.status, exc.reason) == (403, "identity.no_mapping")
    with site.executor(endpoint="strict") as ex:
        allowed = ex.submit(REMOTE["square"], 5)
        refused = ex.submit(REMOTE["add"], 1, 2)
        assert allowed.result(60) == 25
        exc = refused.exception(60)
    assert isinstance(exc, RequestRefused)
    assert (exc.status, exc.reason) == (403, "task.function_not_allowed")
    with site.executor(user_endpoint_config={"max_workers": 99}) as ex:
        exc = ex.submit(REMOTE["square"], 2).exception(60)
    assert isinstance(exc, RequestRefused) and exc.status == 422
    assert [v.path for v in exc.violations] == ["$.max_workers"]


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from mepcore.client import Executor
    url, token = sys.argv[1:3]
    with Executor("demo", url=url, token=token) as ex:
        futures = [ex.submit(pow, 3, i) for i in range(200)]
    assert [f.result() for f in futures] == [3 ** i for i in range(200)]
    assert not [t for t in threading.enumerate() if t.name.startswith("mep-")]
    print("bye")
    """
)


def test_the_client_process_exits_after_shutdown(site: Site, tmp_path: Path) -> None:
    assert site.daemon is not None
    script = tmp_path / "exit_check.py"
    script.write_text(EXIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "MEP_TOKEN"}
    done = subprocess.run(
        [sys.executable, str(script), site.daemon.url, site.daemon.token("alice@example.org")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(REPO),
    )
    assert (done.returncode, done.stdout.strip()) == (0, "bye"), done.stderr


def test_daemon_restart_during_a_run(tmp_path: Path, accounts: dict[str, Any]) -> None:
    running = Site(write_site(tmp_path, accounts, port=free_port()), tmp_path / "state", accounts)
    daemon = running.start()
    try:
        with running.executor(give_up_after=120) as ex:
            done_before = [ex.submit(REMOTE["square"], i) for i in range(200)]
            assert [f.result(60) for f in done_before] == [i * i for i in range(200)]
            stuck = [ex.submit(REMOTE["nap"], 60) for _ in range(2)]
            deadline = time.monotonic() + 60
            while not all(f.task_id for f in stuck):
                assert time.monotonic() < deadline
                time.sleep(0.05)  # polling interval of a deadline loop
            daemon.kill()  # kill -9, tasks running
            daemon = running.start()
            after = [ex.submit(REMOTE["square"], i) for i in range(200)]
            assert [f.result(60) for f in after] == [i * i for i in range(200)]
            for future in stuck:
                exc = future.exception(60)
                assert isinstance(exc, TaskInfrastructureError)
                assert exc.reason == "task.endpoint_lost"
    finally:
        daemon.stop()
