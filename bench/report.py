"""Run every bench script and write ``docs/performance.md``.

Each ``bench/*.py`` except this file and ``common.py`` runs in its own process and
session, with a time limit (the whole run stays within the 15 minutes of ``make bench``),
its standard output captured as its table. A script that supports ``--json PATH`` also
hands over its figures as JSON. The report holds: the machine (CPUs, memory, CPU model,
kernel), Python and library versions, the date and commit, every script's output
verbatim, and a *Targets* section that compares each figure of the issue's targets with
what was measured (met / missed / not measured, and for a missed one what limits it).

After each script and at the end it scans ``/proc`` for anything a bench left running
(a descendant of this process — it is the subreaper of its tree, so orphans count — or a
process carrying this run's environment marker), kills it and prints a warning line
per process. It never touches other processes of the machine.

Deliberately not here: measurements of its own (the scripts measure) and any change to
the figures (the tables are copied as printed).

    python bench/report.py [--smoke] [--output docs/performance.md] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import pwd
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
NOT_SCRIPTS = {"report.py", "common.py"}
# The order of the report: cheap component benches first, the whole system last.
ORDER = [
    "identity.py",
    "authz.py",
    "limits.py",
    "executor.py",
    "uep_start.py",
    "api.py",
    "ratelimit.py",
    "client.py",
    "payload.py",
    "slurm.py",
    "scale.py",
    "restart.py",
]
# Seconds each script may take in a full run (their sum stays under 15 minutes).
TIMEOUTS = {
    "identity.py": 60,
    "authz.py": 120,
    "limits.py": 45,
    "executor.py": 150,
    "uep_start.py": 90,
    "api.py": 120,
    # two daemons, a victim identity alone and under another identity's flood
    "ratelimit.py": 120,
    "client.py": 120,
    "payload.py": 150,
    # mep and Parsl HTEX on a real (single-node) Slurm; starts one with .ci/slurm-up
    "slurm.py": 150,
    "scale.py": 180,
    # two daemons killed with SIGKILL and restarted (adoption off, then on)
    "restart.py": 180,
}
DEFAULT_TIMEOUT = 90
SMOKE_TIMEOUT = 180
MARKER = "MEP_BENCH_RUN"
PR_SET_CHILD_SUBREAPER = 36
LIBRARIES = [
    "mep",
    "pycasbin",
    "parsl",
    "dask",
    "distributed",
    "uvicorn",
    "starlette",
    "httpx",
    "dill",
    "attrs",
    "PyJWT",
    "jinja2",
]

# What limits a figure that misses its target, from py-spy profiles of the daemon and a
# user endpoint taken on this machine (2 cores) during the benches. Shown only when missed.
_HTTP_PATH = (
    "a round trip is one HTTP request (`?wait`) and four process hops (client → mepd → "
    "user endpoint → worker and back) on two cores shared with the client. Its floor on "
    "this machine, with no work in mepd at all: a bare Starlette GET under uvicorn from "
    "the same client (bench/api.py, `bare Starlette GET (floor)` row) plus the user "
    "endpoint hop (bench/executor.py, the `via uep` rows), about 2 ms together. mepd's "
    "own CPU per request is printed by bench/api.py (`mepd CPU per ?wait`). py-spy of "
    "mepd's event loop during `?wait` round trips (after issue 22's second round): the "
    "Starlette/uvicorn layers and socket writes ~25%, re-verifying the account on every "
    "request (DESIGN.md §3 rule 9: `mepcore/ports.py` passwd, group list and shadow "
    "lookups, ~8-10%; one `getgrouplist` through this machine's nsswitch costs ~0.4 ms), "
    "the two SQLite commits of a task (accepted, then its result; `StoreWriter._commit_"
    "locked`, `_finish_rows`) ~7%, JSON ~5%, the audit writes made before the answers "
    "they guard ~3%, JWT verification ~2%. Taken out in this round: audit writes per "
    "round trip 7 → 4 with lines built without the encoder, one JWT parse instead of "
    "two, cached metric children, one ASGI layer instead of two, registered function ids "
    "remembered (the store never deletes one), the spec and config key built once per "
    "inputs, task ids from one random read per batch: mepd's CPU per `?wait` went from "
    "3.6-4.0 to 2.9-3.2 ms (daemons of both versions alternated at the same load). "
    "Nothing left is bigger than the account re-verification, which rule 9 requires."
)
_RTT_HTEX = (
    "Parsl HTEX driven directly is a submit in the caller's process over ZeroMQ to its "
    "interchange and a worker: no HTTP, no authentication, mapping or policy, nothing "
    "durable. mep's Executor sends a lone call as one `?wait` request, whose path is the "
    "HTTP round trip's (below) plus the Executor's two thread hand-offs; the floor of "
    "that path on this machine (a bare HTTP request plus the user endpoint hop) is "
    "already about the peer's whole round trip. " + _HTTP_PATH
)
_BATCH_PATH = (
    "bound by mepd's one event-loop thread. py-spy during 5,000-task "
    "batches: JSON encoding 11% (`json/encoder.py:iterencode`, from the audit lines "
    "`mepd/audit.py:AuditLog._line` 6.5% and the wait responses), `mepd/pipeline.py:"
    "Pipeline.wait` 6.7% self + `task_view`, `mepd/store.py:TaskStore.add_tasks` 6.4%, "
    "`TaskStore.finish` 6.3%, `TaskStore.get_many` 7.4%, SQLite commits (`_Transaction."
    "__exit__`) 5.2%, result header checks (`mepd/registry.py:_checked_result` → "
    "`mepcore/tasks/envelopes.py:ResultEnvelope.from_header`) 6.8%, JSON decoding of "
    "requests and frames ~5%."
)
_PAYLOAD_PATH = (
    "payloads travel as mep frames (no base64, no JSON of megabytes); a payload or "
    "result of 64 KiB or more is a file beside the store (`mepd/blobs.py`), written by "
    "the writer thread before the commit that names it, so SQLite no longer rewrites "
    "megabyte rows at each state change (that was ~3-10 ms per commit); the channel "
    "gathers a large frame's reads and joins them once, and writes a frame's parts with "
    "one `sendmsg` (`mepd/channel.py`: a 1 MiB frame decoded in ~0.15 ms instead of ~4). "
    "py-spy of mepd during 1 MiB echoes now: socket reads and writes of the megabytes "
    "(asyncio transports) ~18%, joining the result frame for the answer "
    "(`mepd/frames.py:encode`) ~6%, the payload and result files (`BlobFiles._write_"
    "file`) ~5%, decoding the request's frames ~3%; in the client, pickling and "
    "unpickling the megabytes (`pickle._Framer.write_large_bytes`, dill) and httpx's "
    "reads. On this VM much of a megabyte copy's cost was page faults on fresh buffers "
    "(glibc maps and unmaps nearly every 1 MiB buffer): mepd and the user endpoints now "
    "pin glibc's mmap and trim thresholds at 16 and 32 MiB (`mepd/malloc.py`; forked "
    "pool workers inherit it), which took a pool worker from 374 page faults and ~2.7 ms "
    "of CPU per 1 MiB echo to none and ~1.3-1.5 ms, and its user endpoint from ~2.3-3.2 "
    "to ~1.8-2.1 ms (CPU per round trip read from /proc, 300 echoes); the process pool "
    "also writes a batch and a result with `writev` straight from the pickled bytes "
    "instead of joining them first. Per 1 MiB echo the CPU is now roughly mepd 7-8 ms, "
    "the client 4.3-5 ms, the user endpoint 2 ms and the worker 1.3-1.5 ms, on two "
    "cores and mostly one after another. The client is the caller's own process, so mep "
    "leaves its malloc alone: `MALLOC_MMAP_THRESHOLD_=16777216 "
    "MALLOC_TRIM_THRESHOLD_=33554432` in its environment took its ~300 faults and "
    "~0.5-1 ms of CPU per 1 MiB echo away (docs/client.md)."
)
_BESIDE = (
    "two cores: the streamer's four processes (its client, mepd, its user endpoint and "
    "worker) keep about one core busy, and the small caller shares mepd's event loop and "
    "the other core with them; the peers' small round trips, measured beside their own "
    "1 MiB streamers in the same run, grow by several milliseconds too (the target line "
    "above shows them). This round took the streamer's megabytes out of SQLite (a small "
    "caller's commit no longer queues behind a megabyte commit in the writer thread) and "
    "out of the channel decoder's copies, which brought mep's growth from +7.8 ms to "
    "about +5 ms. What remains is CPU: the megabytes' socket copies in mepd's event loop "
    "(~18% of its samples while streaming), which no event-loop design can hand to the "
    "small caller's core. " + _PAYLOAD_PATH
)
_CLIENT_PATH = (
    "the Executor's batching and long-poll threads share the two cores with mepd, which is "
    + _BATCH_PATH
)
_UEP_START = (
    "A user endpoint's start is mostly imports (`python -X importtime` with the runtime "
    "interpreter, medians of 9 runs; the modules a real start leaves in `sys.modules`, "
    "tests/test_uep_imports.py). Issue 22 took out what a start does not need: asyncio and "
    "ssl (~20 ms, ~6 MiB), which came with `mepd.channel` for the daemon's `AsyncChannel` "
    "(now `mepd/channel_async.py`); jsonschema with referencing and its bundled "
    "meta-schemas (~40-58 ms, ~4 MiB), used only to validate the rendered configuration: "
    "`mepcore/config/quickcheck.py:certainly_valid` vouches for a configuration that is "
    "valid for certain and jsonschema is imported only to report a violation (same "
    "violations and reason codes); dill (~15 ms), now imported by the first dump or load "
    "(the thread engine's first task, or each pool worker's); structlog (and asyncio with "
    "it), imported by the process pool only when it logs. Idle RSS went from 33.1 to "
    "25.4 MiB and a start's import CPU down by about a third. Then `mepcore.config` and "
    "`mepcore.tasks` import each name on first use, so a start loads neither the site "
    "files' module (`mepcore.config.site`) nor MPI resources, re-adoption "
    "(`mepd.uep.orphan`) and setup scripts (`subprocess`) come only with a start that asks "
    "for them, and the garbage collector is off until the configuration is rendered "
    "(`mepd/uep/__main__.py`; its collections were ~8 ms of a start, timed with "
    "`gc.callbacks`): idle RSS 24.8 MiB against 25.4; cold start p50 166 ms against 181 "
    "and the CPU a user endpoint uses until ready (bench/uep_start.py) 160 ms against 171 "
    "(medians of three alternating runs of 20 starts with the commit before, load average "
    "0.3-1.2: about the spread between runs); 100 accounts ready in 10.7 s against 11.3 s "
    "(one run each, bench/scale.py). What remains, per start on a quiet "
    "machine: the interpreter ~12 ms, attrs ~20 ms (with typing and inspect) and ~0.5 ms "
    "for each of the ~23 attrs classes a start defines, jinja2 ~25-35 ms (its "
    "bytecode-cache module brings tempfile and hashlib), yaml ~12-15 ms (`yaml.reader` "
    "compiles a large Unicode class at import), the channel, server and log ~15 ms, "
    "`mepcore.tasks` ~7 ms, rendering and validating ~4 ms, the executor ~6 ms; ahead of "
    "it the daemon's `Popen` (fork and exec as the account) ~8 ms. jinja2 and yaml leave "
    "the user endpoint only with the rendering: into mepd, as root, which DESIGN.md §3 "
    "rule 5 forbids (templates render in the user endpoint, after the drop), or into a "
    "renderer shared by accounts, which would mix them; a cache of the compiled template "
    "would still import jinja2 and save ~2 ms. What mepd can do instead is keep what a "
    "user endpoint rendered (`mepd/rendercache.py`) and hand it back to the next start of "
    "the same account from the very same inputs, which then imports neither jinja2 nor "
    "yaml and renders nothing: about a third less CPU (the `start again` rows of "
    "bench/uep_start.py); a first start, which the target measures, still renders. "
    "Measured and not taken: rendering in a "
    "child forked early, in parallel with the rest of the start (slower: the "
    "copy-on-write faults of both processes cost more than the overlap saves); three "
    "starts at a time for 100 simultaneous accounts (the first ready in 0.5 s instead of "
    "7-9 s, all of them no sooner: the two cores are the bound); `-S`. The lever left is "
    "a pre-imported launcher (a fork server), which would change the spawn model."
)
LIMITS: dict[str, str] = {
    "rtt": _HTTP_PATH,
    "throughput": _BATCH_PATH,
    "vs_htex": _BATCH_PATH,
    "vs_dask": _BATCH_PATH,
    "client_HTEX": _CLIENT_PATH,
    "client_client.map": _CLIENT_PATH,
    "uep_start": _UEP_START,
    "rtt_htex": _RTT_HTEX,
    "payload": _PAYLOAD_PATH,
    "beside": _BESIDE,
    "ready": (
        "CPU: 100 user endpoints are 100 interpreter starts with their imports (see the "
        "CPU line of bench/scale.py), and two cores give at most 2 CPU-seconds a second. "
        + _UEP_START
    ),
}


@dataclass
class ScriptRun:
    name: str
    argv: list[str]
    returncode: int | None = None
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    figures: Any = None
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def status(self) -> str:
        if self.returncode is None and not self.timed_out:
            return self.stderr or "not run"
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        if self.returncode == 0:
            return f"ok in {self.seconds:.1f} s"
        return f"failed (exit {self.returncode}) after {self.seconds:.1f} s"


# -- running the scripts ---------------------------------------------------------------


def discover(only: Sequence[str] | None) -> list[Path]:
    found = [
        p for p in BENCH.glob("*.py") if p.name not in NOT_SCRIPTS and not p.name.startswith("_")
    ]
    found.sort(key=lambda p: (ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name))
    if only:
        found = [p for p in found if any(part in p.name for part in only)]
    return found


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        # A zombie has already exited: it only waits for its parent (or us) to reap it.
        if int(fields[3]) == sid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def _kill_session(sid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    for pid in _session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def run_script(path: Path, *, smoke: bool, timeout: float, marker: str) -> ScriptRun:
    argv = [sys.executable, str(path)]
    if smoke:
        argv.append("--smoke")
    text = path.read_text()
    with tempfile.TemporaryDirectory(prefix="mep-bench-report-") as top:
        json_path = Path(top) / "figures.json"
        if '"--json"' in text:
            argv += ["--json", str(json_path)]
        run = ScriptRun(path.name, argv)
        env = {**os.environ, MARKER: marker, "PYTHONUNBUFFERED": "1"}
        env.pop("MEP_TOKEN", None)
        with (
            open(Path(top) / "out", "w+b") as out,
            open(Path(top) / "err", "w+b") as err,
        ):
            began = time.monotonic()
            process = subprocess.Popen(
                argv, stdout=out, stderr=err, cwd=REPO, env=env, start_new_session=True
            )
            try:
                run.returncode = process.wait(timeout)
            except subprocess.TimeoutExpired:
                run.timed_out = True
                # Ask first, so the script's own clean-up (daemon stop, userdel) runs.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    _kill_session(process.pid)
                    process.wait(10)
                run.returncode = process.returncode
            run.seconds = time.monotonic() - began
            # Helpers such as multiprocessing's resource tracker exit when they notice
            # their parent is gone: give them a few seconds before calling them leftovers.
            grace = time.monotonic() + 5
            while time.monotonic() < grace:
                reap()
                if not _session_members(process.pid):
                    break
                time.sleep(0.1)  # polling interval of a deadline loop
            for pid in _session_members(process.pid):
                run.leftovers.append(describe(pid))
            _kill_session(process.pid)
            out.seek(0)
            err.seek(0)
            run.stdout = out.read().decode(errors="replace")
            run.stderr = err.read().decode(errors="replace")
        if json_path.exists():
            with contextlib.suppress(ValueError):
                run.figures = json.loads(json_path.read_text())
    return run


def keep(run: ScriptRun, directory: Path) -> None:
    """A script's output, status and figures as files (``--keep``): the tests check each
    script's smoke run from the one report run instead of running it again."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / Path(run.name).stem
    stem.with_suffix(".out").write_text(run.stdout)
    stem.with_suffix(".err").write_text(run.stderr)
    stem.with_suffix(".status").write_text(f"{run.ok}\n{run.status}\n")
    if run.figures is not None:
        stem.with_suffix(".json").write_text(json.dumps(run.figures))


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmd = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return f"pid {pid} (gone)"
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = str(uid)
    return f"pid {pid} ({owner}): {cmd[:160]}"


def become_subreaper() -> bool:
    """Make this process the reaper of every orphan below it, so a user endpoint or a
    Parsl worker whose parent died is still ours to find (and not init's)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap() -> None:
    """Collect the exit status of orphans that were handed to us."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def leftover_processes(marker: str) -> list[int]:
    """Processes this run left: descendants of this process (with ``become_subreaper``
    that includes orphans) or carrying this run's marker in their environment. Nothing
    else on the machine is touched: others may run their own work there."""
    me = os.getpid()
    parents: dict[int, int] = {}
    found: set[int] = set()
    needle = f"{MARKER}={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if fields[0] == b"Z":
            continue  # already dead, waiting to be reaped
        parents[pid] = int(fields[1])
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as handle:
            if needle in handle.read().split(b"\0"):
                found.add(pid)
    for pid in parents:
        ancestor, steps = parents.get(pid), 0
        while ancestor and steps < 64:
            if ancestor == me:
                found.add(pid)
                break
            ancestor, steps = parents.get(ancestor), steps + 1
    return sorted(found)


def sweep(marker: str) -> list[str]:
    """Kill what a bench left running; one warning line per process."""
    warnings = []
    for pid in leftover_processes(marker):
        warnings.append(f"WARNING: left running by a bench, killed: {describe(pid)}")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    reap()
    return warnings


# -- the machine -----------------------------------------------------------------------


def _first(path: str, key: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as handle:
        for line in handle:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def machine() -> list[tuple[str, str]]:
    mem_kib = _first("/proc/meminfo", "MemTotal")
    memory = f"{int(mem_kib.split()[0]) / 1024 / 1024:.1f} GiB" if mem_kib else "unknown"
    usable = len(os.sched_getaffinity(0))
    return [
        ("CPUs (nproc)", f"{usable} usable of {os.cpu_count()}"),
        ("CPU model", _first("/proc/cpuinfo", "model name") or platform.processor() or "unknown"),
        ("memory", memory),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("running as", "root" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name),
    ]


def load_average() -> str:
    """1, 5 and 15 minute load averages: how busy the shared machine was."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def versions() -> list[tuple[str, str]]:
    found = [("Python", f"{platform.python_implementation()} {platform.python_version()}")]
    for name in LIBRARIES:
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            found.append((name, "not installed"))
    return found


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


# -- reading figures out of the tables -------------------------------------------------

_UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_duration(text: str) -> float | None:
    """Seconds from ``12.3 µs`` / ``1.5 ms`` / ``2 s`` (None if not a duration)."""
    match = re.search(r"([0-9][0-9,]*\.?[0-9]*)\s*(ns|µs|us|ms|s)\b", text)
    if not match:
        return None
    return float(match.group(1).replace(",", "")) * _UNITS[match.group(2)]


def parse_number(text: str) -> float | None:
    match = re.search(r"-?[0-9][0-9,]*\.?[0-9]*", text)
    return float(match.group(0).replace(",", "")) if match else None


def find_line(text: str, pattern: str) -> str | None:
    """The first output line matching the regex ``pattern`` (case-insensitive)."""
    for line in text.splitlines():
        if re.search(pattern, line, re.IGNORECASE):
            return line
    return None


def cells(line: str) -> list[str]:
    """A table row's cells: markdown pipes, or runs of two or more spaces."""
    if line.strip().startswith("|"):
        return [c.strip() for c in line.strip().strip("|").split("|")]
    return [c for c in re.split(r"\s{2,}", line.strip()) if c]


def column(text: str, header_pattern: str, row_pattern: str, column_pattern: str) -> str | None:
    """The cell of the row matching ``row_pattern`` under the header cell matching
    ``column_pattern``, in the table whose header line matches ``header_pattern``."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not re.search(header_pattern, line, re.IGNORECASE):
            continue
        head = cells(line)
        wanted = [i for i, c in enumerate(head) if re.search(column_pattern, c, re.IGNORECASE)]
        if not wanted:
            continue
        for row in lines[index + 1 :]:
            if not row.strip():
                break
            if re.search(row_pattern, row, re.IGNORECASE):
                values = cells(row)
                if wanted[0] < len(values):
                    return values[wanted[0]]
    return None


# -- targets ---------------------------------------------------------------------------


@dataclass
class Target:
    key: str
    what: str
    goal: str
    measured: str = "-"
    met: bool | None = None
    source: str = ""
    why: str = ""

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "not measured" + (f": {self.why}" if self.why else "")
        return "met" if self.met else "**missed**"


def _output(runs: dict[str, ScriptRun], name: str) -> tuple[str, str]:
    """(stdout, why not) of a script's run."""
    run = runs.get(name)
    if run is None:
        return "", f"bench/{name} not present or not run"
    if not run.stdout.strip():
        return "", f"bench/{name} {run.status} without output"
    return run.stdout, ""


def _authz(runs: dict[str, ScriptRun]) -> list[Target]:
    target = Target("authz", "authorization decision p50 at 10,000 policy lines", "<= 100 µs")
    text, target.why = _output(runs, "authz.py")
    cell = column(text, r"decide p50", r"^\s*\|?\s*10,000\b", r"^decide p50$") if text else None
    value = parse_duration(cell) if cell else None
    if value is not None:
        target.measured, target.met = f"{value * 1e6:.1f} µs", value <= 100e-6
        target.source = "bench/authz.py, Authorizer.decide, distinct requests"
    elif text:
        target.why = "no 10,000-line row in bench/authz.py output"
    return [target]


def _uep(runs: dict[str, ScriptRun]) -> list[Target]:
    start = Target("uep_start", "user endpoint cold start p50 (process pool)", "<= 100 ms")
    idle = Target("uep_rss", "idle user endpoint RSS", "<= 30 MB")
    text, why = _output(runs, "uep_start.py")
    start.why = idle.why = why
    line = find_line(text, r"start.*ready.*ProcessPool") if text else None
    if line:
        match = re.search(r"p50\s+([0-9.,]+)", line)
        if match:
            ms = float(match.group(1).replace(",", ""))
            start.measured, start.met = f"{ms:.0f} ms", ms <= 100
            start.source = "bench/uep_start.py (registry start to ready)"
            again = find_line(text, r"start again.*ready.*ProcessPool")
            found = re.search(r"p50\s+([0-9.,]+)", again) if again else None
            if found:  # not the target's figure: a start that renders nothing
                start.measured += f" (from inputs rendered before: {found.group(1)} ms)"
    line = find_line(text, r"idle RSS, user endpoint process") if text else None
    if line:
        mib = parse_number(line.split(")", 1)[-1])
        if mib is not None:
            # MB read strictly (30 MB is 28.6 MiB); report both.
            idle.measured = f"{mib:.1f} MiB ({mib * 1.048576:.1f} MB)"
            idle.met = mib * 1.048576 <= 30
            idle.source = "bench/uep_start.py (the user endpoint process, without its workers)"
    return [start, idle]


def _api(runs: dict[str, ScriptRun]) -> list[Target]:
    warm = Target("rtt", "single warm task round trip p50 through HTTP", "<= 2 ms")
    text, warm.why = _output(runs, "api.py")
    if text:
        line = find_line(text, r"warm|round.?trip|single")
        value = None
        if line:
            p50 = re.search(r"p50[^0-9]*([0-9.,]+\s*(?:µs|us|ms|s))", line)
            value = parse_duration(p50.group(1)) if p50 else None
            if value is None:
                for cell in cells(line):
                    value = parse_duration(cell)
                    if value is not None:
                        break
        if value is not None:
            warm.measured, warm.met = f"{value * 1e3:.2f} ms", value <= 2e-3
            warm.source = f"bench/api.py: `{' '.join((line or '').split())[:90]}`"
        else:
            warm.why = "no warm round-trip p50 found in bench/api.py output"
    return [warm]


def _fairness(runs: dict[str, ScriptRun]) -> list[Target]:
    """bench/ratelimit.py: another identity's p99 under a flood, with the rate limit on."""
    target = Target("fairness", "another identity's p99 while one identity floods", "<= 2x")
    text, target.why = _output(runs, "ratelimit.py")
    header = r"p99 flood / alone"
    cell = column(text, header, r"^\|\s*on\b", "^" + header + "$") if text else None
    ratio = parse_number(cell.rstrip("x")) if cell else None
    if ratio is not None:
        target.measured, target.met = f"{ratio:.2f}x", ratio <= 2.0
        target.source = "bench/ratelimit.py (p99 under the flood / p99 alone, limit on)"
    elif text:
        target.why = "no 'on' row in bench/ratelimit.py output"
    return [target]


def _rate_before_unit(line: str, unit: str) -> float | None:
    match = re.search(r"([0-9][0-9,]*\.?[0-9]*)\s*" + re.escape(unit), line)
    return float(match.group(1).replace(",", "")) if match else None


def _throughput(runs: dict[str, ScriptRun]) -> list[Target]:
    """Whole-system no-op throughput and its ratios to HTEX and Dask in the same run."""
    total = Target("throughput", "no-op tasks/s through the whole system (batched)", ">= 5,000/s")
    htex = Target("vs_htex", "whole system vs Parsl HTEX (engine peer), same run", ">= 5x")
    dask = Target("vs_dask", "whole system vs Dask LocalCluster (engine peer), same run", ">= 10x")
    ours: float | None = None
    api_text, why = _output(runs, "api.py")
    line = find_line(api_text, r"tasks/s") if api_text else None
    if line:
        ours = _rate_before_unit(line, "tasks/s")
        total.source = f"bench/api.py: `{' '.join(line.split())[:90]}`"
    if ours is None:
        scale = runs.get("scale.py")
        if scale and isinstance(scale.figures, dict) and scale.figures.get("endurance"):
            ours = scale.figures["endurance"].get("tasks_per_s")
            total.source = "bench/scale.py endurance run (one user, batched HTTP)"
    found = [total, htex, dask]
    if ours is None:
        total.why = why or "no throughput figure found"
        htex.why = dask.why = total.why
    else:
        total.measured, total.met = f"{ours:,.0f}/s", ours >= 5000
        exec_text, exec_why = _output(runs, "executor.py")
        for target, pattern, factor in ((htex, r"^Parsl HTEX", 5), (dask, r"^Dask", 10)):
            row = find_line(exec_text, pattern) if exec_text else None
            peer = None
            if row:
                numbers = [parse_number(c) for c in cells(row)[1:]]
                # Columns: tasks, tasks/s, p50 ms, ratio: tasks/s is the second number.
                if len(numbers) >= 2:
                    peer = numbers[1]
            if peer:
                ratio = ours / peer
                target.measured = f"{ratio:.1f}x ({ours:,.0f}/s vs {peer:,.0f}/s)"
                target.met = ratio >= factor
                target.source = "whole system (above) / bench/executor.py peer row"
            else:
                target.why = exec_why or f"no {pattern} row in bench/executor.py output"
    # The same comparison one level up: futures through the client's Executor against
    # the peers' own client APIs (bench/client.py prints the ratios itself).
    client_text, client_why = _output(runs, "client.py")
    for pattern, label, factor in (
        (r"^Parsl python_app", "Executor futures/s vs Parsl python_app on HTEX", 5),
        (r"^Dask client\.map", "Executor futures/s vs Dask client.map", 10),
    ):
        target = Target("client_" + label.split()[-1], label, f">= {factor}x", why=client_why)
        row = find_line(client_text, pattern) if client_text else None
        match = re.search(r"([0-9.]+)x\s*$", row) if row else None
        if match:
            ratio = float(match.group(1))
            target.measured, target.met, target.why = f"{ratio:.2f}x", ratio >= factor, ""
            target.source = "bench/client.py (same run)"
        elif client_text:
            target.why = f"no {pattern} row with a ratio in bench/client.py output"
        found.append(target)
    return found


def _scale(runs: dict[str, ScriptRun]) -> list[Target]:
    ready = Target("ready", "100 users ready", "<= 6 s")
    growth = Target("growth", "daemon memory and descriptors over 100,000 tasks", "no growth")
    run = runs.get("scale.py")
    figures = run.figures if run and isinstance(run.figures, dict) else {}
    why = "" if figures else _output(runs, "scale.py")[1] or "no figures from bench/scale.py"
    ready.why = growth.why = why
    users = figures.get("users") or {}
    if users.get("ready_s") is not None:
        ready.measured = f"{users['ready_s']:.1f} s for {users['count']} {users['kind']}"
        ready.met = users["ready_s"] <= 6 and users["count"] >= 100 and users["ok"]
        ready.source = "bench/scale.py"
        if not users["ok"]:
            ready.measured += f" ({users.get('problem')})"
    elif users.get("problem"):
        ready.why = users["problem"]
    endurance = figures.get("endurance") or {}
    if endurance.get("tasks"):
        rss = endurance["rss_growth_bytes"]
        trend = endurance.get("rss_trend_bytes", rss)
        fds = endurance["fd_growth"]
        growth.measured = (
            f"{endurance['tasks']:,} tasks: RSS {rss / 1048576:+.1f} MiB after warm-up"
            f" (trend {trend / 1048576:+.1f} MiB), fds {fds:+d}"
        )
        # Descriptors must come back exactly; memory must not trend upwards (the peak of
        # the second half of the run within 4 MiB of the first half's).
        growth.met = fds <= 0 and trend <= 4 * 1048576 and endurance["tasks"] >= 100_000
        growth.source = "bench/scale.py (after warm-up vs after the run)"
    elif endurance.get("problem"):
        growth.why = endurance["problem"]
    return [ready, growth]


def _restart(runs: dict[str, ScriptRun]) -> list[Target]:
    lost = Target("restart", "tasks lost to kill -9 of mepd (adopt_endpoints: true)", "0")
    run = runs.get("restart.py")
    figures = run.figures if run and isinstance(run.figures, dict) else {}
    modes = {m["adopt"]: m for m in figures.get("modes", [])}
    adopted = modes.get(True)
    if adopted is None:
        lost.why = _output(runs, "restart.py")[1] or "no figures from bench/restart.py"
        return [lost]
    failed = adopted["endpoint_lost"] + adopted["other_failures"]
    failed += adopted["acknowledged"] - adopted["answered"]
    seconds = adopted["readopt_seconds"]
    lost.measured = f"{failed} of {adopted['acknowledged']}, " + (
        f"{adopted['endpoints']} endpoints re-adopted in {seconds:.1f} s"
        if seconds is not None
        else "endpoints not re-adopted"
    )
    lost.met = failed == 0 and seconds is not None
    lost.source = "bench/restart.py"
    return [lost]


def _payload(runs: dict[str, ScriptRun]) -> list[Target]:
    """bench/payload.py: 1 MiB and small round trips vs peers, and beside a streamer."""
    big = Target("payload", "1 MiB arg + 1 MiB result via the Executor vs best peer", "<= 1x")
    warm = Target("rtt_htex", "warm small round trip via the Executor vs Parsl HTEX", "<= 1x")
    side = Target("beside", "small round trip p50 while another streams 1 MiB", "<= +1 ms")
    run = runs.get("payload.py")
    figures = run.figures if run and isinstance(run.figures, dict) else {}
    ours = figures.get("mep, Executor")
    why = _output(runs, "payload.py")[1] or "no figures from bench/payload.py"
    peers = {k: v for k, v in figures.items() if k.startswith(("Parsl", "Dask"))}
    for target, case, names in (
        (big, "1 MiB argument, 1 MiB result", list(peers)),
        (warm, "small argument, small result", [k for k in peers if k.startswith("Parsl")]),
    ):
        found = {n: peers[n][case]["p50"] for n in names if isinstance(peers[n], dict)}
        if not isinstance(ours, dict) or not found:
            target.why = ours if isinstance(ours, str) else why
            continue
        best = min(found, key=found.__getitem__)
        mine = ours[case]["p50"]
        target.measured = (
            f"{mine / found[best]:.2f}x ({mine * 1e3:.1f} ms vs {best} {found[best] * 1e3:.1f} ms)"
        )
        target.met, target.source = mine <= found[best], "bench/payload.py (same run)"
    beside = figures.get("beside_streamer")
    if isinstance(beside, dict):
        growth = beside["beside"]["p50"] - beside["alone"]["p50"]
        side.measured = f"{growth * 1e3:+.2f} ms ({beside['streamed']} streamed)"
        side.measured += _peers_beside(figures.get("beside_streamer_peers"))
        side.met, side.source = growth <= 1e-3, "bench/payload.py (second table)"
    else:
        side.why = beside if isinstance(beside, str) else why
    return [big, warm, side]


def _peers_beside(peers: object) -> str:
    """The peers' own p50 growth beside their 1 MiB streamers (bench/payload.py, same
    run), to put next to mep's: what sharing the two cores costs a peer."""
    if not isinstance(peers, dict):
        return ""
    cells = []
    for name, found in peers.items():
        if isinstance(found, dict):
            growth = found["beside"]["p50"] - found["alone"]["p50"]
            cells.append(f"{name} {growth * 1e3:+.2f} ms")
        else:
            cells.append(f"{name} not measured")
    return f"; peers beside their own streamer: {', '.join(cells)}" if cells else ""


TARGETS: list[Callable[[dict[str, ScriptRun]], list[Target]]] = [
    _authz,
    _uep,
    _api,
    _fairness,
    _throughput,
    _payload,
    _scale,
    _restart,
]


def targets(runs: dict[str, ScriptRun]) -> list[Target]:
    found: list[Target] = []
    for extract in TARGETS:
        try:
            found.extend(extract(runs))
        except Exception as exc:  # a table format changed: say so, keep the report
            found.append(
                Target(extract.__name__, extract.__name__, "-", why=f"could not read: {exc}")
            )
    return found


# -- the document ----------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells_ = [list(header)] + [[c.replace("|", "\\|") for c in row] for row in rows]
    out = ["| " + " | ".join(cells_[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in cells_[1:]]
    return "\n".join(out)


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S* \[\s*[a-z]+\s*\] ")


def table_text(stdout: str) -> tuple[str, int]:
    """A script's printed tables without the log lines of the components it drove (the
    daemon's structlog lines go to standard output); and how many were left out."""
    lines = stdout.splitlines()
    kept = [line for line in lines if not _LOG_LINE.match(line)]
    return "\n".join(kept), len(lines) - len(kept)


def _verbatim(text: str) -> str:
    """A script's output as printed: markdown as is, anything else in a code block."""
    stripped = text.strip("\n")
    if "\n|" in "\n" + stripped and "**" in stripped.splitlines()[0]:
        return stripped
    return "```text\n" + stripped + "\n```"


def render(
    runs: list[ScriptRun],
    found: list[Target],
    *,
    smoke: bool,
    started: datetime.datetime,
    total_seconds: float,
    warnings: list[str],
    load_at_start: str = "unknown",
) -> str:
    parts = [
        "# Performance",
        "",
        "Generated by `bench/report.py` (`make bench`); do not edit by hand. Every figure "
        "below comes from one run on one machine; peers (bare `ProcessPoolExecutor`, Parsl "
        "HTEX, Dask `LocalCluster`) ran in the same run, so their ratios hold better than "
        "absolute numbers on a shared, noisy machine.",
        "",
    ]
    if smoke:
        parts += ["> **Smoke run** (`--smoke`): tiny counts, the figures mean nothing.", ""]
    parts += [
        "## Run",
        "",
        _table(
            ["item", "value"],
            [
                ("date (UTC)", started.strftime("%Y-%m-%d %H:%M:%S")),
                ("commit", commit()),
                ("duration", f"{total_seconds:.0f} s"),
                *machine(),
                ("load average 1/5/15 min, at start", load_at_start),
                ("load average 1/5/15 min, at end", load_average()),
            ],
        ),
        "",
        "### Versions",
        "",
        _table(["component", "version"], versions()),
        "",
        "## Targets",
        "",
        "The issue's targets on this 2-core machine, against this run's figures.",
        "",
        _table(
            ["target", "goal", "measured", "verdict", "source"],
            [(t.what, t.goal, t.measured, t.verdict, t.source) for t in found],
        ),
        "",
    ]
    missed = [t for t in found if t.met is False]
    if missed:
        parts += ["### What limits the missed targets", ""]
        for t in missed:
            note = LIMITS.get(t.key, "not profiled yet in this run.")
            parts.append(f"- **{t.what}** ({t.measured}, goal {t.goal}): {note}")
        parts.append("")
    parts += [
        "## Where the time goes",
        "",
        "From py-spy profiles (`py-spy record -r 500 -p <pid>`, 12 s each) of mepd and a "
        "user endpoint on this machine, driven over HTTP by a loop like bench/api.py's: "
        "single no-op round trips, 5,000-task batches, 1 MiB echoes. Taken while this "
        "report was written, not re-taken by every run; percentages are of all samples.",
        "",
        f"- Single warm round trip: {_HTTP_PATH}",
        f"- Batched throughput: {_BATCH_PATH}",
        f"- User endpoint start and many users: {LIMITS['ready']}",
        f"- Large payloads: {_PAYLOAD_PATH}",
        "",
        "## Results",
        "",
    ]
    for run in runs:
        parts += [f"### bench/{run.name}", "", f"`{' '.join(_short(run.argv))}` — {run.status}", ""]
        table, logs = table_text(run.stdout)
        if table.strip():
            parts += [_verbatim(table), ""]
        if logs:
            parts += [f"({logs} log lines of the components it drove left out.)", ""]
        if not run.ok:
            tail = "\n".join(run.stderr.strip().splitlines()[-15:])
            parts += ["Not measured (or incomplete): the script did not finish cleanly.", ""]
            if tail:
                parts += ["```text", tail, "```", ""]
        if run.leftovers:
            parts += ["Left running and killed after the script:", ""]
            parts += [f"- {line}" for line in run.leftovers] + [""]
    if warnings:
        parts += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    return "\n".join(parts).rstrip() + "\n"


def _short(argv: Sequence[str]) -> list[str]:
    out = ["python"]
    for arg in argv[1:]:
        if arg.startswith(str(REPO)):
            arg = os.path.relpath(arg, REPO)
        out.append("PATH" if arg.startswith(tempfile.gettempdir()) else arg)
    return out


def prepare_runtime() -> None:
    """A private TMPDIR for the scripts; as root, build the world-readable venv user
    endpoints run from (tests/runtime_venv) before any script's clock starts: on a fresh clone that is a pip install, which
    must not eat a benchmark's time limit."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.trusted_dir import use_private_tmp

    # The scripts write deployments into temporary directories, which mepd refuses under
    # /tmp (security rule 8): they inherit a private TMPDIR.
    use_private_tmp()
    if os.geteuid() != 0:
        return
    from tests.runtime_venv import runtime_python

    began = time.monotonic()
    print("== preparing the user endpoints' runtime venv", flush=True)
    print(f"-- {runtime_python()} ready in {time.monotonic() - began:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="each script with --smoke")
    parser.add_argument("--output", default=str(REPO / "docs" / "performance.md"))
    parser.add_argument("--only", nargs="*", help="run only scripts whose name contains this")
    parser.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every script's time limit"
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="also write each script's output and figures to DIR/<name>.out and .json",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=840.0,
        help="seconds for the whole run (make bench must end within 15 minutes)",
    )
    args = parser.parse_args(argv)
    marker = secrets.token_hex(8)
    load_at_start = load_average()
    become_subreaper()
    started = datetime.datetime.now(datetime.UTC)
    began = time.monotonic()
    runs: list[ScriptRun] = []
    warnings: list[str] = []
    prepare_runtime()
    for path in discover(args.only):
        limit = SMOKE_TIMEOUT if args.smoke else TIMEOUTS.get(path.name, DEFAULT_TIMEOUT)
        # Whatever a script may take, the run as a whole stays within its budget (a
        # script stopped at its limit gets 30 s to clean up, hence the reserve).
        left = args.budget - (time.monotonic() - began) - 40
        limit = min(limit * args.timeout_scale, left)
        if limit < 5:
            run = ScriptRun(path.name, [sys.executable, str(path)])
            run.stderr = f"not run: the budget of {args.budget:.0f} s was spent"
            runs.append(run)
            print(f"-- bench/{path.name}: {run.stderr}", flush=True)
            continue
        print(f"== bench/{path.name} (limit {limit:.0f} s)", flush=True)
        run = run_script(path, smoke=args.smoke, timeout=limit, marker=marker)
        runs.append(run)
        if args.keep:
            keep(run, Path(args.keep))
        print(table_text(run.stdout)[0].rstrip())
        print(f"-- bench/{path.name}: {run.status}", flush=True)
        if not run.ok:
            print("\n".join(run.stderr.strip().splitlines()[-15:]), file=sys.stderr)
        for line in run.leftovers:
            warnings.append(f"WARNING: bench/{path.name} left running (killed): {line}")
        warnings.extend(sweep(marker))
    # A last look, once every script's clean-up has had its chance.
    warnings.extend(sweep(marker))
    found = targets({run.name: run for run in runs})
    document = render(
        runs,
        found,
        smoke=args.smoke,
        started=started,
        total_seconds=time.monotonic() - began,
        warnings=warnings,
        load_at_start=load_at_start,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(document)
    print("\nTargets:")
    for t in found:
        print(f"  {t.what}: {t.measured} (goal {t.goal}) -> {t.verdict}")
    for line in warnings:
        print(line)
    print(f"wrote {args.output}")
    return 0 if all(run.ok for run in runs) and not warnings else 1


if __name__ == "__main__":
    sys.exit(main())
