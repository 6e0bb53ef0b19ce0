"""Shared helpers of the bench scripts: statistics, formatting, tables, /proc readings,
a real ``mepd serve`` deployment for a bench, and the peers (Parsl HTEX, Dask).

- ``Stats.of(samples)``: count, min, p50, p95, p99, max and mean of durations (seconds);
- ``fmt_seconds``/``fmt_rate``/``fmt_bytes``/``fmt_ratio``: human units for a table cell;
- ``markdown_table`` / ``print_table``: the tables every script of ours prints (markdown, so
  ``bench/report.py`` can put them into ``docs/performance.md`` verbatim);
- ``rss_bytes``/``open_fds``/``descendants``: readings from ``/proc``;
- ``bench_deployment``: a ``mepd serve`` on 127.0.0.1 in a temporary directory with
  accounts made for the run when root (``tests/accounts.py``), built on
  ``tests/daemon_harness.py`` (imported, not copied);
- ``parsl_htex`` / ``dask_client``: the peers a site would pick instead, started on
  loopback with two workers and stopped on exit.

Deliberately not here: any measurement policy (each script decides what it times) and
any assertion about a figure (targets are judged in ``bench/report.py`` only).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pwd
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # The daemon harness and account helpers live in tests/; benches import them.
    sys.path.insert(0, str(REPO))

from tests.trusted_dir import use_private_tmp  # noqa: E402 - needs REPO on sys.path

# The scripts write deployments into temporary directories, which mepd refuses under a
# shared sticky directory such as /tmp (security rule 8); run directly or by `make
# bench`, they use the tests' private one instead.
use_private_tmp()

# bench/report.py stops an overrunning script with SIGINT first so its clean-up (daemon
# stop, userdel) runs; a shell may have started us with SIGINT ignored (background jobs
# are), which Python would then keep ignoring.
signal.signal(signal.SIGINT, signal.default_int_handler)

WORKERS = 2  # the peers and our user endpoints get the same number of workers
ENDPOINT = "hpc"


# -- statistics ------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted samples, linearly interpolated."""
    if not ordered:
        raise ValueError("no samples")
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements (durations in seconds, or any unit)."""

    count: int
    min: float
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        ordered = sorted(samples)
        return cls(
            count=len(ordered),
            min=float(ordered[0]),
            p50=percentile(ordered, 50),
            p95=percentile(ordered, 95),
            p99=percentile(ordered, 99),
            max=float(ordered[-1]),
            mean=sum(ordered) / len(ordered),
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "min": self.min,
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
            "max": self.max,
            "mean": self.mean,
        }


def time_calls(fn: Callable[[], Any], count: int) -> list[float]:
    """Durations (seconds) of ``count`` calls of ``fn``."""
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return samples


# -- formatting ------------------------------------------------------------------------


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(per_second: float | None, unit: str = "/s") -> str:
    return "-" if per_second is None else f"{per_second:,.0f}{unit}"


def fmt_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def fmt_ratio(ours: float | None, theirs: float | None, *, higher_is_better: bool) -> str:
    """How many times better ours is than theirs (``2.5x``); ``-`` without both."""
    if not ours or not theirs:
        return "-"
    ratio = ours / theirs if higher_is_better else theirs / ours
    return f"{ratio:.2f}x"


def fmt_stats(stats: Stats) -> tuple[str, str, str, str]:
    """min, p50, p95, max cells of a duration summary."""
    return (
        fmt_seconds(stats.min),
        fmt_seconds(stats.p50),
        fmt_seconds(stats.p95),
        fmt_seconds(stats.max),
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator, *(line(r) for r in cells[1:])])


def print_table(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    notes: Sequence[str] = (),
) -> None:
    """Print a titled markdown table and its notes (what was measured, how)."""
    print(f"**{title}**\n")
    print(markdown_table(header, rows))
    if notes:
        print()
        for note in notes:
            print(f"- {note}")
    print(flush=True)


def write_json(path: str | None, data: Any) -> None:
    """Machine-readable results for ``bench/report.py`` (``--json PATH``)."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- /proc -----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ")".
        fields = raw[raw.rfind(b")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, …)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return 0.0
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (shared pages are counted per process)."""
    return rss_bytes(pid) + sum(rss_bytes(p) for p in descendants(pid))


def processes_of_users(uids: set[int]) -> list[int]:
    """Live pids whose real uid is one of ``uids``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid in uids:
                found.append(int(entry))
        except OSError:
            continue
    return found


def poll_until(predicate: Callable[[], bool], deadline: float, interval: float = 0.05) -> bool:
    """Call ``predicate`` until it is true or ``deadline`` seconds pass."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)  # polling interval of a deadline loop
    return predicate()


# -- a deployment of mepd for a bench --------------------------------------------------


def is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class BenchDeployment:
    """A running ``mepd serve`` and the identities (one per account) that map to it."""

    daemon: Any  # tests.daemon_harness.RunningDaemon
    identities: list[str]
    accounts: list[str]
    uids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return str(self.daemon.url)

    @property
    def pid(self) -> int:
        return int(self.daemon.process.pid)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log (for a bench that failed)."""
        try:
            return "\n".join(str(self.daemon.stderr()).splitlines()[-lines:])
        except OSError:
            return ""

    def token(self, identity: str) -> str:
        return str(self.daemon.token(identity))

    def tokens(self, identities: Sequence[str]) -> list[str]:
        """Tokens for many identities with one key load (``mepd token issue`` costs ~0.3 s)."""
        from mepd.auth import issue_local_token, load_or_create_local_key
        from mepd.settings import IssuerSettings

        key = load_or_create_local_key(self.daemon.state_dir)
        issuer = IssuerSettings(type="local")
        return [issue_local_token(key, issuer, ident) for ident in identities]


def _runtime() -> tuple[str, tuple[str, ...]]:
    """The interpreter the user endpoints run: a world-readable venv when root."""
    if not is_root():
        return sys.executable, ()
    from tests.runtime_venv import package_paths, runtime_python

    python = runtime_python()
    return python, tuple(p for p in package_paths(python) if os.path.isdir(p))


@contextlib.contextmanager
def bench_deployment(
    accounts: int = 1,
    *,
    limits: dict[str, Any] | None = None,
    prefix: str = "mep-bench-",
) -> Iterator[BenchDeployment]:
    """Start ``mepd serve`` on 127.0.0.1 with ``accounts`` accounts mapped to it.

    As root the accounts are made with ``useradd`` for the run and removed after (with
    anything left running as them). As another user the one account available is the
    current user, which the daemon refuses to map on purpose (it never runs work as its
    own uid): the first request then fails with ``identity.account_refused`` and the
    caller reports the figure as not measured.
    """
    from tests.accounts import create_account, delete_account
    from tests.daemon_harness import running_daemon, write_deployment
    from tests.trusted_dir import trusted_directory

    made: list[pwd.struct_passwd] = []
    # Not under /tmp: mepd refuses files below a shared sticky directory (rule 8).
    with trusted_directory(prefix) as top:
        try:
            python, paths = _runtime()
            if is_root():
                for _ in range(accounts):
                    made.append(create_account())
                names = [entry.pw_name for entry in made]
                identities = [f"{name}@example.org" for name in names]
            else:
                names = [pwd.getpwuid(os.getuid()).pw_name] * accounts
                identities = [f"mept{i:08x}@example.org" for i in range(accounts)]
            all_limits = {
                "endpoints_per_user": max(4, accounts),
                "endpoints_total": max(64, accounts + 8),
                "concurrent_starts": 16,
                "max_body_bytes": 64 * 1024 * 1024,
                "max_tasks_per_request": 10_000,
                "queued_tasks_per_user": 1_000_000,
                **(limits or {}),
            }
            config = write_deployment(
                Path(top) / "site",
                python=python,
                package_paths=paths,
                limits=all_limits,
                # Capacity, not the per-identity rate limit (bench/ratelimit.py measures that).
                settings_extra={"log_level": "warning", "edge": {"rate": 1e9, "burst": 10**9}},
            )
            if not is_root():
                # Every bench identity maps to the one account there is: this user.
                (Path(top) / "site" / "mapping.json").write_text(
                    json.dumps(
                        [
                            {
                                "DATA_TYPE": "expression_identity_mapping#1.0.0",
                                "mep_match_syntax": "python",
                                "mappings": [
                                    {
                                        "source": "{username}",
                                        "match": "mept[0-9a-f]{8}@example\\.org",
                                        "output": names[0],
                                    }
                                ],
                            }
                        ]
                    )
                )
            with running_daemon(config, Path(top) / "site" / "state") as daemon:
                yield BenchDeployment(daemon, identities, names, {entry.pw_uid for entry in made})
        finally:
            for entry in made:
                delete_account(entry.pw_name)


def why_not_measured(exc: BaseException) -> str:
    """A "not measured" cell for a failed measurement, naming the known non-root case."""
    text = f"{type(exc).__name__}: {str(exc)[:200]}"
    if "identity.account_daemon" in text or "identity.account_refused" in text:
        return (
            "not root: the one account is the daemon's own uid, which mep refuses to run "
            "work as by design (DESIGN §3.2); run the bench as root"
        )
    return text


# -- peers ------------------------------------------------------------------------------


@contextlib.contextmanager
def parsl_htex(workers: int = WORKERS) -> Iterator[Any]:
    """Parsl's HighThroughputExecutor driven directly (no DataFlowKernel), on loopback."""
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
    from parsl.launchers import SingleNodeLauncher
    from parsl.providers import LocalProvider

    provider = LocalProvider(init_blocks=1, max_blocks=1, launcher=SingleNodeLauncher())
    # Run the worker pool and interchange with this interpreter, not a PATH lookup.
    launch = DEFAULT_LAUNCH_CMD.replace(
        "process_worker_pool.py",
        f"{sys.executable} -m parsl.executors.high_throughput.process_worker_pool",
        1,
    )
    htex = HighThroughputExecutor(
        label="mep-bench",
        provider=provider,
        address="127.0.0.1",
        loopback_address="127.0.0.1",
        max_workers_per_node=workers,
        launch_cmd=launch,
        interchange_launch_cmd=[
            sys.executable,
            "-m",
            "parsl.executors.high_throughput.interchange",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="mep-bench-parsl-") as run_dir:
        htex.run_dir = run_dir
        htex.run_id = "mep-bench"
        provider.script_dir = run_dir
        htex.start()
        try:
            htex.scale_out_facade(1)
            yield htex
        finally:
            with contextlib.suppress(Exception):
                provider.cancel(list(htex.blocks_to_job_id.values()))
            htex.shutdown()


@contextlib.contextmanager
def dask_client(workers: int = WORKERS) -> Iterator[Any]:
    """A Dask ``LocalCluster`` of worker processes on loopback and its client."""
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def peer_available(module: str) -> str | None:
    """None when ``module`` imports, else why not (for a "not measured" cell)."""
    try:
        __import__(module)
    except ImportError as exc:
        return f"not installed ({exc.name}; `make bench` installs the bench extras)"
    return None
