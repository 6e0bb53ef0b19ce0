"""Account checks on a mapped name, with the in-memory password database."""

from __future__ import annotations

from typing import Any

import pytest

from mepcore.errors import ADMIN_ONLY_REASONS, REASONS, IdentityError
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
    """The specific reason (for administrators) ``check_account`` refused ``name`` with;
    whatever it is, the caller's view is the one public code and message."""
    with pytest.raises(IdentityError) as info:
        check_account(name, db, policy)
    error = info.value
    # The public view must not reveal whether the account exists, nor why it is refused.
    assert not name or name not in error.public_message
    assert error.to_public() == {
        "reason": "identity.account_refused",
        "message": REASONS["identity.account_refused"],
    }
    assert error.admin_reason in ADMIN_ONLY_REASONS
    return error.admin_reason


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


# -- what a caller sees of a refusal: one code, whatever the reason -------------------


def test_every_account_refusal_has_one_public_code() -> None:
    # Every specific refusal code, including those raised outside check_account
    # (locked, expired, nologin, PAM), stands for the same public code and message.
    assert set(ADMIN_ONLY_REASONS.values()) == {"identity.account_refused"}
    for code in ADMIN_ONLY_REASONS:
        assert code in REASONS
        error = IdentityError(code, "account 'alice' refused: because")
        assert (error.reason, error.admin_reason) == ("identity.account_refused", code)
        assert error.to_public() == {
            "reason": "identity.account_refused",
            "message": REASONS["identity.account_refused"],
        }
        assert str(error).startswith(f"{code}: ")  # what logs print keeps the detail


def test_a_raiser_cannot_leak_the_specific_refusal_in_the_public_message() -> None:
    error = IdentityError("identity.account_locked", public_message="account alice is locked")
    assert error.public_message == REASONS["identity.account_refused"]


def test_other_codes_are_their_own_public_code() -> None:
    error = IdentityError("identity.no_mapping", "no rule matched")
    assert error.reason == error.admin_reason == "identity.no_mapping"
