"""Segment patterns, pinned where mutation testing (``make mutation``) found them loose.

``value_prefixes`` is how the authorizer finds the candidate lines for a value: a prefix
it leaves out is a policy line that is never considered (an allow that silently stops
working, or a deny that is skipped). ``segment_match`` is called by Casbin with whatever
the request holds; anything but two strings matches nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

from mepcore.authz.patterns import literal_prefix, segment_match, value_prefixes


@pytest.mark.parametrize(
    ("value", "prefixes"),
    [
        ("", [""]),
        ("a", [""]),
        ("a:b:c", ["", "a:", "a:b:"]),
        (":a", ["", ":"]),  # a separator in the first position
        ("a::b", ["", "a:", "a::"]),  # two separators side by side
        ("ep:prod:", ["", "ep:", "ep:prod:"]),
    ],
)
def test_value_prefixes_are_every_prefix_ending_at_a_separator(
    value: str, prefixes: list[str]
) -> None:
    assert value_prefixes(value) == prefixes


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("ep:*", "ep:prod"),
        ("ep:**", "ep:prod:a:b"),
        ("ep:prod:*", "ep:prod:a"),
        ("*", "x"),
        ("a::*", "a::b"),
    ],
)
def test_a_matching_patterns_literal_prefix_is_among_the_values_prefixes(
    pattern: str, value: str
) -> None:
    assert segment_match(value, pattern)
    assert literal_prefix(pattern) in value_prefixes(value)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [(5, "*"), ("a", 5), (None, "**"), (["a"], "*"), ("a", None)],
)
def test_segment_match_of_anything_but_two_strings_is_false(value: Any, pattern: Any) -> None:
    assert segment_match(value, pattern) is False
