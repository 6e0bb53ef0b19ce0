"""Loading YAML safely: PyYAML's safe loader, minus duplicate keys and aliases.

A duplicate key would let the last occurrence silently win (so a template could be
tricked into emitting a second ``provider:``); aliases allow exponential expansion of
a small document. Both are refused with the line and column. This module does not
validate what it loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
import yaml.constructor
import yaml.nodes


class YamlLoadError(Exception):
    """The text is not acceptable YAML; ``line``/``column`` are 1-based (0 if unknown)."""

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column

    def __str__(self) -> str:
        if self.line:
            return f"line {self.line}, column {self.column}: {self.message}"
        return self.message


class _StrictSafeLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise YamlLoadError(
                "aliases (*name) are not allowed",
                event.start_mark.line + 1,
                event.start_mark.column + 1,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlLoadError(
                    "merge keys (<<) are not allowed",
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                duplicate = False  # unhashable: the base class reports it
            if duplicate:
                raise YamlLoadError(
                    f"duplicate key {key!r}",
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
            if not isinstance(key, list | dict):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse one YAML document safely; raise ``YamlLoadError`` with the position."""
    return _run_loader(text, _StrictSafeLoader.get_single_data)


def compose_yaml(text: str) -> yaml.Node | None:
    """The node tree of one document (with positions), aliases refused."""
    node: yaml.Node | None = _run_loader(text, _StrictSafeLoader.get_single_node)
    return node


def _run_loader(text: str, step: Callable[[_StrictSafeLoader], Any]) -> Any:
    # One translation of PyYAML's errors for both entry points: positions are 1-based.
    loader = _StrictSafeLoader(text)
    try:
        return step(loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        if mark is not None:
            raise YamlLoadError(message, mark.line + 1, mark.column + 1) from exc
        raise YamlLoadError(message) from exc
    except yaml.YAMLError as exc:
        raise YamlLoadError(str(exc)) from exc
    except RecursionError as exc:
        raise YamlLoadError("nested too deeply") from exc
    finally:
        loader.dispose()
