"""Time to refuse hostile input and to stop stuck work (the timings the unit tests used to assert).

Rows, each timed call by call:
- ``validate_variables`` refusing a 10 MB string, objects nested 1,000 deep and a million
  keys (the input is built once, outside the timing);
- ``render_template`` refusing a sandbox escape and the runaway templates that take the
  most work before a limit stops them (nested loops, unbounded recursion, a doubling
  string, a 600 MB output);
- a task past its walltime (0.2 s) on the thread and the process engine: submit to the
  ``task.timeout`` result (the walltime itself included);
- ``shutdown(wait=False)`` of a process engine whose one worker runs a day-long task;
- an external identity mapper: one that hangs with a child past its 1 s timeout (to the
  ``identity.mapper_timeout`` error, the timeout itself included), and one that answers
  at once but leaves a helper holding its stdout open.

The unit tests check that this work is *bounded* (calls, memory, events); how long it
takes on a given machine is measured here. No peer: these are mep's own limits.
Usage: python bench/limits.py [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Stats, fmt_stats, print_table, time_calls, write_json

from mepcore.config import MappedIdentity, render_template, validate_variables
from mepcore.errors import ConfigError, IdentityError
from mepcore.identity import IdentityMapper
from mepcore.tasks import Executor, TaskEnvelope, pack_args, pack_function
from mepcore.types import Account, Identity, IdentitySet
from mepd.logs import configure_logging

MAPPED = MappedIdentity(
    account=Account(
        name="alice",
        uid=1001,
        gid=1001,
        home="/home/alice",
        shell="/bin/bash",
        group_ids=(1001,),
        group_names=("alice",),
    ),
    identity=Identity("0b6a3c6e-1111-2222-3333-444455556666", {"username": "alice@example.org"}),
)
TEMPLATES = [
    ("sandbox escape ''.__class__.__mro__", "{{ ''.__class__.__mro__ }}"),
    (
        "nested loops, 10,000 x 10,000",
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    ),
    ("unbounded macro recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    (
        "macro doubling its output 64 times",
        "{% macro f(n) %}{% if n %}{% set x = f(n - 1) %}{{ x }}{{ x }}{% endif %}a"
        "{% endmacro %}{{ f(64) }}",
    ),
    ("600 MB of output", "{% for i in range(10000) %}{{ 'x' * 60000 }}{% endfor %}"),
]
WHO = IdentitySet.from_json([{"id": "id-1", "username": "alice@example.org"}])
HANGING_MAPPER = (
    "import subprocess, time\nsubprocess.Popen(['/bin/sleep', '86400'])\ntime.sleep(86400)\n"
)
HELPER_HOLDS_STDOUT = (
    "import subprocess, sys\n"
    "sys.stdin.read()\n"
    "subprocess.Popen(['/bin/sleep', '86400'])\n"
    'print(\'{"DATA_TYPE": "identity_mapping_output#1.0.0", "result": []}\', flush=True)\n'
)


def refused(call: Callable[[], Any], reason: str) -> Callable[[], None]:
    """``call`` as a timed step that must fail with ``reason``."""

    def step() -> None:
        try:
            call()
        except (ConfigError, IdentityError) as exc:
            if exc.reason != reason:
                raise
        else:
            raise AssertionError(f"not refused (expected {reason})")

    return step


def variable_rows(calls: int) -> list[tuple[str, list[float]]]:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(1000):
        node["a"] = node = {}
    inputs = [
        ("validate_variables: a 10 MB string", {"s": "x" * 10_000_000}),
        ("validate_variables: nested 1,000 deep", deep),
        ("validate_variables: 1,000,000 keys", {f"k{i}": i for i in range(1_000_000)}),
    ]
    return [
        (
            name,
            time_calls(
                refused(lambda v=value: validate_variables(v, None), "config.variables_too_large"),
                calls,
            ),
        )
        for name, value in inputs
    ]


def template_rows(calls: int) -> list[tuple[str, list[float]]]:
    rows = []
    for name, text in TEMPLATES:
        reason = "config.sandbox_violation" if "sandbox" in name else "config.render_limit"
        step = refused(lambda t=text: render_template(t, {}, mapped=MAPPED), reason)
        rows.append((f"render_template: {name}", time_calls(step, calls)))
    return rows


def stuck(seconds: float) -> None:
    import time

    time.sleep(seconds)


def engine_rows(calls: int) -> list[tuple[str, list[float]]]:
    fid, body = pack_function(stuck)
    rows = []
    for engine, sleep in (("ThreadPoolEngine", 1.0), ("ProcessPoolEngine", 86_400.0)):
        # One worker per timed call: a thread engine's timed-out thread sleeps on.
        config = {"type": engine, "max_workers": calls + 1}
        with Executor.from_engine_config(config) as executor:
            executor.register_function(fid, body)

            def timed_out(ex: Executor = executor, s: float = sleep) -> None:
                envelope = TaskEnvelope("t", fid, pack_args((s,), {}), walltime=0.2)
                result = ex.submit(envelope).result(60)
                assert result.reason == "task.timeout", result

            rows.append((f"{engine}: walltime 0.2 s to task.timeout", time_calls(timed_out, calls)))
    samples = []
    for _ in range(calls):
        executor = Executor.from_engine_config({"type": "ProcessPoolEngine", "max_workers": 1})
        executor.start()
        executor.register_function(fid, body)
        future = executor.submit(TaskEnvelope("h", fid, pack_args((86_400.0,), {})))
        samples += time_calls(lambda ex=executor: ex.shutdown(wait=False), 1)
        assert future.result(0).reason == "task.cancelled"
    rows.append(("ProcessPoolEngine: shutdown(wait=False) with a running task", samples))
    return rows


def mapper_rows(calls: int, top: Path) -> list[tuple[str, list[float]]]:
    hanging, helper = top / "hanging.py", top / "helper.py"
    hanging.write_text(HANGING_MAPPER)
    helper.write_text(HELPER_HOLDS_STDOUT)

    def mapper(script: Path, timeout: float) -> IdentityMapper:
        document = {
            "DATA_TYPE": "external_identity_mapping#1.0.0",
            "command": ["/usr/bin/python3", "-I", str(script)],
        }
        return IdentityMapper.from_documents([document], timeout=timeout)

    stuck_mapper = mapper(hanging, 1.0)
    quick_mapper = mapper(helper, 60.0)
    # The runner kills each mapper's process group; main() kills any day-long sleep
    # left all the same, so a regression cannot leave them running.
    rows = [
        (
            "external mapper: hangs past its 1 s timeout",
            time_calls(refused(lambda: stuck_mapper.map(WHO), "identity.mapper_timeout"), calls),
        ),
        (
            "external mapper: answers, a helper keeps stdout open",
            time_calls(lambda: quick_mapper.map(WHO), calls),
        ),
    ]
    return rows


def kill_leftover_sleeps(before: set[int]) -> None:
    """Day-long sleeps this script started that are still running (none if all is well)."""
    for pid in set(_sleeps()) - before:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _sleeps() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/cmdline").read_bytes() == b"/bin/sleep\x0086400\x00":
                    found.append(int(entry))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts (for tests)")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    configure_logging("warning")  # the engines' events go to stderr; keep the table clean
    calls = 2 if args.smoke else 20
    slow_calls = 1 if args.smoke else 5

    before = set(_sleeps())
    measured: list[tuple[str, list[float]]] = []
    try:
        measured += variable_rows(calls)
        measured += template_rows(calls)
        measured += engine_rows(slow_calls)
        with tempfile.TemporaryDirectory(prefix="mep-bench-limits-") as top:
            measured += mapper_rows(slow_calls, Path(top))
    finally:
        kill_leftover_sleeps(before)

    rows = [[name, str(len(s)), *fmt_stats(Stats.of(s))] for name, s in measured]
    print_table(
        "Time to refuse hostile input and to stop stuck work (one call at a time)",
        ["what", "n", "min", "p50", "p95", "max"],
        rows,
        [
            "the unit tests check these are bounded (calls, memory, events), not their speed",
            "walltime and mapper rows include the 0.2 s walltime / 1 s timeout itself",
            "render limits: RenderLimits defaults (100,000 calls and loop iterations, 1 MiB "
            "strings and output)",
        ],
    )
    write_json(args.json, {name: Stats.of(s).to_dict() for name, s in measured})
    return 0


if __name__ == "__main__":
    sys.exit(main())
