"""What an adapter is, and how the runner picks one by name.

An adapter turns a resolved case (op, given, input) into an ``Observation``: either a
JSON result or an error with a reason code. It declares the ops it supports and the
deployment properties it provides (``root``, ``two_accounts``…); the runner skips
cases outside them with the reason. An adapter raises ``Skip`` for a case it cannot
run for a reason only known at run time, and ``Unsupported`` is a ``Skip``.

Adapters are imported lazily by name so that choosing the HTTP or exec adapter never
imports ``mepcore`` (only ``mepconf.adapters.inprocess`` may).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import attrs

from mepconf.suite import Case

# name -> module; each module defines ``create(options: Mapping[str, str]) -> Adapter``.
ADAPTERS: Mapping[str, str] = {
    "inprocess": "mepconf.adapters.inprocess",
    "exec": "mepconf.adapters.exec",
    "http": "mepconf.adapters.http",
}


class AdapterError(Exception):
    """The adapter or the deployment behind it broke (reported as an *error*, not a fail)."""


class Skip(Exception):
    """This case cannot run against this deployment; the message says why."""


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class ErrorInfo:
    reason: str
    message: str = ""
    violations: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    details: Mapping[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "message": self.message,
            "violations": list(self.violations),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorInfo:
        reason = data.get("reason")
        if not isinstance(reason, str) or not reason:
            raise AdapterError(f"an error needs a string reason, got {reason!r}")
        violations = data.get("violations") or []
        details = data.get("details") or {}
        if not isinstance(violations, list) or not all(isinstance(v, str) for v in violations):
            raise AdapterError("error.violations must be a list of JSON paths")
        if not isinstance(details, dict):
            raise AdapterError("error.details must be an object")
        return cls(reason, str(data.get("message", "")), tuple(violations), details)


@attrs.frozen
class Observation:
    """What the deployment did: a result, or an error (exactly one)."""

    result: Any = None
    error: ErrorInfo | None = None

    @classmethod
    def ok(cls, result: Any) -> Observation:
        return cls(result=result)

    @classmethod
    def failed(
        cls,
        reason: str,
        message: str = "",
        violations: tuple[str, ...] = (),
        details: Mapping[str, Any] | None = None,
    ) -> Observation:
        return cls(error=ErrorInfo(reason, message, violations, dict(details or {})))


class Adapter(Protocol):
    name: str

    def ops(self) -> frozenset[str]:
        """The case ops this adapter can run."""

    def properties(self) -> frozenset[str]:
        """The deployment properties (``needs``) this target provides."""

    def execute(self, case: Case) -> Observation:
        """Run one case; raise ``Skip`` or ``AdapterError`` when it cannot."""

    def close(self) -> None:
        """Release whatever the adapter holds (processes, connections)."""


def create_adapter(name: str, options: Mapping[str, str]) -> Adapter:
    module_name = ADAPTERS.get(name)
    if module_name is None:
        raise AdapterError(f"unknown adapter {name!r} (known: {', '.join(sorted(ADAPTERS))})")
    module = importlib.import_module(module_name)
    adapter: Adapter = module.create(options)
    return adapter
