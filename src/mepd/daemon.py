"""The daemon's lifecycle: open, serve, reload, drain, stop.

``Daemon.open(settings)`` builds the whole daemon before anything is served: it opens the
audit log and the task store (recovering what a crash left: dispatched tasks become
``task.endpoint_lost``, queued ones are held for dispatch again), loads every endpoint's
files (mapping, policy, template), and wires the pipeline, the user-endpoint registry and
the HTTP app. ``Daemon.run()`` then binds the listening socket (its port is written to
``<state_dir>/port`` once uvicorn accepts), serves the API, and answers admin commands
(``status``, ``reload``) on a Unix socket in the state directory (mode 0600, peers must
be root or the daemon's own uid).

- SIGHUP or ``mepd reload``: mapping, policy, template and issuer keys are loaded again;
  a file that fails to load leaves the previous version in force (logged, and reported
  to ``mepd reload``).
- SIGTERM / SIGINT: drain — new work is refused (503), in-flight tasks get
  ``limits.drain_timeout``, user endpoints are stopped by the ladder
  (``Registry.shutdown``), the store is closed cleanly. Started with
  ``keep_endpoints`` (``mepd serve --keep-endpoints``, an in-place upgrade; needs
  ``restart.adopt_endpoints``), SIGTERM closes the API and the store but leaves the
  user endpoints running: they keep their tasks and wait for the next daemon, which
  re-adopts them (``mepd.adoption``).

This module is wiring. It makes no decision of its own: sites are ``mepd.sites``, the
registry's adapter is ``mepd.endpoints``, requests are ``mepd.pipeline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog
import uvicorn

from mepcore.errors import MepError, SiteConfigError, StoreError
from mepcore.spawn import SpawnSettings
from mepd.adoption import SOCKET_DIR, SOCKET_NAME, Adoption, EndpointRecords, Survey, survey
from mepd.api import create_app
from mepd.audit import AuditLog, AuditUnavailable
from mepd.auth import Authenticator, IssuerKeys
from mepd.delivery import Delivery
from mepd.edge import EdgeServer
from mepd.endpoints import RegistryEndpoints, UepAudit
from mepd.inflight import InFlight
from mepd.metrics import Metrics
from mepd.notify import Notifier
from mepd.orphans import sweep_orphan_jobs
from mepd.pam import PamSessions
from mepd.pipeline import Pipeline
from mepd.registry import Registry, RegistryLimits
from mepd.settings import Limits, Settings
from mepd.sites import LoadedSite, load_sites
from mepd.store import Recovery, SweepReport, TaskStore
from mepd.trust import check_settings

log = structlog.get_logger("mepd.daemon")

PORT_FILE = "port"
ADMIN_SOCKET = "admin.sock"
STORE_FILE = "tasks.sqlite3"
MAX_ADMIN_REQUEST = 64 * 1024


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


def tls_problem(settings: Settings) -> str | None:
    """Why the TLS certificate and key cannot be served (None: they can, or no TLS), naming
    the file at fault (``ssl`` alone says "[Errno 2]" without saying which)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    for role, path in (("certificate", settings.tls_cert), ("key", settings.tls_key)):
        try:
            path.open("rb").close()
        except OSError as exc:
            return f"tls: {role} {path}: {exc.strerror or exc}"
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.tls_cert, settings.tls_key
        )
    except (OSError, ssl.SSLError) as exc:
        return f"tls: certificate {settings.tls_cert} with key {settings.tls_key}: {exc}"
    return None


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


def _server_config(settings: Settings, pipeline: Pipeline) -> uvicorn.Config:
    # Served by uvicorn's httptools protocol behind mepd.edge (header and body deadlines,
    # connection caps, EMFILE back-off: see that module for why not another server).
    return uvicorn.Config(
        create_app(pipeline, settings.limits, settings.edge),
        ws="none",
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


def _describe(exc: BaseException) -> str:
    """An error as one line for an administrator: a MepError's detail, else its type."""
    if isinstance(exc, MepError):
        return exc.detail or exc.public_message
    return f"{type(exc).__name__}: {exc}"


def _open_store(path: Path, settings: Settings, audit: AuditLog, fresh: bool) -> TaskStore:
    try:
        store = TaskStore.open(path, durability=settings.durability)
    except StoreError as exc:
        if not fresh:
            raise
        log.warning("store.set_aside", path=str(path), detail=exc.detail)
        audit.record("store.set_aside", path=str(path), detail=exc.detail)
        store = TaskStore.open(path, durability=settings.durability, fresh=True)
    if store.problems:
        # Damaged pages: the daemon runs (damaged records fail one by one), loudly.
        log.error("store.integrity_failed", path=str(path), problems=list(store.problems))
        audit.record("store.integrity_failed", problems=list(store.problems))
    else:
        log.info("store.integrity_checked", path=str(path))
    return store


def _adopt_issuer_names(store: TaskStore, settings: Settings, audit: AuditLog) -> None:
    """Tasks of an introspection issuer were owned under its URL until its configured
    ``issuer`` named it (ownership is ``<issuer>|<subject>``): they move to that name."""
    for issuer in settings.issuers:
        if issuer.type == "introspection" and issuer.url and issuer.issuer != issuer.url:
            try:
                moved = store.rename_owners(f"{issuer.url}|", f"{issuer.issuer}|")
            except StoreError as exc:  # the store says so on every use; start anyway
                log.error("store.owners_not_renamed", issuer=issuer.issuer, detail=exc.detail)
                continue
            if moved:
                audit.record("store.owners_renamed", old=issuer.url, new=issuer.issuer, tasks=moved)


def _recover(store: TaskStore, audit: AuditLog, keep: frozenset[str] = frozenset()) -> Recovery:
    """What a crash left: dispatched tasks are lost (audited) unless their user endpoint
    lives on to be re-adopted (``keep``); queued ones come back."""
    recovery = store.recover(time.time(), keep)
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
    if recovery.damaged:
        audit.record_many(
            (
                "task.finished",
                {
                    "task_id": t,
                    "status": "failed",
                    "reason": "task.record_damaged",
                    "cause": "payload file missing at restart",
                },
            )
            for t in recovery.damaged
        )
    return recovery


@attrs.define
class Daemon:
    """A running daemon's parts, all built by ``Daemon.open``."""

    settings: Settings
    audit: AuditLog
    store: TaskStore
    recovery: Recovery
    authenticator: Authenticator
    sites: dict[str, LoadedSite]
    registry: Registry
    endpoints: RegistryEndpoints
    pipeline: Pipeline
    server: EdgeServer
    started: float
    _stopping: asyncio.Task[None] | None = None
    _background: list[asyncio.Task[Any]] = attrs.field(factory=list)
    _reloads: int = 0
    # systemd's notification socket (mepd.notify); set by serve() from its environment.
    _notifier: Notifier = attrs.field(factory=Notifier)
    # User endpoints of the previous daemon awaiting re-adoption (mepd.adoption).
    adoption: Adoption | None = None
    # SIGTERM leaves the user endpoints running, for the next daemon (an upgrade).
    keep_endpoints: bool = False

    @classmethod
    def open(cls, settings: Settings, *, fresh_store: bool = False) -> Daemon:
        """Open the state, load the files, build every part; nothing is served yet.

        A task store that cannot be used stops the start (``store.invalid``) unless
        ``fresh_store``: then it is set aside and a new one begun. Before anything is
        created or read, every file is checked (rule 8, ``mepd.trust``): one untrusted
        file stops the start (``settings.untrusted_file``, every refusal listed)."""
        trust = check_settings(settings)
        if not trust.ok:
            raise SiteConfigError("settings.untrusted_file", "; ".join(trust.lines()))
        tls = tls_problem(settings)
        if tls is not None:
            raise SiteConfigError("settings.invalid", tls)
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        state.chmod(0o700)
        audit = AuditLog(settings.audit_path)
        audit.open()
        store = _open_store(state / STORE_FILE, settings, audit, fresh_store)
        _adopt_issuer_names(store, settings, audit)
        found = survey(store)
        # Without adoption configured now, live leftovers are stopped, their tasks lost.
        keep = found.keep if settings.restart.adopt_endpoints else frozenset()
        recovery = _recover(store, audit, keep)
        authenticator = Authenticator(
            settings.issuers, state, settings.limits.introspection_cache_entries
        )
        authenticator.load()
        report = load_sites(settings)
        if report.problems:
            raise SiteConfigError("settings.invalid", "; ".join(report.problems))
        daemon = cls._wire(settings, audit, store, recovery, authenticator, report.sites)
        daemon._wire_adoption(found)
        return daemon

    def _wire_adoption(self, found: Survey) -> None:
        restart = self.settings.restart
        socket_path = self.settings.state_dir / SOCKET_DIR / SOCKET_NAME
        if restart.adopt_endpoints:
            # Users reach the socket through the state directory: traverse only.
            self.settings.state_dir.chmod(0o711)
            self.registry.adoption = EndpointRecords(self.store, restart, socket_path)
        self.adoption = Adoption(self.store, self.registry, self.audit, restart, socket_path)
        self.adoption.take_survey(found, self.recovery.held)

    @classmethod
    def _wire(
        cls,
        settings: Settings,
        audit: AuditLog,
        store: TaskStore,
        recovery: Recovery,
        authenticator: Authenticator,
        sites: dict[str, LoadedSite],
    ) -> Daemon:
        metrics, in_flight = Metrics(), InFlight()
        delivery = Delivery(store, audit, in_flight, metrics, settings.limits.max_result_bytes)
        uep_audit = UepAudit(audit)
        registry = Registry(
            spawn_settings(settings),
            registry_limits(settings),
            on_result=delivery.on_result,
            on_lost=delivery.on_lost,
            on_exit=uep_audit.exited,
            in_flight=in_flight,
            sessions=None if settings.pam is None else PamSessions(settings.pam.service),
        )
        endpoints = RegistryEndpoints(
            registry,
            uep_audit,
            sites.get,
            executor_limits={
                "max_result_bytes": settings.limits.max_result_bytes,
                "max_payload_bytes": settings.limits.max_payload_bytes,
            },
        )
        pipeline = Pipeline.create(
            store=store,
            audit=audit,
            authenticator=authenticator,
            ueps=endpoints,
            limits=settings.limits,
            site_of=sites.get,
            delivery=delivery,
        )
        pipeline.hold_queued(recovery.queued)
        metrics.gauge("mepd_user_endpoints", "user endpoints by state", endpoints.gauge)
        server = EdgeServer(_server_config(settings, pipeline), settings.edge)
        return cls(
            settings,
            audit,
            store,
            recovery,
            authenticator,
            sites,
            registry,
            endpoints,
            pipeline,
            server,
            time.time(),
        )

    def run(self) -> int:
        return asyncio.run(self.serve())

    async def serve(self) -> int:
        """Serve until stopped; then close everything this daemon opened."""
        loop = asyncio.get_running_loop()
        sock = _bind(self.settings.host, self.settings.port)
        self._install_signal_handlers(loop)
        admin = await self._start_admin_socket()
        if self.adoption is not None:
            self.adoption.start()
        port = sock.getsockname()[1]
        self._announce_start(port)
        self._prepare_cgroups()
        self._background.append(loop.create_task(self._sweeper()))
        # Batch jobs of user endpoints killed with an earlier daemon (mepd.orphans).
        self._background.append(loop.create_task(sweep_orphan_jobs(self.audit)))
        if self.recovery.queued:
            self._background.append(
                loop.create_task(self.pipeline.redispatch(self.recovery.queued))
            )
        serving = loop.create_task(self.server.serve(sockets=[sock]))
        # Readiness: the port file appears only once uvicorn is accepting.
        while not self.server.started and not serving.done():
            await asyncio.sleep(0.01)
        if self.server.started:
            _write_private(self.settings.state_dir / PORT_FILE, f"{port}\n")
            self._notify_ready(loop, port)
        try:
            await serving
        finally:
            admin.close()
            await admin.wait_closed()
            await self._close()
        return 0

    def _notify_ready(self, loop: asyncio.AbstractEventLoop, port: int) -> None:
        """Tell systemd (Type=notify) that mepd serves; ping its watchdog if it has one."""
        self._notifier = Notifier.from_environment(os.environ)
        self._notifier.ready(f"serving on {self.settings.host}:{port}")
        interval = self._notifier.watchdog_interval
        if interval is not None:
            self._background.append(loop.create_task(self._watchdog(interval)))

    async def _watchdog(self, interval: float) -> None:
        # From the event loop: if the loop hangs, the pings stop and systemd acts.
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    def _prepare_cgroups(self) -> None:
        """Say at start, not at the first request, whether user endpoints get cgroups."""
        try:
            self.registry.cgroups()
        except MepError as exc:  # required and missing: every start will fail, loudly
            log.error("spawn.cgroups_required", detail=exc.detail)

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")

    async def _start_admin_socket(self) -> asyncio.Server:
        admin_path = self.settings.state_dir / ADMIN_SOCKET
        with contextlib.suppress(FileNotFoundError):
            admin_path.unlink()
        old_umask = os.umask(0o177)
        try:
            admin = await asyncio.start_unix_server(self._admin_client, path=str(admin_path))
        finally:
            os.umask(old_umask)
        admin_path.chmod(0o600)
        return admin

    def _announce_start(self, port: int) -> None:
        lost, queued = len(self.recovery.lost), len(self.recovery.queued)
        self.audit.record(
            "daemon.started",
            pid=os.getpid(),
            host=self.settings.host,
            port=port,
            lost_on_restart=lost,
            requeued=queued,
            held_for_adoption=len(self.recovery.held),
            endpoints_awaiting_adoption=0 if self.adoption is None else self.adoption.waiting,
        )
        log.info(
            "daemon.started",
            host=self.settings.host,
            port=port,
            pid=os.getpid(),
            endpoints=sorted(self.sites),
            lost=lost,
            requeued=queued,
        )

    async def _close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._stopping is not None and not self._stopping.done():
            await self._stopping
        if self.adoption is not None:
            await self.adoption.close()
        self.pipeline.delivery.flush()
        await self.pipeline.delivery.settled()  # results committed and announced
        self.store.close()
        await self.authenticator.aclose()
        for name in (PORT_FILE, ADMIN_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                (self.settings.state_dir / name).unlink()
        with contextlib.suppress(AuditUnavailable):
            self.audit.record("daemon.stopped", pid=os.getpid())
        self.audit.close()
        log.info("daemon.stopped")

    # -- stop -------------------------------------------------------------------------

    def request_stop(self, why: str) -> None:
        if self._stopping is None:
            log.info("daemon.stop_requested", why=why)
            self._notifier.stopping(f"draining ({why})")
            self._stopping = asyncio.get_running_loop().create_task(self._drain_and_stop())

    async def _drain_and_stop(self) -> None:
        if self.keep_endpoints:
            await self._release_and_stop()
            return
        try:
            left = await self.pipeline.drain(self.settings.limits.drain_timeout)
            log.info("daemon.drained", tasks_left=left)
            running = self.registry.status()
            await self.registry.shutdown()
            self.endpoints.audit.stopped(running, "daemon shutdown")
            self.pipeline.delivery.flush()
        except Exception:
            log.exception("daemon.drain_failed")
        finally:
            self.server.should_exit = True

    async def _release_and_stop(self) -> None:
        """The upgrade drain: refuse new work, leave the user endpoints running with their
        tasks (still dispatched in the store), flush what has arrived, stop serving."""
        try:
            self.pipeline.draining = True
            released = await self.registry.release()
            self.pipeline.delivery.flush()
            with contextlib.suppress(AuditUnavailable):
                self.audit.record(
                    "daemon.endpoints_kept",
                    endpoints=[s.to_dict() for s in released],
                    tasks_in_flight=self.pipeline.in_flight.dispatched(),
                )
            log.info("daemon.endpoints_kept", count=len(released))
            await self.registry.shutdown()  # what was already stopping
        except Exception:
            log.exception("daemon.drain_failed")
        finally:
            self.server.should_exit = True

    # -- reload -----------------------------------------------------------------------

    def _on_sighup(self) -> None:
        self._notifier.reloading()
        result = self.reload()
        self._notifier.ready("reloaded" if result["ok"] else "reloaded with problems")
        log.info("daemon.reloaded", **result)

    def reload(self) -> dict[str, Any]:
        """Load mapping, policy, templates and issuer keys again — all or nothing.

        The file trust check comes first; then every endpoint's files and every issuer's
        keys are read without putting anything in force. Only when all of it loaded does
        the new configuration replace the old, whole; otherwise the old one stays whole,
        the problems are audited as ``daemon.reload_failed`` and returned."""
        self._reloads += 1
        problems, staged = self._stage_reload()
        if problems or staged is None:
            with contextlib.suppress(AuditUnavailable):
                self.audit.record("daemon.reload_failed", problems=problems)
            for problem in problems:
                log.error("daemon.reload_problem", problem=problem)
            log.error("daemon.reload_failed", kept="the previous configuration, whole")
            return {"ok": False, "problems": problems, "endpoints": sorted(self.sites)}
        sites, keys = staged
        # In place: the pipeline and the registry's adapter look sites up in this dict.
        self.sites.clear()
        self.sites.update(sites)
        self.authenticator.install(keys)
        with contextlib.suppress(AuditUnavailable):
            self.audit.reopen()
            self.audit.record("daemon.reloaded", problems=[])
        return {"ok": True, "problems": [], "endpoints": sorted(sites)}

    def _stage_reload(self) -> tuple[list[str], tuple[dict[str, LoadedSite], IssuerKeys] | None]:
        trust = check_settings(self.settings)
        problems = list(trust.lines())
        if problems:
            return problems, None
        report = load_sites(self.settings)
        problems += report.problems
        missing = sorted({ep.name for ep in self.settings.endpoints} - set(report.sites))
        problems += [f"endpoint {name}: not loaded" for name in missing if not report.problems]
        try:
            keys = self.authenticator.prepare()
        except Exception as exc:  # any failure to read a key keeps the old keys in force
            problems.append(f"issuers: {_describe(exc)}")
            return problems, None
        return problems, (dict(report.sites), keys)

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started": self.started,
            "draining": self.pipeline.draining,
            "audit_available": self.pipeline.audit.available,
            "reloads": self._reloads,
            "endpoints": sorted(self.sites),
            "tasks_in_flight": self.pipeline.in_flight.dispatched(),
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
        if command == "functions":
            return self._functions(request)
        return {"ok": False, "error": f"unknown command {command!r}"}

    def _functions(self, request: dict[str, Any]) -> dict[str, Any]:
        """The registered functions (``mepd functions list``), from the daemon's own store."""
        name, limit = request.get("name"), request.get("limit", 1000)
        if name is not None and not isinstance(name, str):
            return {"ok": False, "error": "name must be a string"}
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            return {"ok": False, "error": "limit must be an integer from 1 to 10000"}
        functions = self.store.list_functions(name=name, limit=limit)
        return {"ok": True, "functions": [attrs.asdict(f) for f in functions]}

    # -- retention ----------------------------------------------------------------------

    async def _sweeper(self) -> None:
        limits = self.settings.limits
        while True:
            try:
                await sweep_store(self.store, limits, self.pipeline.metrics)
            except Exception:
                log.exception("store.sweep_failed")
            await sweep_due(self.store, limits)


def sweep_period(limits: Limits) -> float:
    """Seconds between two retention sweeps: a tenth of the retention, 1 to 300."""
    return max(1.0, min(limits.result_retention / 10, 300.0))


async def sweep_due(store: TaskStore, limits: Limits, poll: float = 1.0) -> None:
    """Until the next sweep is due: ``sweep_period`` has passed, or — checked every
    ``poll`` seconds — the tasks finished since the last sweep (all accounts together)
    reach a tenth of a per-account bound. Without that, an account finishing 9,000
    tasks a second would keep millions more than its bound until the period ended."""
    deadline = time.monotonic() + sweep_period(limits)
    while True:
        await asyncio.sleep(max(0.0, min(poll, deadline - time.monotonic())))
        if time.monotonic() >= deadline or sweep_wanted(store.finished_since_sweep(), limits):
            return


def sweep_wanted(finished: tuple[int, int], limits: Limits) -> bool:
    """Whether the tasks finished since the last sweep, and their bytes, reach a tenth
    of ``retained_tasks_per_user`` or of ``retained_result_bytes_per_user``."""
    tasks, size = finished
    tasks_due = max(1, limits.retained_tasks_per_user // 10)
    bytes_due = max(1, limits.retained_result_bytes_per_user // 10)
    return tasks >= tasks_due or size >= bytes_due


async def sweep_store(
    store: TaskStore, limits: Limits, metrics: Metrics, now: float | None = None
) -> SweepReport:
    """One retention sweep (``TaskStore.retain``: by time, then by size per account)
    in a worker thread: on a big store it takes seconds, and the event loop serves
    meanwhile (the sweep takes the write lock one batch at a time). What it removed is
    logged — an account's early removals once per sweep — and counted."""
    older_than = (time.time() if now is None else now) - limits.result_retention
    report = await asyncio.to_thread(
        store.retain,
        older_than,
        max_tasks=limits.retained_tasks_per_user,
        max_bytes=limits.retained_result_bytes_per_user,
    )
    if report.expired:
        log.info("store.results_expired", count=report.expired)
        metrics.results_expired.inc(report.expired)
    for evicted in report.evicted:
        log.warning(
            "store.results_evicted",
            account=evicted.account,
            count=evicted.tasks,
            bytes=evicted.bytes,
            retained_tasks_per_user=limits.retained_tasks_per_user,
            retained_result_bytes_per_user=limits.retained_result_bytes_per_user,
        )
        metrics.results_evicted.inc(evicted.tasks, account=evicted.account)
        metrics.results_evicted_bytes.inc(evicted.bytes, account=evicted.account)
    return report


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
