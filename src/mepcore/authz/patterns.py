"""Whole-segment patterns: the only wildcard matching the shipped model knows.

A pattern is a string split into ``:``-separated segments. A segment that is exactly
``*`` matches one non-empty segment of the value; a segment that is exactly ``**``
matches one or more non-empty segments. Every other character is literal, and a
pattern always matches the *whole* value (``re.fullmatch``).

Why segments rather than Casbin's ``keyMatch``/``regexMatch``: ``keyMatch`` treats a
trailing ``*`` as a raw prefix and ``regexMatch`` anchors only at the start, so
``ep:prod*`` would match ``ep:production-evil``. Here a ``*`` glued to other characters
is refused when the policy is loaded (``validate_pattern``), so that pattern cannot be
written; ``ep:prod:*`` matches ``ep:prod:a`` but neither ``ep:prod`` nor
``ep:production-evil``.

Deliberately not here: character classes, ``?``, alternations, case folding.
"""

from __future__ import annotations

import re

ONE_SEGMENT = "*"
MANY_SEGMENTS = "**"
SEPARATOR = ":"

_ONE_RE = "[^:]+"
_MANY_RE = "[^:]+(?::[^:]+)*"


def is_pattern(text: str) -> bool:
    """True when ``text`` has a wildcard segment (and so is not a literal)."""
    return any(seg in (ONE_SEGMENT, MANY_SEGMENTS) for seg in text.split(SEPARATOR))


def validate_pattern(text: str) -> None:
    """Refuse a ``*`` that is not a whole segment (``ep:prod*``, ``*x``, ``***``).

    Raises ``ValueError`` with a message for the administrator.
    """
    for seg in text.split(SEPARATOR):
        if "*" in seg and seg not in (ONE_SEGMENT, MANY_SEGMENTS):
            raise ValueError(
                f"pattern {text!r}: a wildcard must be a whole ':'-separated segment "
                f"('*' or '**'), not part of {seg!r}"
            )


def pattern_regex(text: str) -> str:
    """The anchored-by-use regular expression (for ``re.fullmatch``) of a pattern.

    A ``*`` that is not a whole segment stays a literal character: the loader refuses
    such patterns anyway, and treating them literally can only match less.
    """
    parts: list[str] = []
    for seg in text.split(SEPARATOR):
        if seg == ONE_SEGMENT:
            parts.append(_ONE_RE)
        elif seg == MANY_SEGMENTS:
            parts.append(_MANY_RE)
        else:
            parts.append(re.escape(seg))
    return ":".join(parts)


def literal_prefix(text: str) -> str:
    """The literal segments before the first wildcard, each followed by ``:``.

    Any value a pattern matches starts with this prefix, and the prefix ends at a
    segment boundary of the value, so candidate patterns for a value can be found by
    looking up each of the value's segment-boundary prefixes (``value_prefixes``).
    """
    out: list[str] = []
    for seg in text.split(SEPARATOR):
        if seg in (ONE_SEGMENT, MANY_SEGMENTS):
            break
        out.append(seg + SEPARATOR)
    return "".join(out)


def value_prefixes(value: str) -> list[str]:
    """``""`` and every prefix of ``value`` that ends with ``:``."""
    out = [""]
    start = 0
    while True:
        i = value.find(SEPARATOR, start)
        if i < 0:
            return out
        out.append(value[: i + 1])
        start = i + 1


def segment_match(value: str, pattern: str) -> bool:
    """Whole-string segment match; the ``segmentMatch`` function of the shipped model."""
    if not isinstance(value, str) or not isinstance(pattern, str):
        return False
    return re.fullmatch(pattern_regex(pattern), value) is not None
