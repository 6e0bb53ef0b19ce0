"""In-memory fakes of the ports, for tests of the pure components (and of code embedding them).

Nothing here touches the machine: accounts live in a dict, the clock moves only when
told to.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from mepcore.types import Account

__all__ = ["FakeAccountDatabase", "FakeClock"]


@attrs.define
class FakeAccountDatabase:
    """A password database held in memory."""

    accounts: dict[str, Account] = attrs.field(factory=dict)

    @classmethod
    def with_accounts(cls, accounts: Iterable[Account]) -> FakeAccountDatabase:
        return cls({a.name: a for a in accounts})

    def add(
        self,
        name: str,
        uid: int,
        gid: int | None = None,
        *,
        groups: Iterable[tuple[str, int]] = (),
        home: str | None = None,
        shell: str = "/bin/bash",
        pw_name: str | None = None,
    ) -> Account:
        """Add an account. ``pw_name`` lets a test make the database answer a look-up
        for ``name`` with an entry of another name (as some NSS back ends do)."""
        gid = uid if gid is None else gid
        group_list = [(pw_name or name, gid), *groups]
        account = Account(
            name=pw_name or name,
            uid=uid,
            gid=gid,
            home=home or f"/home/{name}",
            shell=shell,
            group_ids=tuple(g for _, g in group_list),
            group_names=tuple(n for n, _ in group_list),
        )
        self.accounts[name] = account
        return account

    def by_name(self, name: str) -> Account | None:
        return self.accounts.get(name)

    def by_uid(self, uid: int) -> Account | None:
        for account in self.accounts.values():
            if account.uid == uid:
                return account
        return None


@attrs.define
class FakeClock:
    """A clock that moves only when ``advance`` is called."""

    wall: float = 1_700_000_000.0
    mono: float = 1000.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds
