"""Login names to checked local accounts, with a mep identity-mapping file.

``LoginGate`` turns a login name (Open OnDemand's ``REMOTE_USER``, the name a
JupyterHub authenticator returns) into a local ``Account``: it maps the name with a mep
identity-mapping file (``IdentityMapper``) and applies mep's account checks
(``check_account``: portable name, account present and named exactly so, not uid 0, not
below ``min_uid``, not the service's own uid, not on the deny list, no ``nologin``
shell, and with a shadow database neither locked nor expired). The same file and the
same rules serve mepd and the service.

A login name becomes one identity whose ``id`` and ``username`` are the login name, so
rules written for mepd with ``{username}`` or ``{id}`` apply unchanged (``{email}`` and
other fields are absent and such rules do not match).

Deliberately not here: the policy (``mepcore.contrib.profiles``; this module does not
import ``mepcore.authz``, so a mapping program such as ``mep-ood-map`` starts without
it), anything specific to one service, reading the process environment, and logging
(the caller logs the detail of a refusal).
"""

from __future__ import annotations

from os import PathLike

import attrs

from mepcore.errors import IdentityError
from mepcore.identity import AccountPolicy, IdentityMapper, MappingResult, check_account
from mepcore.ports import (
    AccountDatabase,
    Clock,
    ShadowDatabase,
    SystemAccountDatabase,
    SystemClock,
)
from mepcore.types import Account, Identity, IdentitySet

__all__ = ["MAX_LOGIN_LENGTH", "LoginGate", "MappedLogin", "login_identities"]

MAX_LOGIN_LENGTH = 1024
SECONDS_PER_DAY = 86_400

StrPath = str | PathLike[str]


def login_identities(login: str) -> IdentitySet:
    """The identity set of a login name: one identity, ``id`` and ``username`` the name.

    Refuses (``identity.input_invalid``) what no login service should pass on: a
    non-string, an empty name, more than ``MAX_LOGIN_LENGTH`` characters, or control
    characters (a newline would end the answer a service reads)."""
    if not isinstance(login, str) or not login:
        raise IdentityError("identity.input_invalid", "the login name is empty")
    if len(login) > MAX_LOGIN_LENGTH:
        raise IdentityError(
            "identity.input_invalid", f"the login name is longer than {MAX_LOGIN_LENGTH}"
        )
    if not login.isprintable():
        raise IdentityError("identity.input_invalid", "the login name has control characters")
    return IdentitySet((Identity(login, {"id": login, "username": login}),))


@attrs.frozen
class MappedLogin:
    """A login name, the identities it stood for, how it mapped, and the checked account."""

    login: str
    identities: IdentitySet
    mapping: MappingResult
    account: Account


@attrs.frozen
class LoginGate:
    """Login names to checked local accounts (one mapping file, one account policy).

    ``shadow`` is the shadow database to refuse locked and expired accounts with; None
    skips that check (an unprivileged process cannot read ``/etc/shadow``). ``clock``
    says what day it is for the expiry check."""

    mapper: IdentityMapper
    policy: AccountPolicy = attrs.field(factory=AccountPolicy)
    accounts: AccountDatabase = attrs.field(factory=SystemAccountDatabase)
    shadow: ShadowDatabase | None = None
    clock: Clock = attrs.field(factory=SystemClock)

    @classmethod
    def from_file(
        cls,
        path: StrPath,
        *,
        policy: AccountPolicy | None = None,
        accounts: AccountDatabase | None = None,
        shadow: ShadowDatabase | None = None,
        clock: Clock | None = None,
        timeout: float | None = None,
    ) -> LoginGate:
        """From a mapping file (``IdentityConfigError`` if it is unusable); ``timeout``
        bounds an external mapping program (the mapper's default when None)."""
        mapper = (
            IdentityMapper.from_file(path)
            if timeout is None
            else IdentityMapper.from_file(path, timeout=timeout)
        )
        return cls(
            mapper=mapper,
            policy=policy if policy is not None else AccountPolicy(),
            accounts=accounts if accounts is not None else SystemAccountDatabase(),
            shadow=shadow,
            clock=clock if clock is not None else SystemClock(),
        )

    def resolve(self, login: str) -> MappedLogin:
        """The account ``login`` maps to, checked; ``IdentityError`` if there is none.

        The error's ``reason`` is safe to show the person logging in (a refused account
        is ``identity.account_refused`` whatever the cause); ``admin_reason`` and
        ``detail`` say why, for the service's log."""
        identities = login_identities(login)
        mapping = self.mapper.map(identities)
        if mapping.username is None:
            raise IdentityError(
                "identity.no_mapping",
                f"no mapping rule of {self.mapper.source} matched {login!r}",
                context={"login": login},
            )
        account = self.check(mapping.username)
        return MappedLogin(login, identities, mapping, account)

    def check(self, name: str) -> Account:
        """Check an account name again (at every use: a uid, a lock or an expiry may have
        changed since the login). ``IdentityError`` when it may not be used."""
        today = int(self.clock.now() // SECONDS_PER_DAY)
        return check_account(name, self.accounts, self.policy, shadow=self.shadow, today=today)
