"""The daemon's lifecycle: load, serve, reload, drain, stop.

``Daemon.run()`` opens the audit log and the task store (recovering what a crash left:
dispatched tasks become ``task.endpoint_lost``, queued ones are dispatched again), loads
every endpoint's files (mapping, policy, template), creates the user-endpoint registry,
binds the listening socket (its port is written to ``<state_dir>/port``), serves the API
with uvicorn, and answers admin commands (``status``, ``reload``) on a Unix socket in the
state directory (mode 0600, peers must be root or the daemon's own uid).

- SIGHUP or ``mepd reload``: mapping, policy, template and issuer keys are loaded again;
  a file that fails to load leaves the previous version in force (logged, and reported
  to ``mepd reload``).
- SIGTERM / SIGINT: drain — new work is refused (503), in-flight tasks get
  ``limits.drain_timeout``, user endpoints are stopped by the ladder
  (``Registry.shutdown``), the store is closed cleanly.

This module is wiring: it adapts mepcore components to the pipeline's ports
(``LoadedSite``, ``RegistryEndpoints``). It deliberately makes no decision of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import structlog
import uvicorn

from mepcore.authz import Authorizer, AuthzRequest
from mepcore.config import SiteFiles, VariableLimits, config_key, validate_variables
from mepcore.errors import IdentityError, MepError, SiteConfigError
from mepcore.identity import AccountPolicy, IdentityMapper, check_account
from mepcore.ports import AccountDatabase, SystemAccountDatabase
from mepcore.spawn import SpawnSettings
from mepcore.tasks import TaskEnvelope
from mepcore.types import Account, Identity, IdentitySet
from mepd.api import create_app
from mepd.audit import AuditLog, AuditUnavailable
from mepd.auth import Authenticator
from mepd.metrics import Labels, Metrics, labels
from mepd.pipeline import DecisionView, DispatchTask, Handle, Pipeline, StartSpec
from mepd.registry import (
    EndpointStatus,
    Registry,
    RegistryLimits,
    StartRequest,
    UserEndpointHandle,
)
from mepd.settings import EndpointSettings, Settings
from mepd.store import TaskStore

log = structlog.get_logger("mepd.daemon")

PORT_FILE = "port"
ADMIN_SOCKET = "admin.sock"
STORE_FILE = "tasks.sqlite3"
MAX_ADMIN_REQUEST = 64 * 1024


# -- one endpoint's loaded files ---------------------------------------------------------


VALIDATED_CACHE_ENTRIES = 1024


@attrs.define(eq=False)
class LoadedSite:
    """An endpoint with its mapping, policy and template loaded (the pipeline's ``Site``).

    Files never change under a ``LoadedSite`` (a reload builds a new one), so the result of
    validating the same variables again is remembered (validation costs ~1 ms)."""

    settings: EndpointSettings
    mapper: IdentityMapper
    authorizer: Authorizer
    files: SiteFiles
    accounts: AccountDatabase
    account_policy: AccountPolicy
    variable_limits: VariableLimits = attrs.field(factory=VariableLimits)
    _validated: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def template_name(self) -> str:
        return self.files.template_name

    @property
    def allowed_functions(self) -> frozenset[str] | None:
        allowed = self.settings.allowed_functions
        return None if allowed is None else frozenset(allowed)

    @property
    def mapping_blocks(self) -> bool:
        return any(hasattr(m, "command") for m in self.mapper.mappers)

    def map_identity(self, identities: IdentitySet) -> str | None:
        return self.mapper.map(identities).username

    def check_account(self, name: str) -> Account:
        account = check_account(name, self.accounts, self.account_policy)
        only = single_account_uid()
        if only is not None and account.uid != only:
            raise IdentityError(
                "identity.account_not_served",
                f"account {name!r} refused: this daemon runs unprivileged (uid {only}) "
                "and can only serve its own account",
                context={"username": name},
            )
        return account

    def decide(
        self,
        obj: str,
        action: str,
        principals: Sequence[str],
        *,
        mfa: bool,
        auth_age: float | None,
        uid: int | None,
    ) -> DecisionView:
        decision = self.authorizer.decide(
            AuthzRequest(self.name, obj, action, tuple(principals), mfa, auth_age, uid)
        )
        return DecisionView(
            allowed=decision.allowed,
            reason=decision.reason,
            lines=tuple(
                line.location + " " + str(line) if hasattr(line, "location") else str(line)
                for line in decision.lines
            ),
            policy_version=decision.policy_version,
        )

    def validate_variables(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        key = json.dumps(variables, sort_keys=True, separators=(",", ":"))
        hit = self._validated.get(key)
        if hit is None:
            hit = validate_variables(variables, self.files.schema, self.variable_limits)
            if len(self._validated) >= VALIDATED_CACHE_ENTRIES:
                self._validated.pop(next(iter(self._validated)))
            self._validated[key] = hit
        return copy.deepcopy(hit)

    def config_key(self, account: Account, variables: Mapping[str, Any]) -> str:
        return config_key(account.name, self.files.template_digest, variables)


ACCOUNT_CACHE_SECONDS = 2.0
ACCOUNT_CACHE_ENTRIES = 4096


@attrs.define
class CachedAccounts:
    """The password database with a short memory (an NSS look-up with all groups costs
    ~0.2 ms). A changed or removed account is seen after at most ``ttl`` seconds; the
    account policy (uid 0, min_uid, deny list, the daemon's uid) is applied every time."""

    inner: AccountDatabase
    ttl: float = ACCOUNT_CACHE_SECONDS
    _by_name: dict[str, tuple[float, Account | None]] = attrs.field(factory=dict)

    def by_name(self, name: str) -> Account | None:
        now = time.monotonic()
        hit = self._by_name.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        account = self.inner.by_name(name)
        if len(self._by_name) >= ACCOUNT_CACHE_ENTRIES:
            self._by_name.clear()
        self._by_name[name] = (now + self.ttl, account)
        return account

    def by_uid(self, uid: int) -> Account | None:
        return self.inner.by_uid(uid)


def account_policy(settings: Settings) -> AccountPolicy:
    """The account checks of this daemon.

    As root (the deployment this is built for) the daemon's own uid is refused like uid 0.
    Unprivileged, the daemon can only start user endpoints as itself (single-account mode,
    for trying mep out or a personal server): its own uid is then the one account it
    serves, and ``LoadedSite.check_account`` refuses every other."""
    own = os.geteuid()
    return AccountPolicy(
        min_uid=settings.min_uid,
        daemon_uid=own if own == 0 else None,
        deny=frozenset(settings.deny_accounts),
    )


def single_account_uid() -> int | None:
    """The only uid an unprivileged daemon can serve; None when running as root."""
    own = os.geteuid()
    return None if own == 0 else own


@attrs.frozen
class LoadReport:
    sites: dict[str, LoadedSite]
    problems: tuple[str, ...]


def load_sites(settings: Settings, previous: Mapping[str, LoadedSite] | None = None) -> LoadReport:
    """Load every endpoint's files. With ``previous`` (a reload), a part that fails keeps
    its previous version; without it (a start), an endpoint with a failed part is left
    out and the problem reported."""
    accounts = CachedAccounts(SystemAccountDatabase())
    policy = account_policy(settings)
    problems: list[str] = []
    sites: dict[str, LoadedSite] = {}
    for ep in settings.endpoints:
        old = (previous or {}).get(ep.name)
        parts: dict[str, Any] = {}
        loaders: dict[str, Callable[[], Any]] = {
            "mapping": partial(IdentityMapper.from_file, ep.mapping),
            "policy": partial(Authorizer.from_files, ep.policy_model, ep.policy),
            "template": partial(SiteFiles.from_files, ep.template, ep.schema, ep.environment),
        }
        olds = {
            "mapping": old and old.mapper,
            "policy": old and old.authorizer,
            "template": old and old.files,
        }
        for part, loader in loaders.items():
            try:
                parts[part] = loader()
            except Exception as exc:  # any failure to load keeps the old version in force
                keep = olds[part]
                problems.append(
                    f"endpoint {ep.name}: {part}: {exc}"
                    + ("; the previous version stays in force" if keep is not None else "")
                )
                if keep is not None:
                    parts[part] = keep
        if len(parts) == 3:
            sites[ep.name] = LoadedSite(
                ep, parts["mapping"], parts["policy"], parts["template"], accounts, policy
            )
        elif old is not None:
            sites[ep.name] = old
    return LoadReport(sites, tuple(problems))


# -- the registry behind the pipeline's port ---------------------------------------------


@attrs.define(eq=False)
class HandleAdapter:
    handle: UserEndpointHandle

    def register_function(self, function_id: str, payload: bytes) -> None:
        self.handle.register_function(function_id, payload)

    def dispatch(self, tasks: Sequence[DispatchTask]) -> None:
        self.handle.dispatch(
            [
                (
                    TaskEnvelope(t.task_id, t.function_id, t.payload, t.walltime).to_header(),
                    t.payload,
                )
                for t in tasks
            ]
        )


_STATUS_FIELDS = ("config_key", "endpoint", "state", "pid", "started_at", "idle_since", "in_flight")


@attrs.define
class RegistryEndpoints:
    """Adapts ``mepd.registry.Registry`` to the pipeline's ``UserEndpoints`` port."""

    audit: AuditLog
    # What the user endpoint's executor enforces itself (result size is refused in the
    # worker, before megabytes cross the channel).
    executor_limits: Mapping[str, Any] = attrs.field(factory=dict)
    registry: Registry | None = None
    _adapters: dict[str, HandleAdapter] = attrs.field(factory=dict)

    async def get_or_start(self, spec: StartSpec) -> Handle:
        assert self.registry is not None
        site = spec.site
        assert isinstance(site, LoadedSite)
        files = site.files
        request = StartRequest(
            account=spec.account,
            config_key=spec.config_key,
            template_name=files.template_name,
            template_text=files.template_text,
            includes=files.includes,
            variables=spec.variables,
            identity=Identity.from_mapping(spec.identity) if spec.identity else None,
            user_runtime=spec.user_runtime or None,
            environment=files.environment,
            endpoint=site.name,
            executor_limits=self.executor_limits,
            variable_limits=attrs.asdict(site.variable_limits),
        )
        try:
            handle = await self.registry.get_or_start(request)
        except MepError as exc:
            self.audit.record(
                "uep.start_failed",
                endpoint=site.name,
                account=spec.account.name,
                uid=spec.account.uid,
                config_key=spec.config_key,
                reason=exc.reason,
                detail=exc.detail,
            )
            raise
        adapter = self._adapters.get(handle.id)
        if adapter is None:
            self.audit.record(
                "uep.started",
                endpoint=site.name,
                account=spec.account.name,
                uid=spec.account.uid,
                pid=handle.pid,
                config_key=spec.config_key,
            )
            self._adapters = {
                k: a for k, a in self._adapters.items() if a.handle.state in ("starting", "ready")
            }
            adapter = HandleAdapter(handle)
            self._adapters[handle.id] = adapter
        return adapter

    def status(self, account_name: str | None) -> list[dict[str, Any]]:
        assert self.registry is not None
        return [
            {k: v for k, v in s.to_dict().items() if k in _STATUS_FIELDS}
            for s in self.registry.status(account_name)
        ]

    async def stop(self, account_name: str, endpoint: str, reason: str) -> int:
        assert self.registry is not None
        chosen = [s for s in self.registry.status(account_name) if s.endpoint == endpoint]
        stopped = 0
        for key in {s.config_key for s in chosen}:
            stopped += await self.registry.stop(account_name, key, reason=reason)
        self.audit_stopped(chosen, reason)
        return stopped

    async def introspect(self, account_name: str, endpoint: str) -> list[dict[str, Any]]:
        assert self.registry is not None
        out: list[dict[str, Any]] = []
        for status in self.registry.status(account_name):
            if status.endpoint != endpoint or status.state != "ready":
                continue
            handle = self.registry.get(account_name, status.config_key)
            if handle is None:
                continue
            try:
                answer = await handle.introspect()
            except MepError as exc:  # it went away meanwhile: report, don't fail the call
                answer = {"error": exc.reason}
            out.append({"config_key": status.config_key, "pid": status.pid, "process": answer})
        return out

    def audit_exited(self, handle: UserEndpointHandle, why: str) -> None:
        """Every user endpoint process that ends (idle, crash, stop) leaves an audit line."""
        with contextlib.suppress(AuditUnavailable):
            self.audit.record(
                "uep.exited",
                endpoint=handle.endpoint,
                account=handle.account.name,
                uid=handle.account.uid,
                pid=handle.pid,
                config_key=handle.config_key,
                state=handle.state,
                reason=why,
            )

    def audit_stopped(self, statuses: Sequence[EndpointStatus], reason: str) -> None:
        with contextlib.suppress(AuditUnavailable):
            self.audit.record_many(
                (
                    "uep.stopped",
                    {
                        "endpoint": s.endpoint,
                        "account": s.account,
                        "uid": s.uid,
                        "pid": s.pid,
                        "config_key": s.config_key,
                        "reason": reason,
                    },
                )
                for s in statuses
            )

    def gauge(self) -> Mapping[Labels, float]:
        if self.registry is None:
            return {}
        counts: dict[Labels, float] = {}
        for s in self.registry.status():
            key = labels(state=s.state)
            counts[key] = counts.get(key, 0.0) + 1
        return counts


def registry_limits(settings: Settings) -> RegistryLimits:
    lim = settings.limits
    return RegistryLimits(
        max_per_account=lim.endpoints_per_user,
        max_total=lim.endpoints_total,
        max_concurrent_starts=lim.concurrent_starts,
        start_timeout=lim.start_timeout,
        shutdown_timeout=lim.drain_timeout,
    )


def spawn_settings(settings: Settings) -> SpawnSettings:
    return SpawnSettings.from_mapping(settings.spawn, default_python=settings.python)


# -- the daemon ---------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon drains first, then stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then
    # (without it, Nagle + delayed ACKs add ~40 ms to every keep-alive response).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


@attrs.define
class Daemon:
    settings: Settings
    audit: AuditLog | None = None
    store: TaskStore | None = None
    pipeline: Pipeline | None = None
    registry: Registry | None = None
    endpoints: RegistryEndpoints | None = None
    authenticator: Authenticator | None = None
    server: _Server | None = None
    started: float = 0.0
    _stopping: asyncio.Task[None] | None = None
    _background: list[asyncio.Task[Any]] = attrs.field(factory=list)
    _reloads: int = 0

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        settings = self.settings
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        state.chmod(0o700)
        self.started = time.time()

        audit = AuditLog(settings.audit_path)
        audit.open()
        self.audit = audit
        store = TaskStore.open(state / STORE_FILE, durability=settings.durability)
        self.store = store
        recovery = store.recover(time.time())
        if recovery.lost:
            audit.record_many(
                (
                    "task.finished",
                    {
                        "task_id": t,
                        "status": "failed",
                        "reason": "task.endpoint_lost",
                        "cause": "daemon restart",
                    },
                )
                for t in recovery.lost
            )
        authenticator = Authenticator(
            settings.issuers, state, settings.limits.introspection_cache_entries
        )
        authenticator.load()
        self.authenticator = authenticator
        report = load_sites(settings)
        if report.problems:
            raise SiteConfigError("settings.invalid", "; ".join(report.problems))

        metrics = Metrics()
        endpoints = RegistryEndpoints(
            audit,
            executor_limits={
                "max_result_bytes": settings.limits.max_result_bytes,
                "max_payload_bytes": settings.limits.max_payload_bytes,
            },
        )
        pipeline = Pipeline(
            store=store,
            audit=audit,
            authenticator=authenticator,
            ueps=endpoints,
            limits=settings.limits,
            metrics=metrics,
        )
        pipeline.sites.update(report.sites)
        registry = Registry(
            spawn_settings(settings),
            registry_limits(settings),
            on_result=pipeline.on_result,
            on_lost=pipeline.on_lost,
            on_exit=endpoints.audit_exited,
        )
        endpoints.registry = registry
        self.registry = registry
        self.endpoints = endpoints
        self.pipeline = pipeline
        pipeline.load_pending_counts()
        metrics.gauge("mepd_user_endpoints", "user endpoints by state", endpoints.gauge)
        metrics.gauge(
            "mepd_tasks_pending",
            "tasks accepted and not finished, by account",
            pipeline.pending_by_account,
        )

        sock = _bind(settings.host, settings.port)
        config = uvicorn.Config(
            create_app(pipeline, settings.limits),
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
            timeout_graceful_shutdown=5,
            # Longer than clients keep an idle connection (httpx: 5 s, mep's client: 2 s),
            # so the server never closes one a client is about to reuse.
            timeout_keep_alive=30,
            server_header=False,
        )
        server = _Server(config)
        self.server = server

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")
        admin_path = state / ADMIN_SOCKET
        with contextlib.suppress(FileNotFoundError):
            admin_path.unlink()
        old_umask = os.umask(0o177)
        try:
            admin = await asyncio.start_unix_server(self._admin_client, path=str(admin_path))
        finally:
            os.umask(old_umask)
        admin_path.chmod(0o600)

        port = sock.getsockname()[1]
        audit.record(
            "daemon.started",
            pid=os.getpid(),
            host=settings.host,
            port=port,
            lost_on_restart=len(recovery.lost),
            requeued=len(recovery.queued),
        )
        log.info(
            "daemon.started",
            host=settings.host,
            port=port,
            pid=os.getpid(),
            endpoints=sorted(report.sites),
            lost=len(recovery.lost),
            requeued=len(recovery.queued),
        )
        self._background.append(loop.create_task(self._sweeper()))
        if recovery.queued:
            self._background.append(loop.create_task(pipeline.redispatch(recovery.queued)))

        serving = loop.create_task(server.serve(sockets=[sock]))
        # Readiness: the port file appears only once uvicorn is accepting.
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            _write_private(state / PORT_FILE, f"{port}\n")
        try:
            await serving
        finally:
            admin.close()
            await admin.wait_closed()
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            if self._stopping is not None and not self._stopping.done():
                await self._stopping
            pipeline.flush()
            store.close()
            await authenticator.aclose()
            with contextlib.suppress(FileNotFoundError):
                (state / PORT_FILE).unlink()
            with contextlib.suppress(FileNotFoundError):
                admin_path.unlink()
            with contextlib.suppress(AuditUnavailable):
                audit.record("daemon.stopped", pid=os.getpid())
            audit.close()
            log.info("daemon.stopped")
        return 0

    # -- stop -------------------------------------------------------------------------

    def request_stop(self, why: str) -> None:
        if self._stopping is None:
            log.info("daemon.stop_requested", why=why)
            self._stopping = asyncio.get_running_loop().create_task(self._drain_and_stop())

    async def _drain_and_stop(self) -> None:
        assert self.pipeline is not None
        assert self.registry is not None
        assert self.server is not None
        try:
            left = await self.pipeline.drain(self.settings.limits.drain_timeout)
            log.info("daemon.drained", tasks_left=left)
            running = self.registry.status()
            await self.registry.shutdown()
            if self.endpoints is not None:
                self.endpoints.audit_stopped(running, "daemon shutdown")
            self.pipeline.flush()
        except Exception:
            log.exception("daemon.drain_failed")
        finally:
            self.server.should_exit = True

    # -- reload -----------------------------------------------------------------------

    def _on_sighup(self) -> None:
        result = self.reload()
        log.info("daemon.reloaded", **result)

    def reload(self) -> dict[str, Any]:
        """Load mapping, policy, templates and issuer keys again; failures keep the old."""
        assert self.pipeline is not None
        assert self.authenticator is not None
        self._reloads += 1
        previous = {n: s for n, s in self.pipeline.sites.items() if isinstance(s, LoadedSite)}
        report = load_sites(self.settings, previous)
        problems = list(report.problems)
        try:
            self.authenticator.load()
        except MepError as exc:
            problems.append(f"issuers: {exc}; the previous keys stay in force")
        self.pipeline.sites = dict(report.sites)
        if self.audit is not None:
            with contextlib.suppress(AuditUnavailable):
                self.audit.reopen()
                self.audit.record("daemon.reloaded", problems=problems)
        for problem in problems:
            log.error("daemon.reload_problem", problem=problem)
        return {"ok": not problems, "problems": problems, "endpoints": sorted(report.sites)}

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.pipeline is not None
        assert self.registry is not None
        assert self.store is not None
        return {
            "pid": os.getpid(),
            "started": self.started,
            "draining": self.pipeline.draining,
            "audit_available": self.pipeline.audit.available,
            "reloads": self._reloads,
            "endpoints": sorted(self.pipeline.sites),
            "tasks_in_flight": self.pipeline.inflight_count(),
            "tasks_by_state": self.store.counts_by_state(),
            "user_endpoints": [s.to_dict() for s in self.registry.status()],
        }

    # -- admin socket -------------------------------------------------------------------

    async def _admin_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.getuid()):
                answer: dict[str, Any] = {"ok": False, "error": "not allowed"}
            else:
                line = await asyncio.wait_for(reader.readline(), 10)
                if len(line) > MAX_ADMIN_REQUEST:
                    answer = {"ok": False, "error": "request too large"}
                else:
                    answer = self._admin_command(json.loads(line or b"{}"))
        except (ValueError, TimeoutError, OSError) as exc:
            answer = {"ok": False, "error": str(exc)}
        try:
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    def _admin_command(self, request: Any) -> dict[str, Any]:
        command = request.get("command") if isinstance(request, dict) else None
        if command == "status":
            return {"ok": True, "status": self.status()}
        if command == "reload":
            return self.reload()
        return {"ok": False, "error": f"unknown command {command!r}"}

    # -- retention ----------------------------------------------------------------------

    async def _sweeper(self) -> None:
        assert self.store is not None
        retention = self.settings.limits.result_retention
        period = max(1.0, min(retention / 10, 300.0))
        while True:
            try:
                removed = self.store.sweep(time.time() - retention)
                if removed:
                    log.info("store.results_expired", count=removed)
            except Exception:
                log.exception("store.sweep_failed")
            await asyncio.sleep(period)


def admin_request(state_dir: Path, request: Mapping[str, Any], timeout: float = 30.0) -> Any:
    """Send one admin command to a running daemon and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(state_dir / ADMIN_SOCKET))
        sock.sendall(json.dumps(dict(request)).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > 16 * 1024 * 1024:
                raise ValueError("answer too large")
    return json.loads(data)
