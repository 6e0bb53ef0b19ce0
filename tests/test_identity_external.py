"""External mapping programs: the real runner with tiny scripts, and a fake for selection."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs
import pytest

from mepcore.errors import IdentityError
from mepcore.identity import (
    CommandOutput,
    CommandRunner,
    IdentityMapper,
    SubprocessCommandRunner,
)
from mepcore.types import IdentitySet

EXT = "external_identity_mapping#1.0.0"
EXPR = "expression_identity_mapping#1.0.0"
PY = "/usr/bin/python3"
T = TypeVar("T")
OUT = "identity_mapping_output#1.0.0"

WHO = IdentitySet.from_json(
    [
        {"id": "id-1", "username": "alice@example.org"},
        {"id": "id-2", "username": "bob@example.org"},
    ]
)


def script(tmp_path: Path, body: str, name: str = "mapper.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def external(*command: str) -> dict[str, Any]:
    return {"DATA_TYPE": EXT, "command": list(command)}


def map_with(docs: Any, identities: IdentitySet = WHO, **kwargs: Any) -> Any:
    return IdentityMapper.from_documents(docs, **kwargs).map(identities)


def mapping_error(docs: Any, **kwargs: Any) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        map_with(docs, **kwargs)
    return info.value


def answer_script(tmp_path: Path, answer: Any) -> str:
    return script(
        tmp_path,
        f"import json, sys\njson.load(sys.stdin)\nprint({json.dumps(answer)!r})\n"
        if not isinstance(answer, str)
        else f"import sys\nsys.stdin.read()\nsys.stdout.write({answer!r})\n",
    )


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting for init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def returns_within(call: Callable[[], T], deadline_s: float = 120.0) -> T:
    """What ``call()`` returns or raises, run in a thread; a test failure if it has not
    returned after ``deadline_s``. A deadline for a wait, not a speed limit: the programs
    given to it would otherwise hang for a day."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the test's thread as it is
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline_s)
    if not outcome:
        pytest.fail(f"still waiting after {deadline_s:.0f} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(T, value)


def kill_all(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until_gone(pids: Sequence[int], deadline_s: float = 5.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if all(process_gone(p) for p in pids):
            return True
        os.sched_yield()
    return all(process_gone(p) for p in pids)


# -- a good program ----------------------------------------------------------------


def test_program_answer_maps_in_identity_set_order(tmp_path: Path) -> None:
    answer = {
        "DATA_TYPE": OUT,
        "result": [{"id": "id-2", "output": "bob"}, {"id": "id-1", "output": "alice"}],
    }
    result = map_with([external(PY, answer_script(tmp_path, answer))])
    assert (result.username, result.matched_identity, result.mapper, result.rule) == (
        "alice",
        "id-1",
        0,
        None,
    )
    assert [(c.identity, c.username) for c in result.candidates] == [
        ("id-1", "alice"),
        ("id-2", "bob"),
    ]


def test_program_gets_the_input_document_and_a_clean_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEP_TEST_SECRET", "do-not-leak")
    seen = tmp_path / "seen.json"
    body = (
        "import json, os, sys\n"
        "request = json.load(sys.stdin)\n"
        f"open({str(seen)!r}, 'w').write(json.dumps({{'request': request,"
        " 'env': dict(os.environ), 'cwd': os.getcwd(), 'sid': os.getsid(0), 'pid': os.getpid()}))\n"
        f"print(json.dumps({{'DATA_TYPE': {OUT!r}, 'result': []}}))\n"
    )
    result = map_with([external(PY, script(tmp_path, body))])
    assert result.username is None
    data = json.loads(seen.read_text())
    assert data["request"] == {
        "DATA_TYPE": "identity_mapping_input#1.0.0",
        "identities": [i.to_dict() for i in WHO],
    }
    assert "MEP_TEST_SECRET" not in data["env"]
    assert set(data["env"]) <= {"PATH", "LC_ALL", "LC_CTYPE"}
    assert data["cwd"] == "/"
    assert data["sid"] == data["pid"]  # its own session, so its own process group


def test_empty_answer_lets_the_next_mapper_decide(tmp_path: Path) -> None:
    empty = answer_script(tmp_path, {"DATA_TYPE": OUT, "result": []})
    expression = {
        "DATA_TYPE": EXPR,
        "mappings": [{"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}],
    }
    result = map_with([external(PY, empty), expression])
    assert (result.username, result.mapper, result.rule) == ("alice", 1, 0)


def test_empty_output_string_is_no_result(tmp_path: Path) -> None:
    answer = {"DATA_TYPE": OUT, "result": [{"id": "id-1", "output": ""}]}
    assert map_with([external(PY, answer_script(tmp_path, answer))]).username is None


def test_program_that_does_not_read_large_input_is_fine(tmp_path: Path) -> None:
    many = IdentitySet.from_json([{"id": f"id-{i}", "pad": "x" * 1000} for i in range(500)])
    body = f'print(\'{{"DATA_TYPE": "{OUT}", "result": [{{"id": "id-7", "output": "u7"}}]}}\')\n'
    result = map_with([external(PY, script(tmp_path, body))], identities=many)
    assert (result.username, result.matched_identity) == ("u7", "id-7")


def test_program_path_relative_to_the_mapping_file(tmp_path: Path) -> None:
    prog = tmp_path / "mapper.sh"
    prog.write_text(
        f'#!/bin/sh\ncat >/dev/null\necho \'{{"DATA_TYPE": "{OUT}", "result": '
        '[{"id": "id-2", "output": "bob"}]}\'\n'
    )
    prog.chmod(0o755)
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps([external("./mapper.sh")]))
    assert IdentityMapper.from_file(mapping).map(WHO).username == "bob"


# -- every way a program can fail, each with its reason ----------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "this is not json",
        "\xff\xfe",
        "[]",
        json.dumps({"result": [{"id": "id-1", "output": "alice"}]}),
        json.dumps({"DATA_TYPE": "identity_mapping_input#1.0.0", "result": []}),
        json.dumps({"DATA_TYPE": OUT}),
        json.dumps({"DATA_TYPE": OUT, "result": {"id-1": "alice"}}),
        json.dumps({"DATA_TYPE": OUT, "result": [{"id": "id-1", "output": 5}]}),
        json.dumps({"DATA_TYPE": OUT, "result": [{"id": "id-1"}]}),
        json.dumps({"DATA_TYPE": OUT, "result": [{"output": "alice"}]}),
    ],
)
def test_garbage_answer_is_refused(tmp_path: Path, answer: str) -> None:
    error = mapping_error([external(PY, answer_script(tmp_path, answer))])
    assert error.reason == "identity.mapper_output_invalid"
    assert error.context["mapper"] == 0


def test_answer_naming_an_identity_not_in_the_input_is_refused(tmp_path: Path) -> None:
    answer = {
        "DATA_TYPE": OUT,
        "result": [{"id": "id-1", "output": "alice"}, {"id": "someone-else", "output": "root"}],
    }
    error = mapping_error([external(PY, answer_script(tmp_path, answer))])
    assert error.reason == "identity.mapper_output_invalid"
    assert "someone-else" in error.detail


def test_answer_giving_one_identity_two_names_is_refused(tmp_path: Path) -> None:
    answer = {
        "DATA_TYPE": OUT,
        "result": [{"id": "id-1", "output": "alice"}, {"id": "id-1", "output": "mallory"}],
    }
    error = mapping_error([external(PY, answer_script(tmp_path, answer))])
    assert error.reason == "identity.mapper_output_invalid"


def test_non_zero_exit_fails(tmp_path: Path) -> None:
    body = (
        "import sys\nsys.stdin.read()\n"
        f'print(\'{{"DATA_TYPE": "{OUT}", "result": []}}\')\n'
        "print('ldap unreachable', file=sys.stderr)\nsys.exit(3)\n"
    )
    error = mapping_error([external(PY, script(tmp_path, body))])
    assert error.reason == "identity.mapper_failed"
    assert "status 3" in error.detail
    assert "ldap unreachable" in error.detail


def test_killed_by_a_signal_fails(tmp_path: Path) -> None:
    body = "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n"
    error = mapping_error([external(PY, script(tmp_path, body))])
    assert error.reason == "identity.mapper_failed"
    assert "status -15" in error.detail


def test_missing_program_fails(tmp_path: Path) -> None:
    error = mapping_error([external(str(tmp_path / "absent"))])
    assert error.reason == "identity.mapper_failed"
    error = mapping_error([external("mep-no-such-program-anywhere")])
    assert error.reason == "identity.mapper_failed"


def test_hanging_program_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    body = (
        "import os, subprocess, sys\n"
        "child = subprocess.Popen(['/bin/sleep', '86400'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "sys.stdout.flush()\n"
        "import time\n"
        "time.sleep(86400)\n"
    )
    try:
        # Returning at all shows the runner did not wait for the day-long sleeps.
        error = returns_within(
            lambda: mapping_error([external(PY, script(tmp_path, body))], timeout=1.0)
        )
        assert error.reason == "identity.mapper_timeout"
        leader, child = (int(p) for p in pids.read_text().split())
        assert wait_until_gone([leader, child]), "a mapper process survived its timeout"
    finally:
        if pids.exists():
            kill_all([int(p) for p in pids.read_text().split()])


def test_program_that_exits_leaves_no_helper_behind(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    body = (
        "import subprocess, sys\n"
        "sys.stdin.read()\n"
        "child = subprocess.Popen(['/bin/sleep', '300'], stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL)\n"
        f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
        f'print(\'{{"DATA_TYPE": "{OUT}", "result": [{{"id": "id-1", "output": "a"}}]}}\')\n'
    )
    assert map_with([external(PY, script(tmp_path, body))]).username == "a"
    assert wait_until_gone([int(pids.read_text())]), "a helper of the mapper survived"


def test_helper_holding_stdout_open_does_not_hang_the_mapping(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    body = (
        "import subprocess, sys\n"
        "sys.stdin.read()\n"
        "helper = subprocess.Popen(['/bin/sleep', '86400'])\n"  # inherits stdout
        f"open({str(pids)!r}, 'w').write(str(helper.pid))\n"
        f'print(\'{{"DATA_TYPE": "{OUT}", "result": []}}\', flush=True)\n'
    )
    try:
        # With a day-long timeout and helper, returning at all shows the runner stopped
        # reading when the program exited, not when its stdout closed or time ran out.
        mapping = returns_within(
            lambda: map_with([external(PY, script(tmp_path, body))], timeout=86_400.0)
        )
        assert mapping.username is None
    finally:
        if pids.exists():
            kill_all([int(pids.read_text())])


def test_megabytes_of_output_are_capped(tmp_path: Path) -> None:
    body = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    error = mapping_error([external(PY, script(tmp_path, body))], max_output=100_000)
    assert error.reason == "identity.mapper_output_too_large"


def test_default_cap_refuses_megabytes(tmp_path: Path) -> None:
    body = "import sys\nsys.stdout.write('y' * (3 * 1024 * 1024))\n"
    error = mapping_error([external("/bin/sh", "-c", f"exec {PY} {script(tmp_path, body)}")])
    assert error.reason == "identity.mapper_output_too_large"


def test_stderr_is_bounded(tmp_path: Path) -> None:
    body = (
        "import sys\nsys.stdin.read()\nsys.stderr.write('e' * 1_000_000)\n"
        f'print(\'{{"DATA_TYPE": "{OUT}", "result": []}}\')\n'
    )
    runner = SubprocessCommandRunner()
    outcome = runner.run([PY, script(tmp_path, body)], b"", timeout=10, max_output=1000)
    assert outcome.returncode == 0
    assert len(outcome.stderr) <= 4096
    assert json.loads(outcome.stdout) == {"DATA_TYPE": OUT, "result": []}


# -- selection around external programs (a fake runner: no processes) --------------


@attrs.define
class RecordingRunner:
    """Answers every run with ``output`` and records the commands it was asked to run."""

    output: CommandOutput
    calls: list[tuple[str, ...]] = attrs.field(factory=list)

    def run(
        self, argv: Sequence[str], stdin: bytes, *, timeout: float, max_output: int
    ) -> CommandOutput:
        self.calls.append(tuple(argv))
        return self.output


@attrs.define
class RaisingRunner:
    reason: str

    def run(
        self, argv: Sequence[str], stdin: bytes, *, timeout: float, max_output: int
    ) -> CommandOutput:
        raise IdentityError(self.reason, "from the fake runner")


EXPRESSION = {
    "DATA_TYPE": EXPR,
    "mappings": [{"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}],
}


def test_fakes_satisfy_the_runner_protocol() -> None:
    assert isinstance(RecordingRunner(CommandOutput(0, b"")), CommandRunner)
    assert isinstance(SubprocessCommandRunner(), CommandRunner)


def test_program_after_a_mapper_with_a_result_is_not_run() -> None:
    runner = RecordingRunner(CommandOutput(1, b""))
    result = map_with([EXPRESSION, external("/bin/false")], runner=runner)
    assert result.username == "alice"
    assert runner.calls == []


@pytest.mark.parametrize(
    "reason",
    [
        "identity.mapper_failed",
        "identity.mapper_timeout",
        "identity.mapper_output_too_large",
    ],
)
def test_failing_program_fails_closed_even_when_a_later_mapper_would_match(reason: str) -> None:
    error = mapping_error([external("/opt/mapper"), EXPRESSION], runner=RaisingRunner(reason))
    assert error.reason == reason
    assert error.context["mapper"] == 0


def test_runner_gets_the_configured_limits() -> None:
    seen: dict[str, Any] = {}

    class Spy:
        def run(
            self, argv: Sequence[str], stdin: bytes, *, timeout: float, max_output: int
        ) -> CommandOutput:
            seen.update(argv=list(argv), timeout=timeout, max_output=max_output)
            return CommandOutput(0, json.dumps({"DATA_TYPE": OUT, "result": []}).encode())

    map_with([external("/opt/mapper", "-v")], runner=Spy(), timeout=2.5, max_output=123)
    assert seen == {"argv": ["/opt/mapper", "-v"], "timeout": 2.5, "max_output": 123}
