"""Helpers for the daemon tests.

- In-process fakes of the pipeline's ports (``FakeSite``, ``FakeEndpoints``) and
  ``make_pipeline`` to test the API without root, processes or other components;
- ``RunningDaemon``: a real ``mepd serve`` subprocess on 127.0.0.1 with a temporary
  state directory, ready when ``/healthz`` answers (polled with a deadline), stopped
  with SIGTERM (SIGKILL after a bound).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import jsonschema

from mepcore.errors import ConfigError, Violation
from mepcore.identity import AccountPolicy, check_account
from mepcore.tasks import ResourceLimits
from mepcore.testing import FakeAccountDatabase
from mepcore.types import Account, ShadowEntry
from mepd.admission import Admitted, DecisionView
from mepd.audit import AuditLog, AuditUnavailable
from mepd.auth import Authenticator, Caller, issue_local_token, load_or_create_local_key
from mepd.inflight import DispatchTask, InFlightTask
from mepd.pipeline import Pipeline
from mepd.settings import IssuerSettings, Limits
from mepd.store import TaskStore

REPO = Path(__file__).resolve().parents[1]

VARIABLE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "workers": {"type": "integer", "minimum": 1, "maximum": 8},
        "queue": {"enum": ["short", "long"]},
    },
}


@attrs.define
class FakeShadow:
    """A shadow database held in memory (locked and expired accounts)."""

    entries: dict[str, ShadowEntry] = attrs.field(factory=dict)

    def by_name(self, name: str) -> ShadowEntry | None:
        return self.entries.get(name)


# The day the fake site checks shadow expiry against (days since 1970-01-01).
FAKE_TODAY = 20_000


@attrs.define
class FakeSite:
    """An endpoint whose mapping is a dict and whose policy is a deny set; its account
    check is mepcore's own, on an in-memory password and shadow database."""

    name: str = "hpc"
    template_name: str = "default"
    allowed_functions: frozenset[str] | None = None
    mapping: dict[str, str] = attrs.field(factory=dict)  # username -> account
    accounts: FakeAccountDatabase = attrs.field(factory=FakeAccountDatabase)
    account_policy: AccountPolicy = attrs.field(factory=AccountPolicy)
    shadow: FakeShadow = attrs.field(factory=FakeShadow)
    denied: set[tuple[str, str]] = attrs.field(factory=set)  # (obj, action)
    admins: set[str] = attrs.field(factory=set)  # account names allowed "admin"
    decisions: list[tuple[str, str, tuple[str, ...]]] = attrs.field(factory=list)
    mapping_blocks: bool = False
    map_threads: list[str] = attrs.field(factory=list)
    resource_limits: ResourceLimits = attrs.field(factory=ResourceLimits)

    def map_identity(self, caller: Caller) -> str | None:
        self.map_threads.append(threading.current_thread().name)
        for ident in caller.identities:
            if ident.username in self.mapping:
                return self.mapping[ident.username]
        return None

    def check_account(self, name: str) -> Account:
        return check_account(
            name, self.accounts, self.account_policy, shadow=self.shadow, today=FAKE_TODAY
        )

    def decide(
        self, obj: str, action: str, principals: Sequence[str], caller: Caller, account: Account
    ) -> DecisionView:
        self.decisions.append((obj, action, tuple(principals)))
        if action == "admin":
            ok = any(f"user:{a}" in principals for a in self.admins)
            return DecisionView(ok, "authz.allowed" if ok else "authz.denied", ("p, admin",))
        if (obj, action) in self.denied:
            return DecisionView(False, "authz.denied", ("p, deny line",), "v1")
        return DecisionView(True, "authz.allowed", ("p, allow line",), "v1")

    def validate_variables(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        validator = jsonschema.Draft202012Validator(VARIABLE_SCHEMA)
        errors = list(validator.iter_errors(dict(variables)))
        if errors:
            raise ConfigError(
                "config.invalid_variables",
                violations=[
                    Violation("$" + "".join(f".{p}" for p in e.absolute_path) or "$", e.message)
                    for e in errors
                ],
            )
        return dict(variables)

    def config_key(self, account: Account, variables: Mapping[str, Any]) -> str:
        return hashlib.sha256(
            json.dumps([account.name, dict(variables)], sort_keys=True).encode()
        ).hexdigest()


@attrs.define
class InFlightHandle:
    """What every fake user endpoint does as the registry's handle does: a dispatched
    task goes into the pipeline's in-flight table, and a result or a loss takes it out
    (only from this handle) before the pipeline hears of it."""

    pipeline: Pipeline | None
    id: str
    account: str
    functions: dict[str, bytes] = attrs.field(factory=dict)

    def missing_functions(self, function_ids: Sequence[str]) -> list[str]:
        return [f for f in function_ids if f not in self.functions]

    def register_function(self, function_id: str, payload: bytes) -> None:
        self.functions[function_id] = payload

    def track(self, tasks: Sequence[DispatchTask]) -> None:
        assert self.pipeline is not None
        self.pipeline.in_flight.add(
            InFlightTask(t.task_id, t.owner, self.account, t.function_id, self.id, time.time())
            for t in tasks
        )

    def result(self, task_id: str, header: dict[str, Any], payload: bytes) -> None:
        assert self.pipeline is not None
        record = self.pipeline.in_flight.take(task_id, endpoint_id=self.id)
        if record is not None:
            self.pipeline.delivery.on_result(record, header, payload)

    def lost(self, task_id: str, reason: str) -> None:
        assert self.pipeline is not None
        record = self.pipeline.in_flight.take(task_id, endpoint_id=self.id)
        if record is not None:
            self.pipeline.delivery.on_lost([record], reason)


@attrs.define
class FakeHandle(InFlightHandle):
    """A user endpoint that echoes each payload back as the result, asynchronously."""

    hold: bool = False
    held: list[DispatchTask] = attrs.field(factory=list)

    def dispatch(self, tasks: Sequence[DispatchTask]) -> None:
        for task in tasks:
            assert task.function_id in self.functions
        self.track(tasks)
        if self.hold:
            self.held.extend(tasks)
            return
        loop = asyncio.get_running_loop()
        for task in tasks:
            loop.call_soon(self.complete, task)

    def complete(self, task: DispatchTask) -> None:
        if task.payload == b"fail":
            header = {
                "task_id": task.task_id,
                "status": "failed",
                "error": {
                    "type_name": "ValueError",
                    "message": "boom",
                    "traceback": "Traceback...",
                    "reason": "task.failed",
                },
            }
            self.result(task.task_id, header, b"")
        else:
            self.result(
                task.task_id,
                {"task_id": task.task_id, "status": "success"},
                b"echo:" + task.payload,
            )


@attrs.define
class FakeEndpoints:
    pipeline: Pipeline | None = None
    handles: dict[str, FakeHandle] = attrs.field(factory=dict)
    starts: list[Admitted] = attrs.field(factory=list)
    hold: bool = False
    cancelled: list[str] = attrs.field(factory=list)

    async def get_or_start(self, admitted: Admitted) -> FakeHandle:
        key = f"{admitted.account.name}/{admitted.config_key}"
        if key not in self.handles:
            self.starts.append(admitted)
            self.handles[key] = FakeHandle(
                self.pipeline, key, admitted.account.name, hold=self.hold
            )
        return self.handles[key]

    def status(self, account_name: str | None) -> list[dict[str, Any]]:
        return [
            {"config_key": k.split("/")[1], "state": "ready", "endpoint": "hpc"}
            for k in self.handles
            if account_name is None or k.startswith(account_name + "/")
        ]

    async def stop(self, account_name: str, endpoint: str, reason: str) -> int:
        keys = [k for k in self.handles if k.startswith(account_name + "/")]
        for k in keys:
            del self.handles[k]
        return len(keys)

    def cancel(self, endpoint_id: str, task_ids: Sequence[str]) -> bool:
        self.cancelled.extend(task_ids)
        return endpoint_id in self.handles

    async def read_log(self, account: Account, endpoint: str, lines: int) -> dict[str, Any]:
        # In-process fake: no user endpoint ever wrote a log.
        path = f"{account.home}/.mep/endpoints/{endpoint}/endpoint.log"
        return {"path": path, "exists": False, "lines": []}

    async def introspect(self, account_name: str, endpoint: str) -> list[dict[str, Any]]:
        # In-process fake: there is no user endpoint process to ask.
        return [
            {"config_key": e["config_key"], "pid": None, "process": {}}
            for e in self.status(account_name)
        ]


class BrokenAudit:
    """An audit log whose disk is full."""

    available = False

    def record(self, event: str, **fields: Any) -> None:
        raise AuditUnavailable(detail="disk full")

    def record_many(self, events: Any) -> None:
        raise AuditUnavailable(detail="disk full")


@attrs.define
class PipelineKit:
    pipeline: Pipeline
    site: FakeSite
    endpoints: FakeEndpoints
    state_dir: Path
    issuer: IssuerSettings

    def token(self, username: str, **kwargs: Any) -> str:
        key = load_or_create_local_key(self.state_dir)
        return issue_local_token(key, self.issuer, username, **kwargs)

    def headers(self, username: str, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(username, **kwargs)}"}


def make_pipeline(
    state_dir: Path, *, limits: Limits | None = None, audit: Any = None
) -> PipelineKit:
    issuer = IssuerSettings(type="local")
    authenticator = Authenticator((issuer,), state_dir)
    authenticator.load()
    store = TaskStore.open(state_dir / "tasks.sqlite3")
    if audit is None:
        audit = AuditLog(state_dir / "audit.jsonl")
        audit.open()
    endpoints = FakeEndpoints()
    site = FakeSite()
    site.accounts.add("alice", 2001)
    site.accounts.add("bob", 2002)
    site.mapping.update({"alice@example.org": "alice", "bob@example.org": "bob"})
    pipeline = Pipeline.create(
        store=store,
        audit=audit,
        authenticator=authenticator,
        ueps=endpoints,
        limits=limits or Limits(),
        site_of={site.name: site}.get,
    )
    endpoints.pipeline = pipeline
    return PipelineKit(pipeline, site, endpoints, state_dir, issuer)


Scenario = Callable[[httpx.AsyncClient, "PipelineKit"], Awaitable[None]]


def serve_pipeline(kit: PipelineKit, scenario: Scenario, edge: Any = None) -> PipelineKit:
    """Run ``scenario`` against the real API app serving ``kit``'s pipeline, in this
    process (httpx's ASGI transport; ``edge``: the app's ``EdgeSettings``)."""
    from mepd.api import create_app

    app = create_app(kit.pipeline, kit.pipeline.limits, edge)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mepd") as client:
            await scenario(client, kit)

    asyncio.run(main())
    return kit


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- a real daemon --------------------------------------------------------------------


@attrs.define
class RunningDaemon:
    config: Path
    state_dir: Path
    process: subprocess.Popen[bytes]
    url: str
    stderr_path: Path

    def token(self, username: str, *extra: str) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mepd",
                "token",
                "issue",
                "--config",
                str(self.config),
                "--identity",
                username,
                *extra,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip()

    def client(self, token: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def kill(self) -> None:
        """``kill -9`` of mepd, and of the helpers it runs in its own session at that
        moment (squeue, scancel, tail, mapping programs), as a crash of the service
        would take them; user endpoints (sessions of their own) are left alone."""
        helpers = _session_children(self.process.pid)
        self.process.kill()
        self.process.wait(10)
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _session_children(parent: int) -> list[int]:
    """The children of ``parent`` in its session."""
    children = []
    session = os.getsid(parent)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()  # state, ppid, pgrp, session, ...
        if int(fields[1]) == parent and int(fields[3]) == session:
            children.append(int(entry))
    return children


def start_daemon(
    config: Path,
    state_dir: Path,
    *,
    deadline: float = 60.0,
    log_name: str = "mepd.log",
    ca: Path | None = None,
    extra_args: Sequence[str] = (),
) -> RunningDaemon:
    """Start ``mepd serve`` and wait until /healthz answers (or fail with its log)."""
    port_file = state_dir / "port"
    with contextlib.suppress(FileNotFoundError):
        port_file.unlink()
    stderr_path = state_dir.parent / log_name
    err = stderr_path.open("ab")
    env = {k: v for k, v in os.environ.items() if k != "MEP_TOKEN"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mepd", "serve", "--config", str(config), *extra_args],
        stdout=err,
        stderr=err,
        env=env,
        cwd=str(REPO),
    )
    err.close()
    end = time.monotonic() + deadline
    url = ""
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"mepd exited {process.returncode}:\n{stderr_path.read_text()}")
        if port_file.exists() and port_file.read_text().strip():
            scheme = "https" if ca else "http"
            url = f"{scheme}://127.0.0.1:{int(port_file.read_text())}"
            try:
                verify: Any = ssl.create_default_context(cafile=str(ca)) if ca else True
                if httpx.get(url + "/healthz", timeout=2, verify=verify).status_code == 200:
                    return RunningDaemon(config, state_dir, process, url, stderr_path)
            except httpx.HTTPError:
                pass
        time.sleep(0.05)  # polling interval of a deadline loop, not a wait for an event
    process.kill()
    process.wait(10)
    raise RuntimeError(f"mepd not ready in {deadline}s:\n{stderr_path.read_text()}")


@contextlib.contextmanager
def running_daemon(config: Path, state_dir: Path, **kwargs: Any) -> Iterator[RunningDaemon]:
    daemon = start_daemon(config, state_dir, **kwargs)
    try:
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def daemon_with_accounts(
    top: Path, count: int = 1, *, template: str | None = None, schema: str | None = None
) -> Iterator[tuple[RunningDaemon, list[Any]]]:
    """As root: ``count`` real test accounts and a daemon serving a deployment written
    to ``top`` (the world-readable runtime; ``template``/``schema`` replace the
    example's), both gone afterwards. Skips the test when not root."""
    import pytest

    from tests.accounts import create_account, delete_account

    if os.geteuid() != 0:
        pytest.skip("needs root: creates real accounts with useradd")
    config = write_runtime_deployment(top)
    if template is not None:
        (top / "templates" / "user_config_template.yaml.j2").write_text(template)
    if schema is not None:
        (top / "templates" / "user_config_schema.json").write_text(schema)
    accounts = []
    try:
        accounts = [create_account() for _ in range(count)]
        with running_daemon(config, top / "state") as daemon:
            yield daemon, accounts
    finally:
        for account in accounts:
            delete_account(account.pw_name)


# -- a deployment on disk ---------------------------------------------------------------

EXAMPLE = REPO / "examples" / "daemon"
MAPPING_FOR_TEST_ACCOUNTS = [
    {
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mep_match_syntax": "python",
        "mappings": [
            {"source": "{username}", "match": "(mept[0-9a-f]{8})@example\\.org", "output": "{0}"}
        ],
    }
]


def write_deployment(
    top: Path,
    *,
    python: str,
    package_paths: Sequence[str] = (),
    policy_extra: Sequence[str] = (),
    limits: Mapping[str, Any] | None = None,
    endpoint_extra: Mapping[str, Any] | None = None,
    settings_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write settings, mapping, policy and template for a test daemon; return the settings
    path. Identities ``<account>@example.org`` map to test accounts ``mept<hex>``."""
    import shutil

    import yaml

    top.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXAMPLE / "templates", top / "templates", dirs_exist_ok=True)
    (top / "mapping.json").write_text(json.dumps(MAPPING_FOR_TEST_ACCOUNTS))
    policy = (EXAMPLE / "policy.csv").read_text() + "".join(f"{line}\n" for line in policy_extra)
    (top / "policy.csv").write_text(policy)
    # Copies, not the checkout's files: mepd trusts only files no one else can change,
    # and a checkout may live anywhere (under /tmp, with a group-writable umask…).
    for shipped in ("model.conf", "base.csv"):
        shutil.copyfile(REPO / "policies" / shipped, top / shipped)
    settings: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "state_dir": str(top / "state"),
        "log_level": "info",
        "python": python,
        "spawn": {"package_paths": list(package_paths)},
        "limits": {"drain_timeout": 10, "start_timeout": 60, **(limits or {})},
        "issuers": [{"type": "local"}],
        "endpoints": [
            {
                "name": "hpc",
                "template": "templates/user_config_template.yaml.j2",
                "schema": "templates/user_config_schema.json",
                "environment": "templates/user_environment.yaml",
                "mapping": "mapping.json",
                "policy_model": "model.conf",
                # As the example: the shipped defaults, then the example's own lines.
                "policy": ["base.csv", "policy.csv"],
                **(endpoint_extra or {}),
            }
        ],
        **(settings_extra or {}),
    }
    path = top / "mepd.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def write_runtime_deployment(top: Path, **kwargs: Any) -> Path:
    """``write_deployment`` for the world-readable runtime venv of the tests (what user
    endpoints of real accounts can run): its interpreter and its package paths."""
    from tests.runtime_venv import package_paths, runtime_python

    python = runtime_python()
    paths = [p for p in package_paths(python) if os.path.isdir(p)]
    return write_deployment(top, python=python, package_paths=paths, **kwargs)


def remote_function(source: str, name: str) -> Any:
    """A function defined as if in ``__main__``, so dill sends it by value."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return namespace[name]


def wait_all(
    client: httpx.Client, ids: Sequence[str], *, deadline: float = 120.0
) -> dict[str, dict[str, Any]]:
    """Long-poll until every id is final (or the deadline passes); views by id."""
    done: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + deadline
    while len(done) < len(ids) and time.monotonic() < end:
        pending = [i for i in ids if i not in done]
        for start in range(0, len(pending), 5000):
            chunk = pending[start : start + 5000]
            r = client.post("/v1/tasks/wait", json={"task_ids": chunk, "timeout": 5})
            r.raise_for_status()
            for view in r.json()["tasks"]:
                done[view["task_id"]] = view
    return done
