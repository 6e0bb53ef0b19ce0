"""Bounds on user variables and on the work a template may do while rendering.

Only values with documented defaults; nothing here checks anything (``variables`` and
``render`` do). Every limit is configurable by the daemon's settings.
"""

from __future__ import annotations

import attrs


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, not {value!r}")


@attrs.frozen
class VariableLimits:
    """Bounds on the variables a user sends (checked before the schema is applied).

    - ``max_total_bytes``: size of the variables as compact UTF-8 JSON (64 KiB);
    - ``max_depth``: nesting of objects and arrays, the top-level object being depth 1 (16);
    - ``max_string_length``: characters in one string, keys included (16,384);
    - ``max_keys``: object keys in total, all levels together (1,024);
    - ``max_items``: array items in total, all levels together (4,096).
    """

    max_total_bytes: int = attrs.field(default=65_536, validator=_positive)
    max_depth: int = attrs.field(default=16, validator=_positive)
    max_string_length: int = attrs.field(default=16_384, validator=_positive)
    max_keys: int = attrs.field(default=1_024, validator=_positive)
    max_items: int = attrs.field(default=4_096, validator=_positive)


@attrs.frozen
class RenderLimits:
    """Bounds on one rendering of a template.

    - ``max_output_bytes``: the rendered text, UTF-8 (1 MiB);
    - ``max_string_length``: any string or list a template builds along the way:
      concatenation, ``+``, method and filter results (1 MiB);
    - ``max_string_repeat``: the result of ``str * n`` / ``list * n`` (65,536 items);
    - ``max_range``: items of one ``range()`` and integer arguments of filters (10,000);
    - ``max_iterations``: iterations of all ``{% for %}`` loops together (100,000);
    - ``max_calls``: calls of functions, methods and macros together (100,000);
    - ``max_int_bits``: size of the result of ``**`` on integers (4,096 bits);
    - ``max_violations``: problems reported at most in one error — a refusal of the
      variables' or the runtime report's shape, or of the endpoint config the template
      produced (100).
    """

    max_output_bytes: int = attrs.field(default=1_048_576, validator=_positive)
    max_string_length: int = attrs.field(default=1_048_576, validator=_positive)
    max_string_repeat: int = attrs.field(default=65_536, validator=_positive)
    max_range: int = attrs.field(default=10_000, validator=_positive)
    max_iterations: int = attrs.field(default=100_000, validator=_positive)
    max_calls: int = attrs.field(default=100_000, validator=_positive)
    max_int_bits: int = attrs.field(default=4_096, validator=_positive)
    max_violations: int = attrs.field(default=100, validator=_positive)
