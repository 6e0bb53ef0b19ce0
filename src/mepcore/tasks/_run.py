"""Running one task where the work happens (a pool worker, a thread, a Parsl worker).

``run_task`` loads the arguments, calls the function, and serializes the value with a
size bound, turning every failure into an ``Outcome`` tuple: plain data, cheap to send
through a pipe. It deliberately knows nothing about pools, futures or envelopes.
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from mepcore.errors import TaskError
from mepcore.tasks.serialization import (
    DEFAULT_STRATEGY,
    ResultTooLarge,
    pack_value_bounded,
    split_payload,
    unpack_value,
)

# (status, payload, error, started, finished); error = (type_name, message, traceback, reason)
ErrorTuple = tuple[str, str, str, str]
Outcome = tuple[str, bytes, ErrorTuple | None, float, float]

_MAX_TEXT = 16 * 1024
_MAX_TRACEBACK = 64 * 1024


def type_name_of(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in ("builtins", "__main__", None):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)[:_MAX_TEXT]
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def failure(reason: str, exc: BaseException | None = None, message: str = "") -> ErrorTuple:
    if exc is None:
        return ("TaskError", message, "", reason)
    tb = "".join(traceback.format_exception(exc))[-_MAX_TRACEBACK:]
    return (type_name_of(exc), message or _safe_str(exc), tb, reason)


class FunctionLoadFailed:
    """Stands in a function cache for a function body that could not be loaded."""

    def __init__(self, error: ErrorTuple) -> None:
        self.error = error


def load_function(payload: bytes) -> Callable[..., Any] | FunctionLoadFailed:
    try:
        fn = unpack_value(payload)
    except TaskError as exc:
        return FunctionLoadFailed(failure(exc.reason, exc.__cause__ or exc, exc.detail))
    except BaseException as exc:  # a payload can raise anything while loading
        return FunctionLoadFailed(failure("task.deserialization_failed", exc))
    if not callable(fn):
        return FunctionLoadFailed(
            failure("task.deserialization_failed", message="the function payload is not callable")
        )
    return fn  # type: ignore[no-any-return]


class _WalltimeExceeded(BaseException):
    """Raised inside a task by the optional in-worker alarm (Parsl workers)."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _WalltimeExceeded


def run_task(
    fn: Callable[..., Any] | FunctionLoadFailed,
    args_payload: bytes,
    max_result_bytes: int,
    *,
    alarm_walltime: float | None = None,
) -> Outcome:
    """Run one task and describe what happened; never raises for anything the task does.

    ``alarm_walltime`` arms SIGALRM in the calling (main) thread: used where nobody
    outside can kill the worker (Parsl). It interrupts Python code and sleeps, not a
    C extension that never returns to the interpreter.
    """
    started = time.time()
    if isinstance(fn, FunctionLoadFailed):
        return ("failed", b"", fn.error, started, time.time())
    try:
        tag, args, kwargs = _arguments(args_payload)
    except TaskError as exc:
        error = failure(exc.reason, exc.__cause__ or exc, exc.detail)
        return ("failed", b"", error, started, time.time())
    except BaseException as exc:
        return ("failed", b"", failure("task.deserialization_failed", exc), started, time.time())
    try:
        value = _call(fn, args, kwargs, alarm_walltime)
    except _WalltimeExceeded as exc:
        _, _, tb, _ = failure("task.timeout", exc)
        message = f"the task ran longer than its walltime of {alarm_walltime:g} s"
        return ("failed", b"", ("TimeoutError", message, tb, "task.timeout"), started, time.time())
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are task failures too
        return ("failed", b"", failure("task.failed", exc), started, time.time())
    finished = time.time()
    try:
        payload = pack_value_bounded(value, max_result_bytes, _result_strategy(tag))
    except ResultTooLarge:
        message = f"the result is larger than the limit of {max_result_bytes} bytes"
        error = failure("task.result_too_large", message=message)
        return ("failed", b"", error, started, finished)
    except BaseException as exc:
        return ("failed", b"", failure("task.serialization_failed", exc), started, finished)
    return ("success", payload, None, started, finished)


def _arguments(args_payload: bytes) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """The serialization tag and the (args, kwargs) of a task's argument payload."""
    tag = split_payload(args_payload)[0].tag
    args, kwargs = unpack_value(args_payload)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise TypeError("arguments payload is not (tuple, dict)")
    return tag, args, kwargs


def _call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    alarm_walltime: float | None,
) -> Any:
    """``fn(*args, **kwargs)``, interrupted by SIGALRM past ``alarm_walltime`` when this
    is the main thread (``_WalltimeExceeded``)."""
    if alarm_walltime is None or threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, alarm_walltime)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _result_strategy(args_tag: str) -> str:
    # Results go back with the strategy the caller used for the arguments, which the
    # caller is known to be able to load.
    return args_tag or DEFAULT_STRATEGY
