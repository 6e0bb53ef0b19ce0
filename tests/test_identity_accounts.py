"""Account checks on a mapped name, with the in-memory password database."""

from __future__ import annotations

from typing import Any

import pytest

from mepcore.errors import REASONS, IdentityError
from mepcore.identity import AccountPolicy, IdentityMapper, check_account, is_portable_username
from mepcore.testing import FakeAccountDatabase
from mepcore.types import IdentitySet

POLICY = AccountPolicy(min_uid=1000, daemon_uid=1500, deny=frozenset({"nobody"}))


@pytest.fixture
def db() -> FakeAccountDatabase:
    accounts = FakeAccountDatabase()
    accounts.add("root", 0)
    accounts.add("daemon", 1)
    accounts.add("svc", 999)
    accounts.add("alice", 1001, groups=[("lab", 2000)], home="/home/alice")
    accounts.add("bob", 1002)
    accounts.add("mepd", 1500)
    accounts.add("nobody", 65534)
    accounts.add("Carol", 1003, pw_name="carol")  # an NSS back end answering by alias
    accounts.add("0", 0)  # what a buggy database might answer for an all-digit name
    accounts.add("4294967295", 1004)
    return accounts


def refused(name: str, db: FakeAccountDatabase, policy: AccountPolicy = POLICY) -> str:
    with pytest.raises(IdentityError) as info:
        check_account(name, db, policy)
    error = info.value
    # The public message must not reveal whether the account exists.
    assert not name or name not in error.public_message
    assert error.public_message == REASONS[error.reason]
    return error.reason


def test_ordinary_account_is_accepted(db: FakeAccountDatabase) -> None:
    account = check_account("alice", db, POLICY)
    assert (account.name, account.uid, account.home) == ("alice", 1001, "/home/alice")
    assert "lab" in account.group_names


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("root", "identity.account_root"),
        ("0", "identity.invalid_username"),
        ("-1", "identity.invalid_username"),
        ("4294967295", "identity.invalid_username"),
        ("daemon", "identity.account_uid_too_low"),
        ("svc", "identity.account_uid_too_low"),
        ("mepd", "identity.account_daemon"),
        ("nobody", "identity.account_denied"),
        ("mallory", "identity.account_missing"),
        ("Carol", "identity.account_name_mismatch"),
        ("аlice", "identity.invalid_username"),  # Cyrillic а
        ("alicе", "identity.invalid_username"),  # Cyrillic е
        ("ａlice", "identity.invalid_username"),  # full-width a
        ("", "identity.invalid_username"),
        ("alice\n", "identity.invalid_username"),
        ("al ice", "identity.invalid_username"),
        ("../alice", "identity.invalid_username"),
        ("alice:x", "identity.invalid_username"),
        ("a" * 33, "identity.invalid_username"),
    ],
)
def test_refusals_each_have_their_own_reason(
    name: str, reason: str, db: FakeAccountDatabase
) -> None:
    assert refused(name, db) == reason


def test_root_is_refused_even_with_min_uid_zero(db: FakeAccountDatabase) -> None:
    assert refused("root", db, AccountPolicy(min_uid=0)) == "identity.account_root"


def test_uid_exactly_min_uid_is_accepted(db: FakeAccountDatabase) -> None:
    assert check_account("svc", db, AccountPolicy(min_uid=999)).uid == 999
    assert refused("svc", db, AccountPolicy(min_uid=1000)) == "identity.account_uid_too_low"


def test_daemon_uid_refused_only_when_given(db: FakeAccountDatabase) -> None:
    assert check_account("mepd", db, AccountPolicy()).uid == 1500


def test_deny_list_is_checked_before_the_lookup() -> None:
    # A denied name is refused the same way whether or not it exists.
    assert refused("ghost", FakeAccountDatabase(), AccountPolicy(deny=["ghost"])) == (
        "identity.account_denied"
    )


def test_policy_refuses_negative_min_uid() -> None:
    with pytest.raises(ValueError, match="min_uid"):
        AccountPolicy(min_uid=-1)


@pytest.mark.parametrize(
    "name", ["alice", "a", "a.b", "_svc", "a-b", "A1", "x" * 32, "1alice", "user.1"]
)
def test_portable_names(name: str) -> None:
    assert is_portable_username(name)


@pytest.mark.parametrize(
    "name",
    ["", "-a", "0", "123", "4294967295", ".", "..", "x" * 33, "é", "a b", "a/b", "a@b", "a$"],
)
def test_non_portable_names(name: str) -> None:
    assert not is_portable_username(name)


def test_non_string_is_not_portable() -> None:
    value: Any = 5
    assert not is_portable_username(value)


# -- mapping and checking together: the bad outputs of the issue ------------------


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("root", "identity.account_root"),
        ("0", "identity.invalid_username"),
        ("-1", "identity.invalid_username"),
        ("4294967295", "identity.invalid_username"),
        ("svc", "identity.account_uid_too_low"),
        ("nosuchuser", "identity.account_missing"),
        ("аlice", "identity.invalid_username"),
    ],
)
def test_mapping_outputs_that_must_not_become_accounts(
    output: str, reason: str, db: FakeAccountDatabase
) -> None:
    mapper = IdentityMapper.from_documents(
        [
            {
                "DATA_TYPE": "expression_identity_mapping#1.0.0",
                "mappings": [{"source": "{username}", "match": "(.*)", "output": "{0}"}],
            }
        ]
    )
    result = mapper.map(IdentitySet.from_json({"id": "x", "username": output}))
    assert result.username == output  # the mapping produced it; the check refuses it
    assert refused(output, db) == reason
