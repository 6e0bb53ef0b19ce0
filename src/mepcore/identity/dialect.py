"""The match language of expression mapping rules, and what ``mepd check`` warns about.

Globus Connect Server's expression mapping (which Globus Compute uses) does not hand
``match`` to Python's regex engine as written: it is a reduced dialect (GC-COMPAT.md §1),
and mep reads it the same way by default (``mep_match_syntax: "gcs"``):

- ``.`` any character, ``?`` and ``*`` repeat what precedes, ``|`` alternatives,
  ``( )`` a numbered group; a backslash makes one of ``. ? * | ( ) \\`` ordinary, and a
  backslash before a digit is a back-reference (``\\1``) as in Python;
- every other character is ordinary: ``^ $ + { } [ ]`` too, so ``[a-z]+`` is eight
  characters of text, not a character class;
- refused when the file loads, as there: any other backslash escape (``\\d``, ``\\w``,
  ``\\@``; every backslash is looked at, so ``\\\\d`` too), a ``?`` right after ``*`` or
  ``?`` (lazy quantifiers, even after an escaped ``\\*``), a leading ``*`` or ``?``, and
  whatever Python's compiler refuses (an unbalanced parenthesis, ``**``).

On top of the dialect mep keeps its own rules: the *whole* string must match, every
alternative included (``alice|bob`` does not match ``alicex``), and nothing may follow
the match (the reference's ``$`` also matches before a trailing newline): a match
counts only when the reference's own match spans the whole string, so mep maps with the
very groups the reference would, or not at all. It also refuses, when the file loads,
three spellings whose meaning in the reference is not what the dialect says, so a
migrated file never maps more than the administrator tested: a trailing backslash
(there it escapes the reference's own end anchor), a group extension ``(?…)`` (Python
syntax the dialect does not have), and a backslash in a ``literal`` rule (there the
character after it is not escaped).

A document may opt in to Python's full regex syntax with ``"mep_match_syntax":
"python"`` (mep-specific; the reference ignores the key and would still read the
dialect). ``literal`` rules match their text exactly in both syntaxes.

``pattern_warnings`` finds likely mistakes for ``mepd check``: an unescaped ``.`` in a
domain after ``@`` (``example.com`` also matches ``exampleXcom``), and an output that can
contain ``@`` (refused as an account name). This module deliberately knows nothing of
documents and identities: it turns one ``match`` text into a compiled pattern.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

SYNTAX_KEY = "mep_match_syntax"
GCS_SYNTAX = "gcs"
PYTHON_SYNTAX = "python"
SYNTAXES = (GCS_SYNTAX, PYTHON_SYNTAX)

_ESCAPABLE = frozenset(".?*|()\\")
_DIGITS = frozenset("0123456789")
# Ordinary characters of the dialect that are special to Python's regex compiler.
_ORDINARY_SPECIALS = frozenset("^$+{}[]")
# Python escapes and classes that can match "@" (for the warning, python syntax only).
_PY_AT_CAPABLE = re.compile(r"\\[SWD]|(?<!\\)\.|@")
_PY_CLASS = re.compile(r"(?<!\\)\[(\^?)((?:\\.|[^\]\\])*)\]")
_DOMAIN_DOT = re.compile(r"[A-Za-z0-9-]\.[A-Za-z]")
_FIELDS_WITH_AT = frozenset({"username", "email"})

# Scans of a pattern's own text (not matches of identities, which are whole-string).
_BACKREFERENCE = re.compile(r"\\[0-9]")
_DOMAIN_CHARACTERS = re.compile(r"[A-Za-z0-9.-]*")


class MatchSyntaxError(ValueError):
    """A ``match`` text is refused; the message says why (for a configuration error)."""


def translate_gcs(text: str) -> str:
    """The Python regex source that means what the dialect ``text`` means (without the
    anchors: the caller matches the whole string). Raises ``MatchSyntaxError``."""
    if text[:1] in ("*", "?"):
        raise MatchSyntaxError(f"a leading {text[0]!r} repeats nothing")
    for position in range(1, len(text)):
        if text[position] == "?" and text[position - 1] in "*?":
            raise MatchSyntaxError(
                f"{text[position - 1]}? (a lazy quantifier) is not part of the mapping dialect"
            )
        # Checked at every backslash, as the reference does: "\\d" is refused too.
        if text[position - 1] == "\\" and text[position] not in _ESCAPABLE | _DIGITS:
            raise MatchSyntaxError(
                f"invalid escape \\{text[position]}: a backslash may only precede"
                " . ? * | ( ) \\ or a digit (a back-reference)"
            )
    out: list[str] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            if position + 1 == len(text):
                raise MatchSyntaxError("a trailing backslash escapes nothing")
            # Only . ? * | ( ) \ or a digit can follow (checked above), so one of
            # ^ $ + { } [ ] is never right after a backslash.
            out.append(char + text[position + 1])
            position += 2
            continue
        if char in _ORDINARY_SPECIALS:
            out.append("\\" + char)
        elif char == "(" and text[position + 1 : position + 2] == "?":
            raise MatchSyntaxError(
                f"(?...) group extensions are not part of the mapping dialect"
                f" (use {SYNTAX_KEY}: python for Python's syntax)"
            )
        else:
            out.append(char)
        position += 1
    return "".join(out)


@attrs.frozen
class RulePattern:
    """A compiled ``match``: ``fullmatch(subject)`` is the match of the whole subject, or
    None.

    In the dialect the pattern is compiled as the reference compiles it (``^…$``, tried
    from the start) and a match counts only when it spans the whole subject: so a match
    mep accepts is the reference's very match (same groups), and what the reference
    accepts beyond it (a prefix through a half-anchored alternative, a match before a
    trailing newline) mep refuses."""

    pattern: re.Pattern[str]
    anchored: bool

    @property
    def groups(self) -> int:
        return self.pattern.groups

    def fullmatch(self, subject: str) -> re.Match[str] | None:
        if not self.anchored:
            return self.pattern.fullmatch(subject)
        found = self.pattern.match(subject)
        return found if found is not None and found.end() == len(subject) else None


def compile_match(
    text: str, *, ignore_case: bool = False, literal: bool = False, syntax: str = GCS_SYNTAX
) -> RulePattern:
    """The compiled pattern of one rule. Raises ``MatchSyntaxError`` (with Python's own
    message for a compile error)."""
    if syntax not in SYNTAXES:
        raise MatchSyntaxError(f"unknown {SYNTAX_KEY} {syntax!r} (known: {', '.join(SYNTAXES)})")
    flags = re.IGNORECASE if ignore_case else 0
    anchored = False
    if literal:
        if syntax == GCS_SYNTAX and "\\" in text:
            raise MatchSyntaxError(
                "a backslash in a literal match: Globus Compute does not escape the"
                " character after it, so its meaning is not literal; remove it or use"
                f" {SYNTAX_KEY}: python"
            )
        source = re.escape(text)
    elif syntax == GCS_SYNTAX:
        source = "^" + translate_gcs(text) + "$"
        anchored = True
    else:
        source = text
    try:
        return RulePattern(re.compile(source, flags), anchored)
    except re.error as exc:
        raise MatchSyntaxError(f"not a valid expression: {exc}") from exc
    except (OverflowError, RecursionError) as exc:
        raise MatchSyntaxError(f"not a valid expression: {type(exc).__name__}") from exc


def _group_spans(text: str, syntax: str) -> list[tuple[int, int]]:
    """(start, end) of each capturing group's inner text, numbered by opening parenthesis
    (as the regex compiler numbers them); a best effort for warnings only."""
    spans: list[tuple[int, int]] = []
    stack: list[int | None] = []
    position = 0
    in_class = False
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if syntax == PYTHON_SYNTAX and in_class:
            in_class = char != "]"
        elif syntax == PYTHON_SYNTAX and char == "[":
            in_class = True
        elif char == "(":
            extension = text[position + 1 : position + 2] == "?"
            named = text[position + 1 : position + 4] == "?P<"
            if extension and not named:
                stack.append(None)
            else:
                spans.append((position + 1, -1))
                stack.append(len(spans) - 1)
        elif char == ")" and stack:
            index = stack.pop()
            if index is not None:
                spans[index] = (spans[index][0], position)
        position += 1
    return [(start, end if end >= 0 else len(text)) for start, end in spans]


def _unescaped(text: str, wanted: str) -> list[int]:
    """Positions of ``wanted`` in ``text`` not preceded by an escaping backslash."""
    found: list[int] = []
    position = 0
    while position < len(text):
        if text[position] == "\\":
            position += 2
            continue
        if text[position] == wanted:
            found.append(position)
        position += 1
    return found


def _group_can_match_at(inner: str, syntax: str) -> bool:
    if _BACKREFERENCE.search(inner):
        return True  # a back-reference repeats what may hold one
    if syntax == GCS_SYNTAX:
        # The dialect has no classes: only "." or "@" itself gives an "@".
        return bool(_unescaped(inner, ".") or "@" in inner)
    for negated, body in _PY_CLASS.findall(inner):
        if bool(negated) != ("@" in body):
            return True
    return bool(_PY_AT_CAPABLE.search(_PY_CLASS.sub("", inner)))


def pattern_warnings(
    match: str,
    *,
    literal: bool,
    syntax: str,
    output_groups: Sequence[int],
    output_fields: Sequence[str],
    output_text: str,
) -> list[tuple[str, str, str]]:
    """Likely mistakes in one (already valid) rule: ``(field, message, code)`` items,
    ``field`` being ``match`` or ``output``."""
    warnings: list[tuple[str, str, str]] = []
    if not literal:
        ats = _unescaped(match, "@")
        for dot in _unescaped(match, "."):
            if ats and ats[0] < dot and _DOMAIN_DOT.match(match, dot - 1):
                domain_end = _DOMAIN_CHARACTERS.match(match[dot:])
                shown = match[ats[0] + 1 : dot + (domain_end.end() if domain_end else 1)]
                warnings.append(
                    (
                        "match",
                        f"the '.' in {shown!r} is unescaped and matches any character"
                        " (write '\\.' for a dot)",
                        "unescaped_dot",
                    )
                )
                break
    reasons: list[str] = []
    if "@" in output_text.replace("{{", "").replace("}}", ""):
        reasons.append("its text has an '@'")
    reasons += [f"{{{name}}} usually has one" for name in output_fields if name in _FIELDS_WITH_AT]
    if not literal:
        spans = _group_spans(match, syntax)
        for group in sorted(set(output_groups)):
            if group < len(spans):
                start, end = spans[group]
                if _group_can_match_at(match[start:end], syntax):
                    reasons.append(f"group {{{group}}} can match an '@'")
    if reasons:
        warnings.append(
            (
                "output",
                "can produce a name containing '@' ("
                + "; ".join(reasons)
                + "), which is refused as an account name",
                "output_may_contain_at",
            )
        )
    return warnings
