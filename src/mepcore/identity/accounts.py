"""Safety checks on the local account a mapping produced, enforced in code.

``check_account`` turns a mapped name into an ``Account`` or refuses it with its own
reason code: not a portable POSIX name, on the deny list, absent, answered under
another name, uid 0, the daemon's own uid, a uid below ``min_uid``, a ``nologin`` or
``false`` shell, or (with a shadow database) locked or expired. That code is the
error's ``admin_reason``: callers see only ``identity.account_refused`` and its message
(``mepcore.errors.ADMIN_ONLY_REASONS``), so they cannot probe which accounts exist or
why one is refused; the code and the detail, for administrators, say.

Deliberately not here: which identity maps to which name (``expression``/``external``)
and anything a policy decides (``mepcore.authz``). These checks apply whatever the
mapping or the policy says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from mepcore.errors import IdentityError
from mepcore.ports import AccountDatabase, ShadowDatabase
from mepcore.types import Account, ShadowEntry

MAX_USERNAME_LENGTH = 32
# The POSIX portable filename character set, not starting with a hyphen. Written out
# with explicit ASCII ranges: \w would accept Cyrillic look-alikes.
_PORTABLE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


def is_portable_username(name: str) -> bool:
    """True for a portable POSIX user name that is safe to hand to the system.

    ASCII letters, digits, ``.``, ``_`` and ``-`` (not first), at most 32 characters.
    All-digit names (``0``, ``4294967295``) are refused because many tools read them as
    uids, and so are ``.`` and ``..``.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_USERNAME_LENGTH:
        return False
    if not name.isascii() or _PORTABLE.fullmatch(name) is None:
        return False
    return not name.isdigit() and name not in {".", ".."}


def _frozen_names(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


@attrs.frozen
class AccountPolicy:
    """Limits on the accounts a mapping may produce.

    ``daemon_uid`` is the uid the daemon runs as (refused: a caller must never get the
    daemon's own account); ``deny`` names accounts that may never be used (``nobody``,
    service accounts above ``min_uid``…). ``only_uid``, when set, is the one uid that
    may be served: an unprivileged daemon can start processes only as itself.
    ``allow_nologin_shell`` lets accounts whose shell is ``nologin``/``false`` be used
    (service accounts that run jobs but never log in); they are refused by default.
    """

    min_uid: int = attrs.field(default=1000)
    daemon_uid: int | None = None
    deny: frozenset[str] = attrs.field(converter=_frozen_names, factory=frozenset)
    only_uid: int | None = None
    allow_nologin_shell: bool = False

    @min_uid.validator
    def _min_uid_not_negative(self, _attr: object, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("min_uid must be a non-negative integer")


def _refuse(reason: str, name: str, why: str) -> IdentityError:
    return IdentityError(reason, f"account {name!r} refused: {why}", context={"username": name})


def check_account(
    name: str,
    accounts: AccountDatabase,
    policy: AccountPolicy,
    *,
    shadow: ShadowDatabase | None = None,
    today: int | None = None,
) -> Account:
    """The account for ``name`` if it may be used; otherwise ``IdentityError``.

    With ``shadow`` (and ``today``, in days since 1970-01-01), a locked or expired
    account is refused too; its shell is checked against ``nologin``/``false``
    whatever the shadow database says."""
    if not is_portable_username(name):
        raise _refuse("identity.invalid_username", name, "not a portable POSIX user name")
    if name in policy.deny:
        raise _refuse("identity.account_denied", name, "on the deny list")
    account = accounts.by_name(name)
    if account is None:
        raise _refuse("identity.account_missing", name, "no such account")
    if account.name != name:
        # Some NSS back ends answer case-insensitively or by alias; the account we
        # would run as must be the one the mapping named, exactly.
        raise _refuse(
            "identity.account_name_mismatch",
            name,
            f"the account database answered with {account.name!r}",
        )
    if account.uid == 0:
        raise _refuse("identity.account_root", name, "uid 0")
    if policy.daemon_uid is not None and account.uid == policy.daemon_uid:
        raise _refuse("identity.account_daemon", name, f"uid {account.uid} is the daemon's own")
    if account.uid < policy.min_uid:
        raise _refuse(
            "identity.account_uid_too_low",
            name,
            f"uid {account.uid} is below the minimum {policy.min_uid}",
        )
    if policy.only_uid is not None and account.uid != policy.only_uid:
        raise _refuse(
            "identity.account_not_served",
            name,
            f"this daemon runs unprivileged (uid {policy.only_uid}) "
            "and can only serve its own account",
        )
    _check_usable(account, policy, shadow, today)
    return account


NOLOGIN_SHELLS = frozenset({"nologin", "false"})


def _check_usable(
    account: Account, policy: AccountPolicy, shadow: ShadowDatabase | None, today: int | None
) -> None:
    name = account.name
    shell = account.shell.rsplit("/", 1)[-1]
    if shell in NOLOGIN_SHELLS and not policy.allow_nologin_shell:
        raise _refuse("identity.account_nologin", name, f"its shell is {account.shell}")
    entry = None if shadow is None else shadow.by_name(name)
    if entry is None:
        return
    if entry.locked:
        raise _refuse("identity.account_locked", name, "locked in the shadow database")
    why = None if today is None else shadow_expiry(entry, today)
    if why is not None:
        raise _refuse("identity.account_expired", name, why)


def shadow_expiry(entry: ShadowEntry, today: int) -> str | None:
    """Why a shadow entry is expired on ``today`` (days since 1970-01-01), or None.

    The account's own expiry date, and its password's (``last_change + max_days``):
    a password that has expired cannot be changed by a function run, so the account
    is not usable for one. ``last_change`` 0 (change at next login) is not expiry."""
    if entry.expires is not None and entry.expires <= today:
        return f"the account expired on day {entry.expires}"
    if entry.last_change and entry.max_days is not None and entry.max_days >= 0:
        ends = entry.last_change + entry.max_days
        if ends < today:
            return f"its password expired on day {ends}"
    return None
