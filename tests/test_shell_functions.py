"""``ShellFunction`` and ``MPIFunction``: real commands, here and through a real daemon.

The first part calls the functions in this process (real ``/bin/bash`` children): the
template, its quoting, the captured output and its bound, the return code, ``check``
and the walltime. The second part, as root, submits them with the ``Executor`` to a real
``mepd serve`` whose user endpoint (threads) runs as a real account created for the run.
MPI runs end to end in tests/test_mpi.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.client import MPIFunction, RemoteException, ShellFunction, ShellResult
from mepcore.client.serialize import pack_function, pack_value, unpack_value
from mepcore.tasks import unpack_value as endpoint_unpack


def test_stdout_stderr_and_return_code_are_captured() -> None:
    result = ShellFunction("echo out; echo err >&2; exit 3")()
    assert (result.stdout, result.stderr, result.returncode) == ("out\n", "err\n", 3)
    assert not result.ok and not result.timed_out


def test_fields_are_filled_from_arguments_and_shell_quoted() -> None:
    fn = ShellFunction("printf '%s|' {first} {second}")
    hostile = "a b; echo INJECTED $(id) `id` 'q\"\n"
    result = fn(first=hostile, second="*")
    assert result.stdout == f"{hostile}|*|"
    assert fn("x", second="y").stdout == "x|y|"  # positional fill in order
    assert fn.command("x", "y") == "printf '%s|' x y"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda fn: fn(first="x"), "missing arguments ['second']"),
        (lambda fn: fn(first="x", second="y", third="z"), "unexpected arguments ['third']"),
        (lambda fn: fn("x", first="y"), "first given twice"),
        (lambda fn: fn("a", "b", "c"), "3 arguments"),
    ],
)
def test_wrong_arguments_are_a_type_error(call: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(ShellFunction("echo {first} {second}"))


@pytest.mark.parametrize("template", ["echo {0}", "echo {x.y}", "echo {x!r}", "echo {x:>4}", " "])
def test_templates_take_plain_named_fields_only(template: str) -> None:
    with pytest.raises(ValueError):
        ShellFunction(template)


def test_a_failing_command_is_reported_and_raised_only_when_asked() -> None:
    assert ShellFunction("exit 7")().returncode == 7
    with pytest.raises(subprocess.CalledProcessError) as caught:
        ShellFunction("echo partial; exit 7", check=True)()
    assert (caught.value.returncode, caught.value.output) == (7, "partial\n")


def test_output_is_bounded_and_the_tail_kept() -> None:
    result = ShellFunction("seq 1 100000; seq 1 5 >&2", max_output_bytes=20)()
    assert result.stdout_truncated and not result.stderr_truncated
    assert len(result.stdout.encode()) == 20 and result.stdout.endswith("99999\n100000\n")
    assert result.stderr == "1\n2\n3\n4\n5\n"


def test_walltime_kills_the_whole_group_and_reports_124(tmp_path: Path) -> None:
    marker = tmp_path / "child"
    # A child in the background keeps the group alive; it must die with the command.
    # The walltime leaves a loaded machine time to start bash and print (0.5 s did not).
    fn = ShellFunction(f"(sleep 60; touch {marker}) & echo started; wait", walltime=3)
    result = fn()
    assert (result.returncode, result.timed_out, result.stdout) == (124, True, "started\n")
    assert not _running(f"touch {marker}"), "the command's background child outlived it"


def test_background_jobs_do_not_outlive_a_finished_command(tmp_path: Path) -> None:
    marker = tmp_path / "late"
    result = ShellFunction(f"(sleep 60; touch {marker}) & echo left")()
    assert (result.returncode, result.stdout) == (0, "left\n")
    _gone(f"touch {marker}")


def test_killing_the_tasks_process_stops_the_command(tmp_path: Path) -> None:
    """A worker killed by a cancel or by the end of its endpoint (SIGKILL: no cleanup
    of its own) takes the command's whole group with it."""
    marker = tmp_path / "orphan"
    script = (
        "from mepcore.client import ShellFunction\n"
        f"ShellFunction('(sleep 60; touch {marker}) & sleep 60 & echo up; wait')()\n"
    )
    task = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert task.stdout is not None
    _poll(lambda: _running(f"touch {marker}"), "the command did not start")
    task.kill()
    task.wait()
    _gone(f"touch {marker}")


def _running(pattern: str) -> bool:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return found.stdout.strip() != ""


def _poll(check: Any, failure: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, failure
        time.sleep(0.05)  # the interval of a deadline poll


def _gone(pattern: str) -> None:
    _poll(lambda: not _running(pattern), f"{pattern!r} is still running")


def test_mpi_function_puts_the_launcher_prefix_first() -> None:
    fn = MPIFunction("./solver --input {path}")
    assert fn.command(path="a b") == "$PARSL_MPI_PREFIX ./solver --input 'a b'"


def test_mpi_function_without_an_mpi_engine_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARSL_MPI_PREFIX", raising=False)
    with pytest.raises(RuntimeError, match="GlobusMPIEngine"):
        MPIFunction("true")()


def test_mpi_function_runs_its_command_under_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    # What Parsl's MPI worker sets for a task; `env` stands in for the launcher here.
    monkeypatch.setenv("PARSL_MPI_PREFIX", "env MEP_RANKS=4")
    result = MPIFunction("printenv MEP_RANKS")()
    assert result.stdout == "4\n"


def test_functions_travel_as_the_client_sends_them() -> None:
    fn = ShellFunction("echo {word}", walltime=5, check=True, name="echo_word")
    _, payload = pack_function(fn)
    copy = endpoint_unpack(payload)
    assert (copy.cmd, copy.walltime, copy.check, copy.__name__) == (
        "echo {word}",
        5,
        True,
        "echo_word",
    )
    result = copy(word="hi")
    assert unpack_value(pack_value(result)) == ShellResult("echo hi", 0, "hi\n", "")


# -- through a real daemon ----------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root: user endpoints run as real accounts")
    from tests.accounts import create_account, delete_account
    from tests.test_client_daemon import Site, write_site

    accounts = {"alice@example.org": create_account()}
    top = tmp_path_factory.mktemp("shell")
    running = Site(write_site(top, accounts), top / "state", accounts)
    try:
        running.start()
        yield running
    finally:
        if running.daemon is not None:
            running.daemon.stop()
        delete_account(accounts["alice@example.org"].pw_name)


@pytest.mark.root
@pytest.mark.slow
def test_a_shell_command_runs_as_the_mapped_account_and_its_output_comes_back(site: Any) -> None:
    name = site.accounts["alice@example.org"].pw_name
    fn = ShellFunction("whoami; echo {note} >&2; exit {code}")
    with site.executor() as ex:
        result = ex.submit(fn, note="to stderr", code=0).result(60)
        failed = ex.submit(fn, note="failing", code=5).result(60)
    assert (result.stdout, result.stderr, result.returncode) == (f"{name}\n", "to stderr\n", 0)
    assert (failed.stdout, failed.stderr, failed.returncode) == (f"{name}\n", "failing\n", 5)


@pytest.mark.root
@pytest.mark.slow
def test_map_runs_a_shell_function_over_its_arguments(site: Any) -> None:
    with site.executor() as ex:
        results = list(ex.map(ShellFunction("expr {a} + {b}"), range(5), range(5), timeout=60))
    assert [r.stdout for r in results] == [f"{2 * i}\n" for i in range(5)]


@pytest.mark.root
@pytest.mark.slow
def test_check_raises_the_failure_as_a_remote_exception(site: Any) -> None:
    with site.executor() as ex:
        error = ex.submit(ShellFunction("echo no >&2; exit 2", check=True)).exception(60)
    assert isinstance(error, RemoteException)
    assert error.type_name == "subprocess.CalledProcessError"
    assert "exit status 2" in error.message


@pytest.mark.root
@pytest.mark.slow
def test_walltime_of_a_shell_function_on_the_endpoint(site: Any) -> None:
    with site.executor() as ex:
        result = ex.submit(ShellFunction("sleep 30", walltime=1)).result(60)
    assert (result.returncode, result.timed_out) == (124, True)


@pytest.mark.root
@pytest.mark.slow
def test_a_resource_specification_on_a_non_mpi_endpoint_is_refused(site: Any) -> None:
    with site.executor(resource_specification={"num_ranks": 2}) as ex:
        error = ex.submit(ShellFunction("true")).exception(60)
    assert getattr(error, "reason", None) == "task.resources_invalid", error
