"""Conditions of policy lines: named predicates from a fixed registry.

A policy line's ``cond`` field is ``-`` (or empty) for "no condition", or predicates
separated by ``;``, all of which must hold (``mfa;auth_age_le:3600``). The registry is
closed: ``mfa``, ``auth_age_le:<seconds>``, ``uid_ge:<n>``, ``hours:<hh>-<hh>``. An
unknown name or a malformed argument is refused when the policy is loaded
(``parse_conditions`` raises ``ValueError``; the loader names the file and line).

Predicates read a ``RequestContext`` only — never a clock or the environment: the
authorizer takes the time from its injected clock once per decision and puts the hour
in the context. Deliberately not here: negation, alternatives, arbitrary expressions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

import attrs

NO_CONDITION = ("", "-")
MAX_SECONDS = 10**9
MAX_UID = 2**32


@attrs.frozen
class RequestContext:
    """What conditions may look at: the caller's attributes and the hour of the day."""

    mfa: bool
    auth_age: float | None
    uid: int | None
    hour: int | None


@attrs.frozen
class Predicate:
    """One parsed predicate (``auth_age_le:3600``), ready to test a context."""

    name: str
    argument: str
    test: Callable[[RequestContext], bool] = attrs.field(eq=False, repr=False)

    def __str__(self) -> str:
        return f"{self.name}:{self.argument}" if self.argument else self.name


def _int_argument(name: str, argument: str, limit: int) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", argument):
        raise ValueError(f"predicate {name!r} needs a non-negative integer, not {argument!r}")
    value = int(argument)
    if value > limit:
        raise ValueError(f"predicate {name!r}: {value} is larger than {limit}")
    return value


def _mfa(argument: str) -> Callable[[RequestContext], bool]:
    if argument:
        raise ValueError(f"predicate 'mfa' takes no argument, got {argument!r}")
    return lambda ctx: ctx.mfa is True


def _auth_age_le(argument: str) -> Callable[[RequestContext], bool]:
    limit = _int_argument("auth_age_le", argument, MAX_SECONDS)
    return lambda ctx: ctx.auth_age is not None and ctx.auth_age <= limit


def _uid_ge(argument: str) -> Callable[[RequestContext], bool]:
    least = _int_argument("uid_ge", argument, MAX_UID)
    return lambda ctx: ctx.uid is not None and ctx.uid >= least


def _hours(argument: str) -> Callable[[RequestContext], bool]:
    found = re.fullmatch(r"([0-9]{1,2})-([0-9]{1,2})", argument)
    if not found:
        raise ValueError(f"predicate 'hours' needs <hh>-<hh> (like 02-04), not {argument!r}")
    start, end = int(found.group(1)), int(found.group(2))
    if start > 23 or end > 24 or start == end:
        raise ValueError(
            f"predicate 'hours:{argument}': start must be 0-23, end 0-24 and different"
        )
    if start < end:
        return lambda ctx: ctx.hour is not None and start <= ctx.hour < end
    # A window across midnight (22-06).
    return lambda ctx: ctx.hour is not None and (ctx.hour >= start or ctx.hour < end)


# The fixed registry: name -> factory taking the argument text ("" when none).
REGISTRY: Mapping[str, Callable[[str], Callable[[RequestContext], bool]]] = MappingProxyType(
    {"mfa": _mfa, "auth_age_le": _auth_age_le, "uid_ge": _uid_ge, "hours": _hours}
)


def parse_conditions(text: str) -> tuple[Predicate, ...]:
    """Parse a ``cond`` field; ``ValueError`` for an unknown or malformed predicate."""
    if text in NO_CONDITION:
        return ()
    out: list[Predicate] = []
    for item in text.split(";"):
        name, colon, argument = item.partition(":")
        if colon and not argument:
            raise ValueError(f"predicate {name!r}: empty argument after ':'")
        factory = REGISTRY.get(name)
        if factory is None:
            known = ", ".join(sorted(REGISTRY))
            raise ValueError(f"unknown predicate {name!r} (known: {known})")
        out.append(Predicate(name, argument, factory(argument)))
    return tuple(out)


def conditions_hold(text: str, ctx: RequestContext) -> bool:
    """Evaluate a ``cond`` field from its text: the ``conditionsHold`` model function.

    Parses on every call; the authorizer itself uses predicates parsed at load time.
    """
    return all(p.test(ctx) for p in parse_conditions(text))
