"""Account checks, pinned where mutation testing (``make mutation``) found them loose.

Each refusal carries its own code, an admin detail that names the account and the rule,
and the account name as context (the audit record's); ``only_uid`` (the unprivileged
daemon) serves its own uid only; a shadow entry's expiry is applied only when the day is
known, and a password with ``max_days`` 0 expires the day after it was set.
"""

from __future__ import annotations

import pytest

from mepcore.errors import IdentityError
from mepcore.identity import AccountPolicy, check_account
from mepcore.identity.accounts import shadow_expiry
from mepcore.testing import FakeAccountDatabase
from mepcore.types import ShadowEntry

TODAY = 20_000  # days since 1970-01-01


class Shadow:
    def __init__(self, *entries: ShadowEntry) -> None:
        self.entries = {e.name: e for e in entries}

    def by_name(self, name: str) -> ShadowEntry | None:
        return self.entries.get(name)


def database() -> FakeAccountDatabase:
    db = FakeAccountDatabase()
    db.add("root", 0)
    db.add("svc", 999)
    db.add("alice", 2001)
    db.add("bob", 2002)
    db.add("mepd", 1500)
    db.add("Carol", 2003, pw_name="carol")
    db.add("batch", 2004, shell="/usr/sbin/nologin")
    db.add("bare", 2005, shell="nologin")
    db.add("stop", 2006, shell="/bin/false")
    return db


def specific_reason(error: IdentityError) -> str:
    """The code as raised: callers may see one common code for every refused account
    (``admin_reason`` keeps the specific one); both are the same where they are not."""
    return str(getattr(error, "admin_reason", error.reason))


def refusal(name: str, policy: AccountPolicy, **kwargs: object) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        check_account(name, database(), policy, **kwargs)  # type: ignore[arg-type]
    return info.value


POLICY = AccountPolicy(min_uid=1000, daemon_uid=1500, deny=frozenset({"bob"}))


@pytest.mark.parametrize(
    ("name", "reason", "why"),
    [
        ("al ice", "identity.invalid_username", "not a portable POSIX user name"),
        ("bob", "identity.account_denied", "on the deny list"),
        ("mallory", "identity.account_missing", "no such account"),
        ("Carol", "identity.account_name_mismatch", "the account database answered with 'carol'"),
        ("root", "identity.account_root", "uid 0"),
        ("mepd", "identity.account_daemon", "uid 1500 is the daemon's own"),
        ("svc", "identity.account_uid_too_low", "uid 999 is below the minimum 1000"),
        ("batch", "identity.account_nologin", "its shell is /usr/sbin/nologin"),
    ],
)
def test_each_refusal_tells_the_administrator_which_account_and_why(
    name: str, reason: str, why: str
) -> None:
    error = refusal(name, POLICY)
    assert specific_reason(error) == reason
    assert error.detail == f"account {name!r} refused: {why}"
    assert dict(error.context) == {"username": name}


def test_an_unprivileged_daemon_serves_only_its_own_uid() -> None:
    policy = AccountPolicy(min_uid=1000, only_uid=2001)
    assert check_account("alice", database(), policy).uid == 2001
    error = refusal("bob", policy)
    assert specific_reason(error) == "identity.account_not_served"
    assert error.detail == (
        "account 'bob' refused: this daemon runs unprivileged (uid 2001) "
        "and can only serve its own account"
    )
    assert dict(error.context) == {"username": "bob"}


@pytest.mark.parametrize("name", ["batch", "bare", "stop"])
def test_a_nologin_or_false_shell_is_refused_with_or_without_a_directory(name: str) -> None:
    error = refusal(name, AccountPolicy())
    assert specific_reason(error) == "identity.account_nologin"
    assert check_account(name, database(), AccountPolicy(allow_nologin_shell=True)).name == name


def test_locked_and_expired_refusals_say_why() -> None:
    locked = refusal(
        "alice", AccountPolicy(), shadow=Shadow(ShadowEntry("alice", locked=True)), today=TODAY
    )
    assert specific_reason(locked) == "identity.account_locked"
    assert locked.detail == "account 'alice' refused: locked in the shadow database"
    assert dict(locked.context) == {"username": "alice"}

    expired = refusal(
        "alice",
        AccountPolicy(),
        shadow=Shadow(ShadowEntry("alice", locked=False, expires=TODAY)),
        today=TODAY,
    )
    assert specific_reason(expired) == "identity.account_expired"
    assert expired.detail == f"account 'alice' refused: the account expired on day {TODAY}"
    assert dict(expired.context) == {"username": "alice"}


def test_expiry_is_not_judged_without_the_date() -> None:
    # The shadow entry is still read (a locked account is refused), but with no date
    # there is no expiry to compare with.
    shadow = Shadow(ShadowEntry("alice", locked=False, expires=1, last_change=1, max_days=1))
    assert check_account("alice", database(), AccountPolicy(), shadow=shadow).uid == 2001


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        # max_days 0: the password must be changed every day, so it expired the day after.
        (ShadowEntry("a", False, last_change=TODAY - 1, max_days=0), f"day {TODAY - 1}"),
        (ShadowEntry("a", False, last_change=TODAY, max_days=0), None),
        (ShadowEntry("a", False, last_change=TODAY - 10, max_days=9), f"day {TODAY - 1}"),
        (ShadowEntry("a", False, last_change=TODAY - 10, max_days=10), None),
        (ShadowEntry("a", False, last_change=TODAY - 10, max_days=-1), None),  # no limit
        (ShadowEntry("a", False, last_change=0, max_days=1), None),  # change at next login
        (ShadowEntry("a", False, expires=TODAY + 1), None),
        (ShadowEntry("a", False, expires=TODAY), f"day {TODAY}"),
    ],
)
def test_password_and_account_expiry_days(entry: ShadowEntry, why: str | None) -> None:
    answer = shadow_expiry(entry, TODAY)
    if why is None:
        assert answer is None
    else:
        assert answer is not None and answer.endswith(why)
