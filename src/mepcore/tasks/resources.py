"""A task's ``resource_specification``: what an MPI task asks for, checked and completed.

The keys are the ones Parsl's MPI mode reads (and Globus Compute's ``GlobusMPIEngine``
passes on): ``num_nodes``, ``ranks_per_node``, ``num_ranks`` (positive integers) and
``launcher_options`` (a string added to the launcher's command line). ``from_mapping``
refuses anything else with ``task.resources_invalid``; ``complete`` fills in what the
launcher needs but the caller left out (one node; one rank per node; the ranks spread
evenly), so every launcher prefix is a whole command.

Pure: it neither launches anything nor knows an engine's blocks (``within`` is given the
block's node count by the engine that has one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

from mepcore.errors import TaskError

RESOURCE_KEYS = ("num_nodes", "ranks_per_node", "num_ranks", "launcher_options")
MAX_COUNT = 100_000
MAX_LAUNCHER_OPTIONS = 1024


def _invalid(message: str) -> TaskError:
    return TaskError("task.resources_invalid", f"resource_specification: {message}")


def _count(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= MAX_COUNT:
        raise _invalid(f"{key} must be an integer from 1 to {MAX_COUNT}")
    return value


@attrs.frozen
class ResourceSpecification:
    """What one task asks for; None where it did not say."""

    num_nodes: int | None = None
    ranks_per_node: int | None = None
    num_ranks: int | None = None
    launcher_options: str | None = None

    @classmethod
    def from_mapping(cls, data: Any) -> ResourceSpecification:
        """Check an untrusted mapping (``task.resources_invalid`` on any problem)."""
        if not isinstance(data, Mapping):
            raise _invalid("must be an object")
        unknown = sorted(str(k) for k in data if k not in RESOURCE_KEYS)
        if unknown:
            raise _invalid(f"unknown keys {unknown[:5]} (known: {', '.join(RESOURCE_KEYS)})")
        options = data.get("launcher_options")
        if options is not None and (
            not isinstance(options, str)
            or len(options) > MAX_LAUNCHER_OPTIONS
            or any(c in options for c in "\n\r\0")
        ):
            raise _invalid(
                f"launcher_options must be one line of at most {MAX_LAUNCHER_OPTIONS} characters"
            )
        spec = cls(
            _count(data, "num_nodes"),
            _count(data, "ranks_per_node"),
            _count(data, "num_ranks"),
            options,
        )
        if spec.num_ranks is not None and spec.num_ranks > spec.nodes * spec.max_per_node:
            raise _invalid(
                f"num_ranks {spec.num_ranks} does not fit on {spec.nodes} node(s) with "
                f"{spec.ranks_per_node} rank(s) per node"
            )
        return spec

    @property
    def nodes(self) -> int:
        return self.num_nodes or 1

    @property
    def max_per_node(self) -> int:
        return self.ranks_per_node if self.ranks_per_node is not None else MAX_COUNT

    @property
    def ranks(self) -> int:
        """The ranks the task runs (as ``complete`` fills them in)."""
        if self.num_ranks is not None:
            return self.num_ranks
        return self.nodes * (self.ranks_per_node or 1)

    def complete(self) -> ResourceSpecification:
        """Every count filled in: the nodes (1), the ranks and the ranks per node."""
        nodes = self.nodes
        ranks = self.ranks
        per_node = self.ranks_per_node or math.ceil(ranks / nodes)
        return attrs.evolve(self, num_nodes=nodes, ranks_per_node=per_node, num_ranks=ranks)

    def to_dict(self) -> dict[str, Any]:
        """The keys given (JSON data)."""
        return {k: getattr(self, k) for k in RESOURCE_KEYS if getattr(self, k) is not None}

    def within(self, nodes_per_block: int) -> None:
        """Refuse (``task.resources_exceed_block``) a request for more nodes than a block has."""
        if self.nodes > nodes_per_block:
            raise TaskError(
                "task.resources_exceed_block",
                f"the task asks for {self.nodes} node(s); a block of this endpoint has "
                f"{nodes_per_block}",
            )


def resource_specification(data: Any) -> ResourceSpecification | None:
    """None for None or an empty mapping, else the checked specification."""
    if data is None or (isinstance(data, Mapping) and not data):
        return None
    return ResourceSpecification.from_mapping(data)


_LIMIT_KEYS = ("num_nodes", "num_ranks")


@attrs.frozen
class ResourceCap:
    """The most nodes and ranks one task may ask for (None: no cap)."""

    num_nodes: int | None = None
    num_ranks: int | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ResourceCap:
        return cls(data.get("num_nodes"), data.get("num_ranks"))


def _frozen_caps(value: Mapping[str, ResourceCap]) -> Mapping[str, ResourceCap]:
    return MappingProxyType(dict(value))


@attrs.frozen
class ResourceLimits:
    """An administrator's caps on what one task of an account may ask for: ``default``
    for every account, ``accounts`` per local account name (replacing the default)."""

    default: ResourceCap = ResourceCap()
    accounts: Mapping[str, ResourceCap] = attrs.field(
        factory=dict, converter=_frozen_caps, hash=False
    )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> ResourceLimits:
        """From ``{num_nodes, num_ranks, accounts: {name: {num_nodes, num_ranks}}}``
        (already checked against its schema by whoever loaded it)."""
        data = data or {}
        accounts = {
            str(name): ResourceCap.from_mapping(cap)
            for name, cap in (data.get("accounts") or {}).items()
        }
        return cls(ResourceCap.from_mapping(data), accounts)

    def check(self, spec: ResourceSpecification, account: str) -> None:
        """Refuse (``task.resources_not_allowed``) a request over the account's caps."""
        cap = self.accounts.get(account, self.default)
        for what, asked, most in (
            ("nodes", spec.nodes, cap.num_nodes),
            ("ranks", spec.ranks, cap.num_ranks),
        ):
            if most is not None and asked > most:
                raise TaskError(
                    "task.resources_not_allowed",
                    f"the task asks for {asked} {what}; this endpoint allows {most} per task "
                    f"for account {account}",
                )


def resource_limits_schema() -> dict[str, Any]:
    """The JSON Schema of ``ResourceLimits.from_mapping``'s input."""
    counts = {key: {"type": "integer", "minimum": 1, "maximum": MAX_COUNT} for key in _LIMIT_KEYS}
    cap = {"type": "object", "additionalProperties": False, "properties": counts}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **counts,
            "accounts": {"type": "object", "additionalProperties": cap},
        },
    }
