"""Accounts are re-verified at every use (DESIGN.md §3.9): locked, expired and
``nologin`` accounts are refused; a user endpoint is bound to the account it was started
for and is never reused after the account changed; PAM account management and sessions.

The pure part runs everywhere; the rest is marked ``root`` and uses real accounts
(useradd/usermod/chage/userdel), the real shadow file, real PAM service files under
/etc/pam.d (written and removed by the test) and a real ``mepd serve``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.errors import IdentityError
from mepcore.identity import AccountPolicy, check_account
from mepcore.ports import SystemAccountDatabase, SystemShadowDatabase, shadow_entry
from mepcore.tasks import pack_args, pack_function, unpack_value
from mepcore.testing import FakeAccountDatabase
from mepcore.types import ShadowEntry
from tests.daemon_harness import remote_function, running_daemon, wait_all, write_deployment
from tests.test_registry_root import request, settings  # noqa: F401 - a fixture

TODAY = 20_000  # days since 1970-01-01


class Shadow:
    def __init__(self, *entries: ShadowEntry) -> None:
        self.entries = {e.name: e for e in entries}

    def by_name(self, name: str) -> ShadowEntry | None:
        return self.entries.get(name)


def refusal(name: str, shadow: Shadow | None, **policy: Any) -> str | None:
    db = FakeAccountDatabase()
    db.add("alice", 2001)
    db.add("svc", 2002, shell="/usr/sbin/nologin")
    db.add("falsy", 2003, shell="/bin/false")
    try:
        check_account(name, db, AccountPolicy(**policy), shadow=shadow, today=TODAY)
    except IdentityError as exc:
        return exc.admin_reason
    return None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (ShadowEntry("alice", locked=False), None),
        (ShadowEntry("alice", locked=True), "identity.account_locked"),
        (ShadowEntry("alice", locked=False, expires=TODAY), "identity.account_expired"),
        (ShadowEntry("alice", locked=False, expires=TODAY - 1), "identity.account_expired"),
        (ShadowEntry("alice", locked=False, expires=TODAY + 1), None),
        (
            ShadowEntry("alice", locked=False, last_change=TODAY - 100, max_days=99),
            "identity.account_expired",
        ),
        (ShadowEntry("alice", locked=False, last_change=TODAY - 100, max_days=100), None),
        (ShadowEntry("alice", locked=False, last_change=0, max_days=10), None),
        (ShadowEntry("alice", locked=False, last_change=TODAY - 5, max_days=None), None),
    ],
)
def test_locked_and_expired_accounts_are_refused(entry: ShadowEntry, expected: str | None) -> None:
    assert refusal("alice", Shadow(entry)) == expected


def test_an_account_without_a_shadow_entry_is_checked_by_the_rest() -> None:
    assert refusal("alice", Shadow()) is None
    assert refusal("alice", None) is None


def test_nologin_and_false_shells_are_refused_unless_allowed() -> None:
    assert refusal("svc", None) == "identity.account_nologin"
    assert refusal("falsy", Shadow()) == "identity.account_nologin"
    assert refusal("svc", None, allow_nologin_shell=True) is None


def test_shadow_lines_are_read_as_shadow5_says() -> None:
    locked = shadow_entry(["bob", "!$6$x", "19000", "0", "99999", "7", "", "", ""])
    assert locked.locked and locked.last_change == 19000 and locked.max_days == 99999
    assert locked.expires is None and locked.inactive_days is None
    star = shadow_entry(["daemon", "*", "19000", "0", "99999", "7", "", "", ""])
    assert star.locked
    open_ = shadow_entry(["carol", "$6$salt$hash", "19000", "0", "99999", "7", "3", "19500", ""])
    assert not open_.locked and open_.expires == 19500 and open_.inactive_days == 3
    odd = shadow_entry(["dave", "$6$h", "x", "0", "y", "7", "", "z", ""])
    assert odd.last_change is None and odd.max_days is None and odd.expires is None


# -- real accounts ------------------------------------------------------------------------


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.mark.root
def test_real_locked_expired_and_nologin_accounts_are_refused(make_account: Any) -> None:
    today = int(time.time() // 86400)
    shadow, accounts = SystemShadowDatabase(), SystemAccountDatabase()

    def reason(name: str) -> str | None:
        try:
            check_account(name, accounts, AccountPolicy(), shadow=shadow, today=today)
        except IdentityError as exc:
            return exc.admin_reason
        return None

    usable, locked, expired, nologin = (make_account() for _ in range(4))
    _run("usermod", "--lock", locked.pw_name)
    _run("chage", "--expiredate", "1970-01-02", expired.pw_name)
    _run("usermod", "--shell", "/usr/sbin/nologin", nologin.pw_name)
    assert reason(usable.pw_name) is None
    assert reason(locked.pw_name) == "identity.account_locked"
    assert reason(expired.pw_name) == "identity.account_expired"
    assert reason(nologin.pw_name) == "identity.account_nologin"


WHOAMI = remote_function("def whoami():\n    import os\n    return os.getuid()\n", "whoami")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def runtime() -> tuple[str, tuple[str, ...]]:
    from tests.runtime_venv import package_paths, runtime_python

    python = runtime_python()
    return python, tuple(p for p in package_paths(python) if os.path.isdir(p))


def _whoami(client: Any, fid: str) -> dict[str, Any]:
    r = client.post(
        "/v1/endpoints/hpc/submit",
        json={"tasks": [{"function_id": fid, "args": b64(pack_args((), {}))}]},
    )
    assert r.status_code == 200, r.text
    (view,) = wait_all(client, r.json()["task_ids"]).values()
    return dict(view)


@pytest.mark.root
@pytest.mark.slow
def test_a_reused_name_never_runs_in_the_old_accounts_endpoint(
    tmp_path: Path, make_account: Any, runtime: tuple[str, tuple[str, ...]]
) -> None:
    """userdel + useradd give the name another uid: the next task runs as the new uid,
    in a new user endpoint; the old one is stopped."""
    from tests.accounts import UNKNOWN_PASSWORD_HASH

    acct = make_account()
    config = write_deployment(tmp_path / "site", python=runtime[0], package_paths=runtime[1])
    with running_daemon(config, tmp_path / "site" / "state") as daemon:
        client = daemon.client(daemon.token(f"{acct.pw_name}@example.org"))
        fid, body = pack_function(WHOAMI)
        assert client.post("/v1/functions", json={"function": b64(body)}).status_code == 200
        first = _whoami(client, fid)
        assert unpack_value(base64.b64decode(first["result"])) == acct.pw_uid
        old_pid = client.get("/v1/endpoints/hpc/status").json()["user_endpoints"][0]["pid"]

        subprocess.run(["pkill", "-KILL", "-u", acct.pw_name], check=False)
        _run("userdel", "--force", acct.pw_name)
        new_uid = acct.pw_uid + 1 + secrets.randbelow(1000)
        while True:
            try:
                pwd.getpwuid(new_uid)
                new_uid += 1
            except KeyError:
                break
        _run(
            "useradd", "--uid", str(new_uid), "--home-dir", acct.pw_dir, "--shell", "/bin/sh",
            "--user-group", "--password", UNKNOWN_PASSWORD_HASH, acct.pw_name,
        )  # fmt: skip
        os.chown(acct.pw_dir, new_uid, pwd.getpwnam(acct.pw_name).pw_gid)
        second = _whoami(client, fid)
        assert second["state"] == "success", second
        assert unpack_value(base64.b64decode(second["result"])) == new_uid
        entries = client.get("/v1/endpoints/hpc/status").json()["user_endpoints"]
        assert old_pid not in [e["pid"] for e in entries if e["state"] == "ready"]


# -- PAM ------------------------------------------------------------------------------


@pytest.fixture
def pam_service() -> Iterator[Any]:
    """Write /etc/pam.d/<name> with the given stacks; removed afterwards."""
    made: list[Path] = []

    def write(account: str, session: str = "session required pam_permit.so") -> str:
        name = f"mep-test-{secrets.token_hex(4)}"
        path = Path("/etc/pam.d") / name
        path.write_text(f"account {account}\n{session}\nauth required pam_deny.so\n")
        made.append(path)
        return name

    yield write
    for path in made:
        path.unlink(missing_ok=True)


@pytest.mark.root
def test_pam_account_management_refuses_and_permits(
    make_account: Any,
    pam_service: Any,
    settings: Any,  # noqa: F811 - the fixture imported above
) -> None:
    from mepd.pam import PamSessions
    from mepd.registry import Registry, RegistryLimits

    acct = SystemAccountDatabase().by_name(make_account().pw_name)
    assert acct is not None
    deny = PamSessions(pam_service("required pam_deny.so"))
    with pytest.raises(IdentityError) as refused:
        asyncio.run(deny.open(acct))
    assert refused.value.admin_reason == "identity.pam_refused"
    assert deny.service in refused.value.detail

    permit = PamSessions(pam_service("required pam_permit.so"))
    asyncio.run(permit.open(acct))
    asyncio.run(permit.close(acct))

    # Through the registry: a refused start starts nothing.
    async def start_with(sessions: PamSessions) -> str:
        registry = Registry(
            settings,
            RegistryLimits(start_timeout=30.0, stop_grace=2.0),
            on_result=lambda *a: None,
            on_lost=lambda *a: None,
            sessions=sessions,
        )
        try:
            handle = await registry.get_or_start(request(acct))
            return handle.state
        except IdentityError as exc:
            return exc.admin_reason
        finally:
            await registry.shutdown()

    assert asyncio.run(start_with(deny)) == "identity.pam_refused"
    assert asyncio.run(start_with(permit)) == "ready"
