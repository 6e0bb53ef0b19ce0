"""``{field}`` templates of mapping rules (``source`` and ``output``), parsed once.

A template is literal text with ``{name}`` placeholders for identity fields and, in
``output``, ``{0}``, ``{1}``… for the match groups; ``{{`` and ``}}`` are literal
braces. Parsing happens when the mapping is loaded, so rendering is a join.

Deliberately refused (at load, as configuration errors): attribute and index access
(``{username.__class__}``, ``{email[0]}``), conversions and format specs (``{0!r}``,
``{0:>9}``) and automatic numbering (``{}``). ``str.format`` would accept them and the
first two reach into Python objects.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GROUP_INDEX = re.compile(r"[0-9]+")


class TemplateSyntaxError(ValueError):
    """A template is not acceptable; the message says why (for a config error)."""


@attrs.frozen
class Template:
    """A parsed template: ``parts`` alternates literal text and a placeholder.

    Each part is ``(literal, placeholder)``; ``placeholder`` is a field name (``str``),
    a group index (``int``) or ``None`` after the last literal.
    """

    text: str
    parts: tuple[tuple[str, str | int | None], ...]

    @property
    def max_group(self) -> int:
        """The highest group index used, or -1."""
        return max((p for _, p in self.parts if isinstance(p, int)), default=-1)

    @property
    def field_names(self) -> frozenset[str]:
        return frozenset(p for _, p in self.parts if isinstance(p, str))

    @classmethod
    def parse(cls, text: str, *, allow_groups: bool) -> Template:
        parts: list[tuple[str, str | int | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise TemplateSyntaxError(f"not a valid template: {exc}") from exc
        for literal, name, spec, conversion in parsed:
            if name is None:
                parts.append((literal, None))
                continue
            if conversion is not None or spec:
                raise TemplateSyntaxError(
                    f"placeholder {{{name}...}} may not have a conversion or format spec"
                )
            if _GROUP_INDEX.fullmatch(name):
                if not allow_groups:
                    raise TemplateSyntaxError(
                        f"placeholder {{{name}}}: match groups are only available in output"
                    )
                parts.append((literal, int(name)))
            elif _FIELD_NAME.fullmatch(name):
                parts.append((literal, name))
            else:
                raise TemplateSyntaxError(
                    f"placeholder {{{name}}} must be an identity field name or a group number"
                )
        return cls(text=text, parts=tuple(parts))

    def render(self, fields: Mapping[str, Any], groups: Sequence[str | None] = ()) -> str | None:
        """The rendered text, or None when a field is missing or not a string.

        A group that did not take part in the match renders as the empty string, as in
        ``re.sub`` replacements.
        """
        out: list[str] = []
        for literal, placeholder in self.parts:
            out.append(literal)
            if placeholder is None:
                continue
            if isinstance(placeholder, int):
                out.append(groups[placeholder] or "")
                continue
            value = fields.get(placeholder)
            if not isinstance(value, str):
                return None
            out.append(value)
        return "".join(out)
