"""Plain values shared by every component: identities, accounts, groups.

Deliberately only data: no look-ups, no I/O (``thaw`` turns frozen data back into plain
JSON-like data). Untrusted identity documents are turned
into ``Identity`` values by ``Identity.from_mapping``, which refuses what is not a
flat JSON object with a string ``id``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from mepcore.errors import IdentityError, Violation

__all__ = [
    "MAPPABLE_STATUSES",
    "Account",
    "Identity",
    "IdentitySet",
    "ShadowEntry",
    "thaw",
]


def thaw(value: Any) -> Any:
    """A plain copy of frozen data: every ``Mapping`` (``MappingProxyType`` included)
    becomes a ``dict`` and every ``list`` or ``tuple`` a ``list``, all the way down;
    anything else is returned as it is. For data that is about to become JSON."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


def _int_tuple(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(value)


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _identity_tuple(value: Iterable[Identity]) -> tuple[Identity, ...]:
    return tuple(value)


def _freeze_fields(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


# Globus Auth's identity statuses that stand for an identity its owner still uses
# (``private`` only hides it from other users). Others (``unused``, ``closed``…) name an
# identity that is no longer its owner's to use, so it maps to nothing.
MAPPABLE_STATUSES = frozenset({"used", "private"})


@attrs.frozen
class Identity:
    """One external identity (as an identity provider or Globus Auth describes it).

    ``fields`` holds every field of the identity document (``id``, ``username``,
    ``email``, ``name``, ``identity_provider``, ``organization``…), ``id`` included.
    """

    id: str
    fields: Mapping[str, Any] = attrs.field(converter=_freeze_fields, factory=dict)

    def get(self, name: str) -> Any:
        """A field's value, or None when the identity does not have it."""
        return self.fields.get(name)

    @property
    def username(self) -> str | None:
        value = self.fields.get("username")
        return value if isinstance(value, str) else None

    @property
    def mappable(self) -> bool:
        """False when the identity has a ``status`` field and it is not ``used`` or
        ``private`` (exactly, as Globus Auth writes them; ``null`` and any other value
        count as not mappable). Without a ``status`` field an identity is mappable."""
        if "status" not in self.fields:
            return True
        status = self.fields["status"]
        return isinstance(status, str) and status in MAPPABLE_STATUSES

    @property
    def domain(self) -> str | None:
        """The part of ``username`` after the last ``@`` (``example.org``), if any."""
        name = self.username
        if name and "@" in name:
            return name.rsplit("@", 1)[1]
        return None

    @classmethod
    def from_mapping(cls, data: Any, *, path: str = "$") -> Identity:
        if not isinstance(data, Mapping):
            raise IdentityError(
                "identity.input_invalid",
                f"{path}: an identity must be a JSON object",
                violations=[Violation(path, "an identity must be a JSON object")],
            )
        ident = data.get("id")
        if not isinstance(ident, str) or not ident:
            raise IdentityError(
                "identity.input_invalid",
                f"{path}.id: an identity needs a non-empty string id",
                violations=[Violation(f"{path}.id", "an identity needs a non-empty string id")],
            )
        for key in data:
            if not isinstance(key, str):
                raise IdentityError("identity.input_invalid", f"{path}: keys must be strings")
        return cls(id=ident, fields=dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)


@attrs.frozen
class IdentitySet:
    """The caller's identity followed by the identities linked to it, in order."""

    identities: tuple[Identity, ...] = attrs.field(converter=_identity_tuple)

    @identities.validator
    def _not_empty(self, _attr: object, value: tuple[Identity, ...]) -> None:
        if not value:
            raise IdentityError("identity.input_invalid", "an identity set may not be empty")

    @property
    def primary(self) -> Identity:
        return self.identities[0]

    def __iter__(self) -> Iterator[Identity]:
        return iter(self.identities)

    def __len__(self) -> int:
        return len(self.identities)

    def find(self, identity_id: str) -> Identity | None:
        for ident in self.identities:
            if ident.id == identity_id:
                return ident
        return None

    def mapping_order(self) -> tuple[Identity, ...]:
        """The identities a mapping may use, in an order no client controls.

        The primary identity first (the token's subject: the issuer decides it), then
        the linked identities sorted by id (their order in a token is the client's);
        identities that are not ``mappable`` (a status such as ``closed``) are left out.
        Linked identities with the same id are ordered by their fields, so the order is
        a function of the set alone."""
        primary, *linked = self.identities
        ordered = sorted(linked, key=lambda i: (i.id, _canonical_fields(i)))
        return tuple(i for i in (primary, *ordered) if i.mappable)

    @classmethod
    def from_json(cls, data: Any) -> IdentitySet:
        """Accept ``{"identities": [...]}``, a bare list, or a single identity object."""
        if isinstance(data, Mapping) and "identities" in data:
            items = data["identities"]
            base = "$.identities"
        elif isinstance(data, Mapping):
            items = [data]
            base = "$"
            return cls((Identity.from_mapping(data, path=base),))
        else:
            items = data
            base = "$"
        if not isinstance(items, list):
            raise IdentityError("identity.input_invalid", f"{base}: expected a list of identities")
        return cls(
            tuple(Identity.from_mapping(item, path=f"{base}[{i}]") for i, item in enumerate(items))
        )


def _canonical_fields(identity: Identity) -> str:
    return json.dumps(thaw(identity.fields), sort_keys=True, default=repr)


@attrs.frozen
class Account:
    """A local POSIX account, as the password and group databases describe it."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    group_ids: tuple[int, ...] = attrs.field(converter=_int_tuple, factory=tuple)
    group_names: tuple[str, ...] = attrs.field(converter=_str_tuple, factory=tuple)
    # The passwd comment field (pw_gecos): templates may read it, as in Globus Compute.
    gecos: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uid": self.uid,
            "gid": self.gid,
            "home": self.home,
            "shell": self.shell,
            "groups": list(self.group_names),
            "group_ids": list(self.group_ids),
            "gecos": self.gecos,
        }


@attrs.frozen
class ShadowEntry:
    """What the shadow database says about an account's usability (not its password).

    Days count from 1970-01-01, as in shadow(5); None is an empty field. ``locked`` is
    True when the password field starts with ``!`` or ``*`` (an administrator locked the
    account, or it never had a password)."""

    name: str
    locked: bool
    last_change: int | None = None
    max_days: int | None = None
    inactive_days: int | None = None
    expires: int | None = None
