"""The client's half of the payload format: dill bytes behind a strategy tag.

A payload is ``<tag>\\n<bytes>``; the client writes the ``dill.v1`` strategy (``dill``
with pickle protocol 5) or, for functions, ``source.v1`` (the function's name and
source text as JSON, which survives a different Python on the endpoint: see
``mepcore.tasks.serialization``), the same bytes ``mepcore.tasks`` writes, so a function packed
here has the same id (sha256 of the payload) as one packed by the user endpoint's side,
and values the user endpoint packs load here. ``tests/test_client_wire.py`` keeps the
two byte-for-byte equal.

This module deliberately does not import ``mepcore.tasks``: the client is an L1
component that depends on nothing else of mepcore but its L0 errors (DESIGN.md §1), so
the format is written out again here, small and closed. It only ever loads payloads
the caller asked for (results of their own tasks); unknown tags are refused, never
resolved by importing a name.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import pickle
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import dill

from mepcore.client.errors import SerializationError

SEPARATOR = b"\n"
DEFAULT_TAG = "dill.v1"
_MAX_TAG_BYTES = 32
_PROTOCOL = 5


def _dill_loads(body: bytes) -> Any:
    return dill.loads(body)  # noqa: S301 - results of the caller's own tasks


def _pickle_loads(body: bytes) -> Any:
    return pickle.loads(body)  # noqa: S301 - results of the caller's own tasks


# The loaders the client accepts; the same closed set of tags as mepcore.tasks.
_LOADERS: Mapping[str, Callable[[bytes], Any]] = {
    "dill.v1": _dill_loads,
    "pickle.v1": _pickle_loads,
}


def pack_value(value: Any) -> bytes:
    """Serialize one value as a ``dill.v1`` payload (``SerializationError`` if it cannot)."""
    buffer = io.BytesIO()
    buffer.write(DEFAULT_TAG.encode("ascii") + SEPARATOR)
    try:
        # recurse=True, as mepcore.tasks does: script functions carry the globals they use.
        dill.dump(value, buffer, protocol=_PROTOCOL, recurse=True)
    except Exception as exc:
        raise SerializationError(
            "task.serialization_failed", f"{type(exc).__name__}: {exc}"[:500]
        ) from exc
    return buffer.getvalue()


# What Executor(serializer=...) accepts, and the tag each one writes.
SERIALIZERS: Mapping[str, str] = {"dill": DEFAULT_TAG, "source": "source.v1"}


def _function_source(fn: Any) -> dict[str, str]:
    # The same document mepcore.tasks.serialization.function_source makes (kept equal
    # by tests/test_versions.py); written out again because the client imports no
    # other component (DESIGN.md §1).
    # A decorated function (functools.wraps) travels as the function it wraps.
    fn = inspect.unwrap(fn) if callable(fn) else fn
    if not inspect.isfunction(fn):
        raise TypeError(f"only a function defined with def can be sent by source, not {fn!r}")
    if fn.__name__ == "<lambda>":
        raise TypeError("a lambda cannot be sent by source: define it with def")
    if fn.__code__.co_freevars:
        names = ", ".join(fn.__code__.co_freevars)
        raise TypeError(f"{fn.__name__} uses variables of an enclosing function ({names})")
    try:
        text = textwrap.dedent(inspect.getsource(fn))
    except OSError as exc:
        raise TypeError(f"the source of {fn.__name__} cannot be found: {exc}") from exc
    node = ast.parse(text).body[0]
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        raise TypeError(f"the source of {fn.__name__} is not a def")
    source = "".join(text.splitlines(keepends=True)[node.lineno - 1 :])
    return {"name": fn.__name__, "source": source}


def pack_source(fn: Callable[..., Any]) -> bytes:
    """A function as a ``source.v1`` payload (``SerializationError`` if it has no
    source to send: a lambda, a closure, a builtin, code typed at a bare prompt)."""
    try:
        document = _function_source(fn)
    except (TypeError, SyntaxError) as exc:
        raise SerializationError("task.serialization_failed", str(exc)[:500]) from exc
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return b"source.v1" + SEPARATOR + body


def function_id_of(payload: bytes) -> str:
    """A function's id: the sha256 (hex) of its payload, as the daemon computes it."""
    return hashlib.sha256(payload).hexdigest()


def pack_function(fn: Callable[..., Any], serializer: str = "dill") -> tuple[str, bytes]:
    """Serialize a function; returns ``(function_id, payload)``.

    ``dill`` (the default) sends functions defined in ``__main__`` (scripts, notebooks)
    by value and functions of importable modules by reference: such a module must be
    importable in the user endpoint too; the endpoint must run the same Python minor
    version. ``source`` sends the function's source text, which any Python 3 runs: the
    function must then import what it uses inside its body.
    """
    if serializer not in SERIALIZERS:
        raise SerializationError(
            "task.serialization_failed",
            f"serializer must be one of {', '.join(SERIALIZERS)}, not {serializer!r}",
        )
    payload = pack_source(fn) if serializer == "source" else pack_value(fn)
    return function_id_of(payload), payload


def pack_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
    """Serialize the arguments of one call as one payload: ``(args, kwargs)``."""
    return pack_value((tuple(args), dict(kwargs)))


def unpack_value(payload: bytes) -> Any:
    """Load a payload written by ``pack_value`` here or in ``mepcore.tasks``.

    Raises ``SerializationError`` with ``task.unknown_strategy`` for a tag the client does not
    know and ``task.deserialization_failed`` for bytes that do not load (for example a
    result whose class is not importable in the caller's interpreter).
    """
    end = payload.find(SEPARATOR, 0, _MAX_TAG_BYTES + 1)
    if end <= 0:
        raise SerializationError("task.deserialization_failed", "payload has no strategy tag")
    tag = payload[:end].decode("ascii", errors="replace")
    loader = _LOADERS.get(tag)
    if loader is None:
        raise SerializationError(
            "task.unknown_strategy", f"serialization strategy {tag[:40]!r} is unknown"
        )
    try:
        return loader(payload[end + 1 :])
    except Exception as exc:
        raise SerializationError(
            "task.deserialization_failed", f"{type(exc).__name__}: {exc}"[:500]
        ) from exc
