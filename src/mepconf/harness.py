"""The reference exec harness: the in-process adapter behind the JSON-lines protocol.

``python -m mepconf.harness [--broken VARIANT]`` speaks ``mepconf-exec/1`` on
stdin/stdout (see ``mepconf.adapters.exec`` and conformance/README.md). It exists so
that the exec adapter is tested end to end and as a worked example for authors of
harnesses in other languages. Logs and tracebacks go to stderr, never stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from types import MappingProxyType
from typing import IO, Any

from mepconf import EXEC_PROTOCOL
from mepconf.adapters import AdapterError, Skip
from mepconf.adapters.inprocess import BROKEN_VARIANTS, InProcessAdapter
from mepconf.cli import report_stream
from mepconf.suite import Case


def _case_from_wire(data: Any) -> Case:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise AdapterError("a case needs an object with a string id")
    return Case(
        id=data["id"],
        requirement=str(data.get("requirement", "")),
        description="",
        op=str(data.get("op", "")),
        given=MappingProxyType(dict(data.get("given") or {})),
        input=data.get("input"),
        expect=MappingProxyType({}),
        needs=tuple(data.get("needs") or ()),
        file="<exec>",
    )


def serve(adapter: InProcessAdapter, stdin: IO[str], stdout: IO[str]) -> int:
    def send(message: dict[str, Any]) -> None:
        stdout.write(json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n")
        stdout.flush()

    for line in stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        kind = message.get("type")
        if kind == "hello":
            send(
                {
                    "type": "hello",
                    "protocol": EXEC_PROTOCOL,
                    "implementation": "mep (in-process reference harness)",
                    "ops": sorted(adapter.ops()),
                    "properties": sorted(adapter.properties()),
                }
            )
        elif kind == "case":
            case = _case_from_wire(message.get("case"))
            if case.op not in adapter.ops():
                send({"type": "skip", "id": case.id, "reason": f"op {case.op} not supported"})
                continue
            try:
                observed = adapter.execute(case)
            except Skip as exc:
                send({"type": "skip", "id": case.id, "reason": str(exc)})
                continue
            if observed.error is not None:
                send({"type": "result", "id": case.id, "error": observed.error.to_dict()})
            else:
                send({"type": "result", "id": case.id, "result": observed.result})
        elif kind == "bye":
            break
        else:
            sys.stderr.write(f"mepconf.harness: unknown message type {kind!r}\n")
            return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mepconf.harness")
    parser.add_argument("--broken", choices=BROKEN_VARIANTS)
    args = parser.parse_args(argv)
    adapter = InProcessAdapter(broken=args.broken)
    # The protocol owns stdout; anything else printed (component logs) goes to stderr.
    with report_stream() as protocol_out:
        try:
            return serve(adapter, sys.stdin, protocol_out)
        finally:
            adapter.close()


if __name__ == "__main__":
    raise SystemExit(main())
