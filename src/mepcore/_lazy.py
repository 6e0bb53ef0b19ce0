"""Public names of a package imported from their modules when first asked for (PEP 562).

A package lists where each of its public names lives; ``lazy_names`` gives it the
module-level ``__getattr__`` and ``__dir__`` that import a name's module on first use
and keep the value as a plain attribute after that. A user endpoint then loads only the
modules it uses (``mepcore.config`` and ``mepcore.tasks`` do this).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_names(
    package: str, homes: Mapping[str, Sequence[str]], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names live in the submodules
    ``homes`` lists (submodule -> names); ``namespace`` is the package's ``globals()``."""
    module_of = {name: module for module, names in homes.items() for name in names}

    def getattr_(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value  # once imported, a plain module attribute
        return value

    def dir_() -> list[str]:
        return sorted(module_of)

    return getattr_, dir_
