"""Serialization of functions, arguments and results behind a closed registry of strategies.

Every payload starts with the tag of the strategy that wrote it (``dill.v1\\n<bytes>``), so
the receiver knows how to load it. The registry ``STRATEGIES`` is closed: an unknown tag
is refused with ``task.unknown_strategy`` and is never resolved by importing a name.

``dill.v1`` and ``pickle.v1`` carry a function as bytecode, which only the same Python
minor version can run (``BYTECODE_STRATEGIES``). ``source.v1`` carries a plain function
as its source text (JSON: name and source, decorators left out), compiled where it runs:
it survives a Python version change, at the price of carrying no globals, closures or
decorators (the function imports what it uses) — Globus Compute's ``DillCodeSource``
makes the same trade.

This module deliberately does not decide *where* payloads may be loaded: loading runs
arbitrary code, so only the user endpoint (as the mapped user) calls ``unpack_value``;
the daemon treats payloads as opaque bytes (DESIGN.md §3.4).
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
from types import MappingProxyType
from typing import IO, Any

import attrs

from mepcore.errors import TaskError

# Tags are short ASCII words; the separator cannot appear in a tag.
_SEPARATOR = b"\n"
_MAX_TAG_BYTES = 32
_PROTOCOL = 5


@attrs.frozen
class Strategy:
    """One way to turn Python objects into bytes and back."""

    tag: str
    dump: Callable[[Any, IO[bytes]], None]
    loads: Callable[[bytes], Any]

    def dumps(self, value: Any) -> bytes:
        buffer = io.BytesIO()
        self.dump(value, buffer)
        return buffer.getvalue()


# dill is imported by the first dump or load, not with this module: a user endpoint
# starts without it (about 15 ms and 2 MiB), and each process-pool worker imports it at
# its first task (a forked worker never inherits a half-done import from its parent).


def _dill_dump(value: Any, stream: IO[bytes]) -> None:
    import dill

    # recurse=True: a function defined in a script (__main__) carries the globals it
    # uses (helpers, constants) rather than a reference to a namespace the user endpoint
    # does not have. The client serializes the same way (byte-compatible, tested).
    dill.dump(value, stream, protocol=_PROTOCOL, recurse=True)


def _dill_loads(data: bytes) -> Any:
    import dill

    return dill.loads(data)  # noqa: S301 - only ever called as the user, on their own data


def _pickle_dump(value: Any, stream: IO[bytes]) -> None:
    pickle.dump(value, stream, protocol=_PROTOCOL)


def _pickle_loads(data: bytes) -> Any:
    return pickle.loads(data)  # noqa: S301 - only ever called as the user, on their own data


def function_source(fn: Any) -> dict[str, str]:
    """A plain function's name and source text, without its decorators; ``TypeError``
    for what cannot travel as source (a lambda, a closure, a builtin, no source file)."""
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


def _source_dump(value: Any, stream: IO[bytes]) -> None:
    document = function_source(value)
    stream.write(json.dumps(document, sort_keys=True, separators=(",", ":")).encode())


def _source_loads(data: bytes) -> Any:
    document = json.loads(data)
    name, source = document["name"], document["source"]
    namespace: dict[str, Any] = {"__name__": "__mep_source__"}
    # Only ever as the user, on their own function (as dill.loads would run it anyway).
    exec(compile(source, f"<source of {name}>", "exec"), namespace)  # noqa: S102
    return namespace[name]


# The closed registry. Adding a strategy means adding a line here, never a dynamic import.
STRATEGIES: Mapping[str, Strategy] = MappingProxyType(
    {
        "dill.v1": Strategy("dill.v1", _dill_dump, _dill_loads),
        "pickle.v1": Strategy("pickle.v1", _pickle_dump, _pickle_loads),
        "source.v1": Strategy("source.v1", _source_dump, _source_loads),
    }
)
DEFAULT_STRATEGY = "dill.v1"
# Strategies whose functions are bytecode: they run only on the Python minor version
# that wrote them.
BYTECODE_STRATEGIES = frozenset({"dill.v1", "pickle.v1"})
# Strategies for functions only (values, arguments and results never use them).
FUNCTION_ONLY_STRATEGIES = frozenset({"source.v1"})


def payload_tag(payload: bytes) -> str:
    """The strategy tag a payload starts with ('' when it has none)."""
    end = payload.find(_SEPARATOR, 0, _MAX_TAG_BYTES + 1)
    return payload[:end].decode("ascii", "replace") if end > 0 else ""


def strategy(tag: str) -> Strategy:
    """The registered strategy for ``tag``; ``task.unknown_strategy`` otherwise."""
    try:
        return STRATEGIES[tag]
    except KeyError:
        raise TaskError(
            "task.unknown_strategy", f"serialization strategy {tag[:40]!r} is not registered"
        ) from None


def _header(tag: str) -> bytes:
    return strategy(tag).tag.encode("ascii") + _SEPARATOR


def pack_value(value: Any, strategy_tag: str = DEFAULT_STRATEGY) -> bytes:
    """Serialize one value, prefixed by its strategy tag."""
    header = _header(strategy_tag)
    buffer = io.BytesIO()
    buffer.write(header)
    STRATEGIES[strategy_tag].dump(value, buffer)
    return buffer.getvalue()


def pack_function(
    fn: Callable[..., Any], strategy_tag: str = DEFAULT_STRATEGY
) -> tuple[str, bytes]:
    """Serialize a function; its id is the sha256 (hex) of the serialized bytes."""
    payload = pack_value(fn, strategy_tag)
    return function_id_of(payload), payload


def function_id_of(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def pack_args(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], strategy: str = DEFAULT_STRATEGY
) -> bytes:
    """Serialize call arguments (positional and keyword) as one payload."""
    return pack_value((tuple(args), dict(kwargs)), strategy)


def split_payload(payload: bytes) -> tuple[Strategy, memoryview]:
    """The strategy named by a payload's tag and the body after it."""
    end = payload.find(_SEPARATOR, 0, _MAX_TAG_BYTES + 1)
    if end <= 0:
        raise TaskError("task.deserialization_failed", "payload has no strategy tag")
    try:
        tag = payload[:end].decode("ascii")
    except UnicodeDecodeError:
        raise TaskError("task.unknown_strategy", "payload tag is not ASCII") from None
    return strategy(tag), memoryview(payload)[end + 1 :]


def unpack_value(payload: bytes) -> Any:
    """Load a payload written by ``pack_value``/``pack_args``/``pack_function``.

    Raises ``TaskError`` with ``task.unknown_strategy`` for an unregistered tag and
    ``task.deserialization_failed`` for bytes the strategy cannot load.
    """
    found, body = split_payload(payload)
    try:
        return found.loads(bytes(body))
    except Exception as exc:
        raise TaskError(
            "task.deserialization_failed", f"{type(exc).__name__}: {exc}"[:500]
        ) from exc


class ResultTooLarge(Exception):
    """Raised by ``BoundedWriter`` as soon as a serialized value passes its limit."""


class BoundedWriter(io.RawIOBase):
    """A write-only byte sink that refuses to grow past ``limit`` bytes.

    Serializing straight into it means a 20 MB result is abandoned at the limit instead
    of being built in full and refused afterwards.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if len(self._buffer) + view.nbytes > self._limit:
            raise ResultTooLarge(f"more than {self._limit} bytes")
        self._buffer += view
        return view.nbytes

    def getvalue(self) -> bytes:
        return bytes(self._buffer)


def pack_value_bounded(value: Any, limit: int, strategy_tag: str = DEFAULT_STRATEGY) -> bytes:
    """Like ``pack_value`` but raises ``ResultTooLarge`` once the output passes ``limit``."""
    header = _header(strategy_tag)
    writer = BoundedWriter(limit + len(header))
    writer.write(header)
    STRATEGIES[strategy_tag].dump(value, writer)  # type: ignore[arg-type]
    return writer.getvalue()
