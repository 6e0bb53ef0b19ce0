"""The L0 pieces: the error catalogue, identity values, the account database port."""

from __future__ import annotations

import os

import pytest

from mepcore.errors import REASONS, ConfigError, IdentityError, MepError, Violation
from mepcore.ports import SystemAccountDatabase
from mepcore.testing import FakeAccountDatabase, FakeClock
from mepcore.types import Identity, IdentitySet


def test_every_reason_is_dotted_and_has_a_public_message() -> None:
    for code, message in REASONS.items():
        area, _, name = code.partition(".")
        assert area and name, code
        assert message and "\n" not in message


def test_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reason"):
        MepError("identity.no_such_reason")


def test_public_view_hides_detail() -> None:
    err = IdentityError("identity.mapper_failed", "program /opt/map exited with status 3")
    public = err.to_public()
    assert public == {"reason": "identity.mapper_failed", "message": REASONS[err.reason]}
    assert "/opt/map" not in str(public)


def test_public_view_hides_why_an_account_was_refused() -> None:
    err = IdentityError("identity.account_missing", "no account 'bob' on this host")
    public = err.to_public()
    assert public == {"reason": "identity.account_refused", "message": REASONS[err.reason]}
    assert err.admin_reason == "identity.account_missing"
    assert "bob" not in str(public)


def test_caller_violations_are_public() -> None:
    err = ConfigError("config.invalid_variables", violations=[Violation("$.a", "bad")])
    assert err.to_public()["violations"] == [{"path": "$.a", "message": "bad", "code": "invalid"}]


@pytest.mark.parametrize(
    ("data", "ids"),
    [
        ({"identities": [{"id": "a"}, {"id": "b"}]}, ["a", "b"]),
        ([{"id": "a"}], ["a"]),
        ({"id": "a", "username": "x@y"}, ["a"]),
    ],
)
def test_identity_set_shapes(data: object, ids: list[str]) -> None:
    assert [i.id for i in IdentitySet.from_json(data)] == ids


@pytest.mark.parametrize("data", [{"identities": "x"}, [], [{"id": ""}], [{"username": "a"}], 3])
def test_identity_set_refuses_bad_input(data: object) -> None:
    with pytest.raises(IdentityError) as info:
        IdentitySet.from_json(data)
    assert info.value.reason == "identity.input_invalid"


def test_identity_domain() -> None:
    assert Identity.from_mapping({"id": "1", "username": "a@b@example.org"}).domain == "example.org"
    assert Identity.from_mapping({"id": "1", "username": "alice"}).domain is None


def test_system_account_database_knows_root_and_this_process() -> None:
    db = SystemAccountDatabase()
    root = db.by_name("root")
    assert root is not None and root.uid == 0 and 0 in root.group_ids
    me = db.by_uid(os.getuid())
    assert me is not None and me.uid == os.getuid()
    assert db.by_name("no-such-account-mep") is None
    assert db.by_name("bad\x00name") is None


def test_fakes() -> None:
    db = FakeAccountDatabase()
    acct = db.add("alice", 1500, groups=[("gpu", 3000)])
    assert db.by_name("alice") == acct and db.by_uid(1500) == acct
    assert acct.group_names == ("alice", "gpu")
    clock = FakeClock()
    before = clock.now()
    clock.advance(5)
    assert clock.now() == before + 5
