"""A cgroup of its own for every user endpoint: bounded while it runs, ended as a whole.

Where the machine allows it, each user endpoint lives in a cgroup directory of its own
(``uep-<daemon pid>-<random>``) below a parent directory: ``mep`` below the daemon's own
cgroup (the delegation rule: a process changes only the subtree it lives in), or the
``parent`` of the settings (for a systemd unit with ``Delegate=yes``).

- cgroup v2 is preferred: ``cgroup.kill`` (Linux 5.14) ends everything in it at once,
  otherwise ``cgroup.freeze``; ``pids.max`` and ``memory.max`` bound it when those
  controllers are (or can be) enabled in the parent's ``cgroup.subtree_control``;
- v1 hierarchies fill whatever v2 cannot do (a *hybrid* machine mounts cgroup2 without
  controllers and ``pids``, ``memory``, ``freezer`` as v1): ``pids.max``,
  ``memory.limit_in_bytes``, and the ``freezer`` to end the members without racing
  their forks (freeze, SIGKILL every pid in ``cgroup.procs``, thaw).

Ending a cgroup reaches what the process group and the session cannot: double-forked,
``setsid`` and SIGTERM-ignoring descendants. The daemon moves a new user endpoint into
its directories right after ``Popen`` returns, before it sends the start message; the
user endpoint runs nothing of the user's before that message, so nothing of the user's
ever runs outside (a pre-exec hook is banned, and CLONE_INTO_CGROUP is not reachable
through Python's subprocess).

Every effect goes through ``CgroupPort`` (``mepcore.spawn.cgroup_port``, where
``SystemCgroupPort`` is the real one): which hierarchies are used, the order of the writes
and the stop sequence are tested with an in-memory fake, without root. Leftover
directories of a daemon that died are ended and removed when the next one prepares.

Deliberately not here: systemd transient scopes (D-Bus), cpu and io controllers, and any
decision about *when* to stop an endpoint (the registry's).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import secrets
import signal
from collections.abc import Mapping
from typing import Any

import attrs

from mepcore.errors import SpawnError
from mepcore.spawn.cgroup_port import CgroupPort

ENABLE_CHOICES = ("auto", "true", "false")
PARENT_NAME = "mep"
DEFAULT_PIDS_MAX = 4096
MOUNTINFO = "/proc/self/mountinfo"
SELF_CGROUP = "/proc/self/cgroup"
# The v1 controllers this module uses, in the order they are looked for.
V1_CONTROLLERS = ("freezer", "pids", "memory")
_ENDPOINT_NAME = re.compile(r"uep-([0-9]+)-[0-9a-f]+")
_ADOPTABLE_NAME = re.compile(r"uepa-([0-9]+)-[0-9a-f]+")
_PARENT = re.compile(r"(/[A-Za-z0-9_.@:-]+)+")
_SIZE = re.compile(r"([0-9]+)([KMGT]?)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_KILL_ROUNDS = 8
_FREEZE_POLL = 0.002


def parse_size(value: Any) -> int | None:
    """Bytes from an integer or a string with an optional K/M/G/T suffix (powers of 1024)."""
    if value is None:
        return None
    if type(value) is int and value > 0:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) == 0:
        raise SpawnError(
            "spawn.settings_invalid", f"cgroup size {value!r}: a positive number of bytes"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def _enable(value: Any) -> str:
    # YAML reads `true`/`false` as booleans and `auto` as a string.
    text = ("true" if value else "false") if isinstance(value, bool) else value
    if text not in ENABLE_CHOICES:
        raise SpawnError("spawn.settings_invalid", "cgroup.enable must be auto, true or false")
    return str(text)


def _positive_or_none(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (type(value) is not int or value <= 0):
        raise SpawnError("spawn.settings_invalid", f"cgroup.{attr.name} must be positive")


def _parent_path(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None and (
        not _PARENT.fullmatch(value) or any(p in (".", "..") for p in value.split("/"))
    ):
        raise SpawnError(
            "spawn.settings_invalid",
            "cgroup.parent must be an absolute cgroup path below the root (e.g. /mep)",
        )


@attrs.frozen
class CgroupSettings:
    """The ``spawn.cgroup`` settings.

    ``enable``: ``auto`` uses cgroups where the machine allows them (and says once when it
    does not), ``true`` refuses to start user endpoints without one (and without every
    limit set here), ``false`` never uses them. ``pids_max`` bounds the tasks (processes
    and threads) of one user endpoint, ``memory_max`` its memory in bytes; None leaves
    them unbounded. ``parent`` is the cgroup (a path inside each hierarchy) whose
    children the user endpoints become; by default ``mep`` below the daemon's own.
    """

    enable: str = attrs.field(default="auto", converter=_enable)
    pids_max: int | None = attrs.field(default=DEFAULT_PIDS_MAX, validator=_positive_or_none)
    memory_max: int | None = attrs.field(default=None, validator=_positive_or_none)
    parent: str | None = attrs.field(default=None, validator=_parent_path)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CgroupSettings:
        known = {"enable", "pids_max", "memory_max", "parent"}
        unknown = set(data) - known
        if unknown:
            raise SpawnError(
                "spawn.settings_invalid", f"unknown cgroup settings: {sorted(unknown)}"
            )
        return cls(
            enable=data.get("enable", "auto"),
            pids_max=data.get("pids_max", DEFAULT_PIDS_MAX),
            memory_max=parse_size(data.get("memory_max")),
            parent=data.get("parent"),
        )

    def wanted_limits(self) -> dict[str, int]:
        """Controller name → limit, for the limits that are set."""
        wanted = {"pids": self.pids_max, "memory": self.memory_max}
        return {name: value for name, value in wanted.items() if value is not None}


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@attrs.frozen
class Hierarchy:
    """A mounted cgroup hierarchy and the daemon's own cgroup in it."""

    version: int
    mount: str
    root: str
    controllers: frozenset[str]
    own: str

    def directory(self, cgroup: str) -> str | None:
        """Where the cgroup ``cgroup`` (a path inside the hierarchy) is in the file system;
        None when this mount does not show it."""
        if ".." in cgroup.split("/"):
            return None
        root = self.root.rstrip("/")
        if root and cgroup != root and not cgroup.startswith(root + "/"):
            return None
        inside = cgroup[len(root) :].strip("/")
        return posixpath.join(self.mount, inside) if inside else self.mount

    @property
    def name(self) -> str:
        return "cgroup2" if self.version == 2 else "+".join(sorted(self.controllers))


def discover(mountinfo: str, self_cgroup: str) -> tuple[Hierarchy, ...]:
    """The hierarchies this module can use, from ``/proc/self/mountinfo`` and
    ``/proc/self/cgroup``: the first cgroup2 mount, and the first v1 mount of each of
    ``V1_CONTROLLERS``."""
    v2_own: str | None = None
    v1_own: dict[str, str] = {}
    for line in self_cgroup.splitlines():
        number, _, rest = line.partition(":")
        names, sep, path = rest.partition(":")
        if not sep:
            continue
        if number == "0" and names == "":
            v2_own = path
        for name in names.split(","):
            v1_own.setdefault(name, path)
    found: list[Hierarchy] = []
    taken: set[str] = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        root, mount = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2" and v2_own is not None and "cgroup2" not in taken:
            taken.add("cgroup2")
            found.append(Hierarchy(2, mount, root, frozenset(), v2_own))
        elif tail[0] == "cgroup" and len(tail) > 2:
            controllers = frozenset(tail[2].split(",")) & set(V1_CONTROLLERS)
            own = next((v1_own[c] for c in sorted(controllers) if c in v1_own), None)
            if controllers and own is not None and not controllers & taken:
                taken |= controllers
                found.append(Hierarchy(1, mount, root, controllers, own))
    return tuple(found)


# Files a limit is written to, by hierarchy version and controller.
_LIMIT_FILES = {
    (2, "pids"): "pids.max",
    (2, "memory"): "memory.max",
    (1, "pids"): "pids.max",
    (1, "memory"): "memory.limit_in_bytes",
}


@attrs.frozen
class CgroupDir:
    """One hierarchy's share of the layout: its parent directory and what each user
    endpoint's directory in it gets."""

    hierarchy: Hierarchy
    parent: str
    controllers: tuple[str, ...]
    limits: tuple[tuple[str, str], ...]


@attrs.frozen
class CgroupLayout:
    """Which hierarchies a user endpoint joins, and how its cgroup is ended.

    ``stop`` is ``cgroup.kill`` (v2), ``cgroup.freeze`` (v2), ``freezer.state`` (v1) or
    ``signal`` (SIGKILL every member, repeatedly); it is done in ``dirs[stop_index]``.
    """

    dirs: tuple[CgroupDir, ...]
    stop: str
    stop_index: int
    enforced: frozenset[str]

    def describe(self) -> str:
        where = ", ".join(f"{d.hierarchy.name} at {d.parent}" for d in self.dirs)
        limits = ", ".join(sorted(self.enforced)) or "none"
        return f"{where}; ended with {self.stop}; limits: {limits}"


@attrs.frozen
class CgroupProbe:
    """What ``mepd check`` reports: can user endpoints get a cgroup here, and why not."""

    usable: bool
    detail: str


def _wanted_cgroup(hierarchy: Hierarchy, settings: CgroupSettings) -> str:
    return settings.parent or posixpath.join(hierarchy.own, PARENT_NAME)


def probe_cgroups(settings: CgroupSettings, port: CgroupPort) -> CgroupProbe:
    """A read-only look (nothing is created): is some hierarchy writable for the parent?"""
    if settings.enable == "false":
        return CgroupProbe(False, "disabled by spawn.cgroup.enable: false")
    try:
        hierarchies = discover(port.read(MOUNTINFO), port.read(SELF_CGROUP))
    except OSError as exc:
        return CgroupProbe(False, f"cannot read the cgroup mounts: {exc}")
    seen: list[str] = []
    for hierarchy in sorted(hierarchies, key=lambda h: -h.version):
        parent = hierarchy.directory(_wanted_cgroup(hierarchy, settings))
        if parent is None:
            seen.append(f"{hierarchy.name}: the parent cgroup is outside the mount")
            continue
        existing = parent
        while not port.exists(existing) and existing != hierarchy.mount:
            existing = posixpath.dirname(existing)
        if port.exists(existing) and port.writable(existing):
            return CgroupProbe(True, f"{hierarchy.name} at {parent}")
        seen.append(f"{hierarchy.name}: {existing} is not writable")
    if not hierarchies:
        seen.append("no cgroup hierarchy is mounted")
    return CgroupProbe(False, "no writable cgroup for user endpoints (" + "; ".join(seen) + ")")


def prepare_cgroups(settings: CgroupSettings, port: CgroupPort) -> Cgroups:
    """Find the hierarchies, create the parent directories, enable the v2 controllers the
    limits need, and end what dead daemons left behind.

    ``enable: true`` raises ``spawn.cgroup_failed`` unless every set limit is enforced
    and the cgroup can be ended; ``auto`` returns the best there is, with notes saying
    what is missing (``Cgroups.available`` False when there is nothing).
    """
    if settings.enable == "false":
        return Cgroups(settings, port, None, ("disabled by spawn.cgroup.enable: false",))
    notes: list[str] = []
    try:
        hierarchies = discover(port.read(MOUNTINFO), port.read(SELF_CGROUP))
    except OSError as exc:
        hierarchies = ()
        notes.append(f"cannot read the cgroup mounts: {exc}")
    # What was tried and did not work is worth saying only when something is missing in
    # the end (a hybrid machine has no v2 controllers, but v1 ones that do the job).
    attempts: list[str] = []
    layout = _plan_layout(settings, hierarchies, port, attempts)
    if layout is not None and not _can_create_children(layout, port, attempts):
        layout = None
    missing = sorted(set(settings.wanted_limits()) - (layout.enforced if layout else set()))
    unkillable = layout is not None and layout.stop == "signal"
    if layout is None or missing or unkillable:
        notes += attempts
    notes += [f"{name} limit not enforced: no usable {name} controller" for name in missing]
    if unkillable:
        notes.append("no cgroup.kill and no freezer: members are ended by signals, repeatedly")
    if layout is None:
        notes.append("no writable cgroup for user endpoints")
    if settings.enable == "true" and (layout is None or missing or unkillable):
        Cgroups(settings, port, layout).release()  # the parents made on the way
        raise SpawnError(
            "spawn.cgroup_failed",
            "spawn.cgroup.enable is true but user endpoints cannot be contained: "
            + "; ".join(notes),
        )
    cgroups = Cgroups(settings, port, layout, tuple(notes), hierarchies)
    cgroups.reclaim()
    return cgroups


def _can_create_children(layout: CgroupLayout, port: CgroupPort, notes: list[str]) -> bool:
    """Whether this daemon can make a user endpoint's directory in every part of the
    layout (a parent made earlier by root is there for an unprivileged daemon, but not
    its to write): tried once with a probe directory, removed at once."""
    for cgroup_dir in layout.dirs:
        probe = posixpath.join(cgroup_dir.parent, f"probe-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            port.make_dir(probe)
            port.remove_dir(probe)
        except OSError as exc:
            notes.append(f"cannot create cgroups in {cgroup_dir.parent}: {exc.strerror or exc}")
            return False
    return True


def _plan_layout(
    settings: CgroupSettings,
    hierarchies: tuple[Hierarchy, ...],
    port: CgroupPort,
    notes: list[str],
) -> CgroupLayout | None:
    wanted = settings.wanted_limits()
    dirs: list[CgroupDir] = []
    enforced: set[str] = set()
    stop, stop_index = _plan_v2(settings, hierarchies, port, notes, dirs, enforced), 0
    # v1 hierarchies fill what cgroup2 cannot do: the limits it does not enforce, and the
    # freezer when it has neither cgroup.kill nor cgroup.freeze.
    needed = [c for c in wanted if c not in enforced]
    if not stop:
        needed.insert(0, "freezer")
    for controller in needed:
        index = _plan_v1(controller, settings, hierarchies, port, notes, dirs)
        if index is None:
            continue
        if controller == "freezer":
            stop, stop_index = "freezer.state", index
        else:
            enforced.add(controller)
    if not dirs:
        return None
    return CgroupLayout(tuple(dirs), stop or "signal", stop_index, frozenset(enforced))


def _plan_v2(
    settings: CgroupSettings,
    hierarchies: tuple[Hierarchy, ...],
    port: CgroupPort,
    notes: list[str],
    dirs: list[CgroupDir],
    enforced: set[str],
) -> str:
    """Add the cgroup2 share to ``dirs`` (and the limits it enforces to ``enforced``);
    its stop file (``cgroup.kill``, else ``cgroup.freeze``), "" when it has none."""
    v2 = next((h for h in hierarchies if h.version == 2), None)
    if v2 is None:
        return ""
    made = _make_parent(v2, settings, port, notes)
    if made is None:
        return ""
    wanted = settings.wanted_limits()
    controllers = tuple(c for c in wanted if _enable_v2(port, made, c, notes))
    enforced.update(controllers)
    dirs.append(_cgroup_dir(v2, made, controllers, wanted))
    stops = ("cgroup.kill", "cgroup.freeze")
    return next((name for name in stops if port.exists(posixpath.join(made, name))), "")


def _plan_v1(
    controller: str,
    settings: CgroupSettings,
    hierarchies: tuple[Hierarchy, ...],
    port: CgroupPort,
    notes: list[str],
    dirs: list[CgroupDir],
) -> int | None:
    """Add ``controller`` to the share in ``dirs`` of the v1 hierarchy that has it (made
    when it is not there yet); its index in ``dirs``, None when no hierarchy can."""
    hierarchy = next((h for h in hierarchies if controller in h.controllers), None)
    if hierarchy is None:
        return None
    wanted = settings.wanted_limits()
    existing = next((i for i, d in enumerate(dirs) if d.hierarchy is hierarchy), None)
    if existing is None:
        made = _make_parent(hierarchy, settings, port, notes)
        if made is None:
            return None
        dirs.append(_cgroup_dir(hierarchy, made, (), wanted))
        existing = len(dirs) - 1
    current = dirs[existing]
    controllers = (*current.controllers, controller)
    dirs[existing] = _cgroup_dir(hierarchy, current.parent, controllers, wanted)
    return existing


def _cgroup_dir(
    hierarchy: Hierarchy, parent: str, controllers: tuple[str, ...], wanted: Mapping[str, int]
) -> CgroupDir:
    limits = tuple(
        (_LIMIT_FILES[(hierarchy.version, c)], str(wanted[c]))
        for c in controllers
        if (hierarchy.version, c) in _LIMIT_FILES and c in wanted
    )
    return CgroupDir(hierarchy, parent, controllers, limits)


def _make_parent(
    hierarchy: Hierarchy, settings: CgroupSettings, port: CgroupPort, notes: list[str]
) -> str | None:
    """Create the parent directory in ``hierarchy`` (and what is missing above it)."""
    parent = hierarchy.directory(_wanted_cgroup(hierarchy, settings))
    if parent is None or parent == hierarchy.mount:
        notes.append(f"{hierarchy.name}: the parent cgroup is not below this mount")
        return None
    try:
        _make_dirs(port, hierarchy.mount, parent)
    except OSError as exc:
        notes.append(f"{hierarchy.name}: cannot create {parent}: {exc.strerror or exc}")
        return None
    return parent


def _make_dirs(port: CgroupPort, mount: str, path: str) -> None:
    current = mount
    for part in path[len(mount) :].strip("/").split("/"):
        current = posixpath.join(current, part)
        if not port.exists(current):
            with contextlib.suppress(FileExistsError):
                port.make_dir(current)


def _controllers(port: CgroupPort, directory: str, name: str) -> set[str]:
    return set(port.read(posixpath.join(directory, name)).split())


def _enable_v2(port: CgroupPort, parent: str, controller: str, notes: list[str]) -> bool:
    """Make ``controller`` available to the children of ``parent``: present in the parent's
    ``cgroup.controllers`` (enabled by the level above, which is enabled here if that
    level offers it) and in its ``cgroup.subtree_control``."""
    above = posixpath.dirname(parent)
    try:
        if controller not in _controllers(port, parent, "cgroup.controllers"):
            if controller not in _controllers(port, above, "cgroup.controllers"):
                notes.append(f"cgroup2: the {controller} controller is not available at {above}")
                return False
            port.write(posixpath.join(above, "cgroup.subtree_control"), f"+{controller}")
        if controller not in _controllers(port, parent, "cgroup.subtree_control"):
            port.write(posixpath.join(parent, "cgroup.subtree_control"), f"+{controller}")
    except OSError as exc:
        # EBUSY: the level above has processes of its own (the "no internal processes"
        # rule); the daemon must then run in a leaf, or ``parent`` be set elsewhere.
        notes.append(f"cgroup2: cannot enable {controller} for {parent}: {exc.strerror or exc}")
        return False
    return True


@attrs.define
class Cgroups:
    """The prepared layout; makes one ``EndpointCgroup`` per user endpoint."""

    settings: CgroupSettings
    port: CgroupPort
    layout: CgroupLayout | None
    notes: tuple[str, ...] = ()
    hierarchies: tuple[Hierarchy, ...] = ()

    @property
    def available(self) -> bool:
        return self.layout is not None

    def describe(self) -> str:
        return "no cgroup" if self.layout is None else self.layout.describe()

    def create(self, *, adoptable: bool = False) -> EndpointCgroup:
        """Directories for one new user endpoint, with the limits written; raises
        ``spawn.cgroup_failed`` (nothing is left behind then). An ``adoptable`` endpoint
        outlives its daemon on purpose (re-adoption): its cgroup is named ``uepa-…``, which
        ``reclaim`` never ends (it only removes it once empty)."""
        layout = self.layout
        if layout is None:
            raise SpawnError("spawn.cgroup_failed", "no cgroup is available")
        kind = "uepa" if adoptable else "uep"
        name = f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        made: list[str] = []
        try:
            for cgroup_dir in layout.dirs:
                made.append(self._make_endpoint_dir(cgroup_dir, name))
                for file_name, value in cgroup_dir.limits:
                    self.port.write(posixpath.join(made[-1], file_name), value)
        except OSError as exc:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    self.port.remove_dir(path)
            raise SpawnError(
                "spawn.cgroup_failed", f"creating the cgroup {name} failed: {exc}"
            ) from exc
        return EndpointCgroup(
            name=name,
            paths=tuple(made),
            stop=layout.stop,
            stop_path=made[layout.stop_index],
            port=self.port,
        )

    def _make_endpoint_dir(self, cgroup_dir: CgroupDir, name: str) -> str:
        path = posixpath.join(cgroup_dir.parent, name)
        for attempt in range(3):
            try:
                self.port.make_dir(path)
                return path
            except FileNotFoundError:
                # Another daemon removed the (then empty) parent as it shut down: make it
                # again, with its controllers.
                if attempt == 2:
                    raise
                _make_dirs(self.port, cgroup_dir.hierarchy.mount, cgroup_dir.parent)
                for controller in cgroup_dir.controllers:
                    if cgroup_dir.hierarchy.version == 2:
                        _enable_v2(self.port, cgroup_dir.parent, controller, [])
        raise AssertionError("unreachable")  # pragma: no cover

    def reclaim(self) -> list[str]:
        """End and remove the endpoint cgroups of daemons that are no longer running
        (in every hierarchy, also those the settings no longer use); returns their names.
        A live daemon's (and this one's) are left alone, and so are adoptable endpoints'
        (``uepa-…``, alive after their daemon on purpose): removed only once empty."""
        if self.layout is None:
            return []
        by_name: dict[str, list[str]] = {}
        for hierarchy in self.hierarchies:
            parent = hierarchy.directory(_wanted_cgroup(hierarchy, self.settings))
            if parent is None or parent == hierarchy.mount:
                continue
            for name in self.port.child_dirs(parent):
                match = _ENDPOINT_NAME.fullmatch(name)
                if _ADOPTABLE_NAME.fullmatch(name):
                    with contextlib.suppress(OSError):  # refused while it has members
                        self.port.remove_dir(posixpath.join(parent, name))
                    continue
                if match and not self.port.alive(int(match.group(1))):
                    by_name.setdefault(name, []).append(posixpath.join(parent, name))
        stop_parent = self.layout.dirs[self.layout.stop_index].parent
        for name, paths in by_name.items():
            stop_path = posixpath.join(stop_parent, name)
            leftover = EndpointCgroup(
                name=name,
                paths=tuple(paths),
                stop=self.layout.stop if stop_path in paths else "signal",
                stop_path=stop_path if stop_path in paths else paths[0],
                port=self.port,
            )
            leftover.end(timeout=2.0)
            leftover.remove(timeout=2.0)
        return sorted(by_name)

    def release(self) -> None:
        """Remove the parent directories if no user endpoint uses them (at shutdown); a
        parent still in use by another daemon stays."""
        if self.layout is None:
            return
        for cgroup_dir in self.layout.dirs:
            with contextlib.suppress(OSError):
                self.port.remove_dir(cgroup_dir.parent)


@attrs.define
class EndpointCgroup:
    """The cgroup directories of one user endpoint (one per hierarchy used)."""

    name: str
    paths: tuple[str, ...]
    stop: str
    stop_path: str
    port: CgroupPort
    removed: bool = False

    def attach(self, pid: int) -> None:
        """Move ``pid`` into every directory; raises OSError."""
        for path in self.paths:
            self.port.write(posixpath.join(path, "cgroup.procs"), str(pid))

    def members(self) -> list[int]:
        """The processes in the cgroup now (exited ones, zombies, are not listed)."""
        try:
            text = self.port.read(posixpath.join(self.stop_path, "cgroup.procs"))
        except FileNotFoundError:
            return []
        return [int(line) for line in text.split() if line.isdigit()]

    def end(self, *, timeout: float) -> list[int]:
        """SIGKILL everything in the cgroup and wait until it has gone; returns the pids
        that were ended. Bounded by ``timeout`` and a number of rounds."""
        port = self.port
        deadline = port.monotonic() + timeout
        ended: list[int] = []
        for _ in range(_KILL_ROUNDS):
            pids = self.members()
            if not pids:
                break
            ended += [pid for pid in pids if pid not in ended]
            if self.stop == "cgroup.kill":
                port.write(posixpath.join(self.stop_path, "cgroup.kill"), "1")
            elif self.stop in ("cgroup.freeze", "freezer.state"):
                pids = self._frozen_kill(deadline)
                ended += [pid for pid in pids if pid not in ended]
            else:
                for pid in pids:
                    port.kill(pid, signal.SIGKILL)
            port.wait_gone(pids, max(0.0, deadline - port.monotonic()))
            if port.monotonic() >= deadline:
                break
        return ended

    def _frozen_kill(self, deadline: float) -> list[int]:
        # Frozen, nothing in the cgroup can fork while the members are listed and killed;
        # the kills take effect once it is thawed.
        port = self.port
        v2 = self.stop == "cgroup.freeze"
        state = posixpath.join(self.stop_path, self.stop)
        port.write(state, "1" if v2 else "FROZEN")
        try:
            while port.monotonic() < deadline and not self._frozen():
                port.pause(_FREEZE_POLL)
            pids = self.members()
            for pid in pids:
                port.kill(pid, signal.SIGKILL)
        finally:
            port.write(state, "0" if v2 else "THAWED")
        return pids

    def _frozen(self) -> bool:
        if self.stop == "cgroup.freeze":
            events = self.port.read(posixpath.join(self.stop_path, "cgroup.events"))
            return "frozen 1" in events.splitlines()
        return self.port.read(posixpath.join(self.stop_path, "freezer.state")).strip() == "FROZEN"

    def remove(self, *, timeout: float) -> bool:
        """Remove the directories (ending what is still inside first); True when gone."""
        if self.removed:
            return True
        deadline = self.port.monotonic() + timeout
        left = list(self.paths)
        while left:
            path = left[-1]
            try:
                self.port.remove_dir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY or self.port.monotonic() >= deadline:
                    return False
                self.end(timeout=max(0.0, deadline - self.port.monotonic()))
                self.port.pause(_FREEZE_POLL)
                continue
            left.pop()
        self.removed = True
        return True
