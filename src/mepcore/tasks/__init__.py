"""Task execution: envelopes, serialization, the executor and its engines.

- ``pack_function`` / ``pack_args`` / ``unpack_value``: dill (or pickle) behind a closed
  registry of strategies (``STRATEGIES``), each payload tagged with its strategy;
- ``TaskEnvelope`` / ``ResultEnvelope`` / ``RemoteError``: frozen, versioned values with
  a JSON-able header and opaque payload bytes;
- ``Executor``: enforces ``allowed_functions``, the function cache and the limits
  (``ExecutorLimits``), and runs tasks on one engine: threads, a process pool, or
  Parsl's HighThroughputExecutor (imported only when configured);
- ``ResourceSpecification`` / ``ResourceLimits``: what an MPI task asks for, and an
  administrator's caps on it;
- ``unpack_result``: the client-side helper that returns a value or raises
  ``RemoteTaskError``.

Importing this package starts nothing and imports neither Parsl nor the engines; each
name is imported from its module when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mepcore._lazy import lazy_names

if TYPE_CHECKING:
    from mepcore.tasks.engine import Engine, ExecutorLimits, Job
    from mepcore.tasks.envelopes import (
        ENVELOPE_VERSION,
        RemoteError,
        RemoteTaskError,
        ResultEnvelope,
        TaskEnvelope,
        unpack_result,
    )
    from mepcore.tasks.executor import ENGINE_TYPES, Executor, build_engine, engine_keys
    from mepcore.tasks.resources import (
        ResourceLimits,
        ResourceSpecification,
        resource_limits_schema,
        resource_specification,
    )
    from mepcore.tasks.serialization import (
        DEFAULT_STRATEGY,
        STRATEGIES,
        Strategy,
        function_id_of,
        pack_args,
        pack_function,
        pack_value,
        unpack_value,
    )

# Where each public name lives; a name is imported from its module when first asked for
# (a user endpoint that runs no MPI task never imports ``resources``).
_HOMES = {
    "engine": ("Engine", "ExecutorLimits", "Job"),
    "envelopes": (
        "ENVELOPE_VERSION",
        "RemoteError",
        "RemoteTaskError",
        "ResultEnvelope",
        "TaskEnvelope",
        "unpack_result",
    ),
    "executor": ("ENGINE_TYPES", "Executor", "build_engine", "engine_keys"),
    "resources": (
        "ResourceLimits",
        "ResourceSpecification",
        "resource_limits_schema",
        "resource_specification",
    ),
    "serialization": (
        "DEFAULT_STRATEGY",
        "STRATEGIES",
        "Strategy",
        "function_id_of",
        "pack_args",
        "pack_function",
        "pack_value",
        "unpack_value",
    ),
}
__getattr__, __dir__ = lazy_names(__name__, _HOMES, globals())


__all__ = [
    "DEFAULT_STRATEGY",
    "ENGINE_TYPES",
    "ENVELOPE_VERSION",
    "STRATEGIES",
    "Engine",
    "Executor",
    "ExecutorLimits",
    "Job",
    "RemoteError",
    "RemoteTaskError",
    "ResourceLimits",
    "ResourceSpecification",
    "ResultEnvelope",
    "Strategy",
    "TaskEnvelope",
    "build_engine",
    "engine_keys",
    "function_id_of",
    "pack_args",
    "pack_function",
    "pack_value",
    "resource_limits_schema",
    "resource_specification",
    "unpack_result",
    "unpack_value",
]
