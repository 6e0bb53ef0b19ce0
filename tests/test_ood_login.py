"""``LoginGate`` (``mepcore.contrib.login``): login names to checked accounts, pure.

The gate behind ``mep-ood-map`` and the JupyterHub mixin, with in-memory accounts and a
fake clock: what a login name becomes, which names are refused before any mapping, and
that every account check of mepd applies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mepcore.contrib.login import MAX_LOGIN_LENGTH, LoginGate, login_identities
from mepcore.errors import IdentityConfigError, IdentityError
from mepcore.identity import AccountPolicy, IdentityMapper
from mepcore.testing import FakeAccountDatabase, FakeClock
from mepcore.types import ShadowEntry

DOCS = [
    {
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [{"source": "{username}", "match": r"(.*)@campus\.example", "output": "{0}"}],
    }
]
DAY = 86_400


class FakeShadow:
    def __init__(self, **entries: ShadowEntry) -> None:
        self.entries = entries

    def by_name(self, name: str) -> ShadowEntry | None:
        return self.entries.get(name)


@pytest.fixture
def accounts() -> FakeAccountDatabase:
    db = FakeAccountDatabase()
    db.add("alice", 1001, groups=[("gpu-users", 2001)])
    db.add("root", 0)
    db.add("daemon", 1)
    db.add("svc", 1500)
    db.add("locked", 1600)
    db.add("expired", 1700)
    db.add("nologin", 1800, shell="/usr/sbin/nologin")
    db.add("Alias", 1900, pw_name="alias")
    return db


@pytest.fixture
def gate(accounts: FakeAccountDatabase) -> LoginGate:
    shadow = FakeShadow(
        locked=ShadowEntry("locked", locked=True),
        expired=ShadowEntry("expired", locked=False, expires=19_000),
    )
    return LoginGate(
        IdentityMapper.from_documents(DOCS),
        policy=AccountPolicy(min_uid=1000, daemon_uid=1500, deny={"blocked"}),
        accounts=accounts,
        shadow=shadow,
        clock=FakeClock(wall=20_000 * DAY),
    )


def test_a_login_is_one_identity_with_id_and_username() -> None:
    identities = login_identities("alice@campus.example")
    assert len(identities) == 1
    assert identities.primary.id == "alice@campus.example"
    assert identities.primary.username == "alice@campus.example"


@pytest.mark.parametrize("login", ["", "a\nb", "a\x00b", "tab\there", "x" * (MAX_LOGIN_LENGTH + 1)])
def test_unusable_login_names_are_refused_before_mapping(gate: LoginGate, login: str) -> None:
    with pytest.raises(IdentityError) as caught:
        gate.resolve(login)
    assert caught.value.reason == "identity.input_invalid"


def test_a_mapped_login_gives_the_checked_account(gate: LoginGate) -> None:
    mapped = gate.resolve("alice@campus.example")
    assert mapped.login == "alice@campus.example"
    assert mapped.account.name == "alice" and mapped.account.uid == 1001
    assert mapped.mapping.username == "alice" and mapped.mapping.rule == 0
    assert mapped.identities == login_identities("alice@campus.example")


def test_an_unmapped_login_is_refused_with_no_mapping(gate: LoginGate) -> None:
    with pytest.raises(IdentityError) as caught:
        gate.resolve("alice@elsewhere.example")
    assert caught.value.reason == "identity.no_mapping"
    assert "alice@elsewhere.example" in caught.value.detail


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("root", "identity.account_root"),
        ("daemon", "identity.account_uid_too_low"),
        ("svc", "identity.account_daemon"),
        ("blocked", "identity.account_denied"),
        ("nobody-here", "identity.account_missing"),
        ("Alias", "identity.account_name_mismatch"),
        ("locked", "identity.account_locked"),
        ("expired", "identity.account_expired"),
        ("nologin", "identity.account_nologin"),
    ],
)
def test_every_account_check_of_mepd_applies(gate: LoginGate, name: str, why: str) -> None:
    with pytest.raises(IdentityError) as caught:
        gate.resolve(f"{name}@campus.example")
    assert caught.value.admin_reason == why
    assert caught.value.reason == "identity.account_refused"
    # What the person logging in may see does not say which check failed.
    assert "may not be used" in caught.value.public_message


def test_check_sees_a_change_since_the_login(
    accounts: FakeAccountDatabase, gate: LoginGate
) -> None:
    assert gate.check("alice").uid == 1001
    accounts.add("alice", 0)  # the account changed under the same name
    with pytest.raises(IdentityError):
        gate.check("alice")


def test_from_file_reads_the_mapping_and_refuses_a_broken_one(tmp_path: Path) -> None:
    good = tmp_path / "mapping.json"
    good.write_text(json.dumps(DOCS))
    accounts = FakeAccountDatabase()
    accounts.add("alice", 1001)
    gate = LoginGate.from_file(good, accounts=accounts, timeout=2.0)
    assert gate.resolve("alice@campus.example").account.name == "alice"
    assert gate.mapper.timeout == 2.0 and gate.shadow is None
    broken = tmp_path / "broken.json"
    broken.write_text("[{}]")
    with pytest.raises(IdentityConfigError):
        LoginGate.from_file(broken)
