"""The exec adapter: drives any implementation through a JSON-lines protocol on stdio.

The harness is a program (any language) started once with ``--command``; the runner
writes one JSON object per line to its stdin and reads one per line from its stdout.
Protocol ``mepconf-exec/1`` (documented in conformance/README.md):

1. runner → ``{"type": "hello", "protocol": "mepconf-exec/1"}``;
   harness → ``{"type": "hello", "protocol": "mepconf-exec/1", "implementation": str,
   "ops": [op, …], "properties": [need, …]}``.
2. per case, runner → ``{"type": "case", "case": {id, requirement, op, given, input,
   needs}}``; harness → ``{"type": "result", "id": id, "result": any}`` or
   ``{"type": "result", "id": id, "error": {"reason": str, "message": str,
   "violations": [json path, …], "details": {…}}}`` or
   ``{"type": "skip", "id": id, "reason": str}``.
3. runner → ``{"type": "bye"}``; the harness exits.

Anything else from the harness (not JSON, another id, no answer within the per-case
timeout, exit) is an *error* verdict for that case; the harness is then restarted for
the next case. The harness's stderr is passed through for debugging.
"""

from __future__ import annotations

import json
import os
import selectors
import shlex
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import attrs

from mepconf import EXEC_PROTOCOL
from mepconf.adapters import AdapterError, ErrorInfo, Observation, Skip
from mepconf.suite import Case

DEFAULT_TIMEOUT = 60.0
MAX_LINE = 64 * 1024 * 1024


def create(options: Mapping[str, str]) -> ExecAdapter:
    command = options.get("command")
    if not command:
        raise AdapterError("the exec adapter needs --command")
    unknown = set(options) - {"command", "timeout"}
    if unknown:
        raise AdapterError(f"the exec adapter takes no options {sorted(unknown)}")
    timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
    adapter = ExecAdapter(argv=tuple(shlex.split(command)), timeout=timeout)
    adapter.start()
    return adapter


@attrs.define
class ExecAdapter:
    argv: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    name: str = "exec"
    implementation: str = ""
    _ops: frozenset[str] = frozenset()
    _props: frozenset[str] = frozenset()
    _proc: subprocess.Popen[bytes] | None = None
    _buffer: bytes = b""

    def start(self) -> None:
        try:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
            )
        except OSError as exc:
            raise AdapterError(f"cannot start the harness {self.argv[0]!r}: {exc}") from exc
        self._buffer = b""
        self._send({"type": "hello", "protocol": EXEC_PROTOCOL})
        hello = self._receive()
        if hello.get("type") != "hello" or hello.get("protocol") != EXEC_PROTOCOL:
            self.close()
            raise AdapterError(f"the harness does not speak {EXEC_PROTOCOL}: {hello!r}")
        ops, props = hello.get("ops", []), hello.get("properties", [])
        if not isinstance(ops, list) or not isinstance(props, list):
            self.close()
            raise AdapterError("the harness hello needs lists 'ops' and 'properties'")
        self._ops, self._props = frozenset(map(str, ops)), frozenset(map(str, props))
        self.implementation = str(hello.get("implementation", ""))

    def ops(self) -> frozenset[str]:
        return self._ops

    def properties(self) -> frozenset[str]:
        return self._props

    def execute(self, case: Case) -> Observation:
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        try:
            self._send({"type": "case", "case": case.to_wire()})
            answer = self._receive()
        except AdapterError:
            self._kill()
            raise
        if answer.get("id") != case.id:
            self._kill()
            raise AdapterError(f"the harness answered for {answer.get('id')!r}, not {case.id!r}")
        kind = answer.get("type")
        if kind == "skip":
            raise Skip(str(answer.get("reason") or "skipped by the harness"))
        if kind != "result":
            raise AdapterError(f"unexpected message type {kind!r}")
        if "error" in answer:
            if not isinstance(answer["error"], dict):
                raise AdapterError("'error' must be an object")
            return Observation(error=ErrorInfo.from_dict(answer["error"]))
        if "result" not in answer:
            raise AdapterError("a result message needs 'result' or 'error'")
        return Observation.ok(answer["result"])

    def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._send({"type": "bye"})
                proc.stdin.close()  # type: ignore[union-attr]
                proc.wait(timeout=5)
            except (AdapterError, OSError, subprocess.TimeoutExpired):
                self._kill()
        self._close_pipes()
        self._proc = None

    # -- plumbing ------------------------------------------------------------------

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close_pipes()
        self._proc = None

    def _close_pipes(self) -> None:
        proc = self._proc
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()

    def _send(self, message: Mapping[str, Any]) -> None:
        if self._proc is None or self._proc.stdin is None:
            raise AdapterError("the harness is not running")
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n"
        try:
            self._proc.stdin.write(data.encode("utf-8"))
            self._proc.stdin.flush()
        except OSError as exc:
            raise AdapterError(f"the harness closed its input: {exc}") from exc

    def _receive(self) -> dict[str, Any]:
        if self._proc is None or self._proc.stdout is None:
            raise AdapterError("the harness is not running")
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AdapterError(f"no answer from the harness within {self.timeout:g} s")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AdapterError("the harness exited without answering")
                self._buffer += chunk
                if len(self._buffer) > MAX_LINE:
                    raise AdapterError("the harness wrote a line longer than 64 MiB")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except (UnicodeDecodeError, ValueError) as exc:
            raise AdapterError(f"the harness wrote something that is not JSON: {exc}") from exc
        if not isinstance(message, dict):
            raise AdapterError("every harness message must be a JSON object")
        return message
