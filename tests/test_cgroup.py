"""The cgroup logic of ``mepcore.spawn.cgroup`` on an in-memory cgroup file system (no root).

``FakeCgroupFs`` behaves like the kernel's cgroup filesystems where it matters here:
interface files appear with a directory, v2 ``cgroup.subtree_control`` accepts only
controllers the directory has and refuses them where processes live (the "no internal
processes" rule), ``cgroup.kill`` kills the subtree, a v1 freezer passes through
FREEZING, signals to a frozen process take effect when it is thawed, and a populated
directory cannot be removed.
"""

from __future__ import annotations

import errno
import posixpath
import signal
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from mepcore.errors import SpawnError
from mepcore.spawn import (
    CgroupSettings,
    discover,
    prepare_cgroups,
    probe_cgroups,
)
from mepcore.spawn.cgroup import parse_size

DAEMON = 100

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_SELF = """\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/abc
1:cpu:/
0::/
"""


class FakeCgroupFs:
    """An in-memory machine: cgroup mounts, directories, files and processes."""

    def __init__(
        self,
        mounts: dict[str, set[str] | None],
        *,
        own: dict[str, str] | None = None,
        v2_controllers: Collection[str] = (),
        kill_file: bool = True,
        read_only: bool = False,
    ) -> None:
        # mount → v1 controllers, or None for cgroup2
        self.mounts = mounts
        self.own = own or {}
        self.kill_file = kill_file
        self.read_only = read_only
        self.files: dict[str, str] = {}
        self.dirs: set[str] = set()
        self.subtree: dict[str, set[str]] = {}
        self.member: dict[str, dict[int, str]] = {m: {} for m in mounts}
        self.alive_pids: set[int] = {DAEMON}
        self.frozen: dict[str, int] = {}  # dir → reads left saying FREEZING
        self.pending: set[int] = set()
        self.writes: list[tuple[str, str]] = []
        self.signals: list[int] = []
        self.clock = 0.0
        for mount in mounts:
            self._create(mount, root_controllers=set(v2_controllers))
            self.member[mount][DAEMON] = self._own_dir(mount)
            if self._own_dir(mount) != mount:
                self._make_dirs(self._own_dir(mount))

    # -- machine set-up helpers

    def _own_dir(self, mount: str) -> str:
        return posixpath.join(mount, self.own.get(mount, "/").strip("/")).rstrip("/")

    def _make_dirs(self, path: str) -> None:
        mount = self.mount_of(path)
        current = mount
        for part in path[len(mount) :].strip("/").split("/"):
            current = posixpath.join(current, part)
            if current not in self.dirs:
                self._create(current)

    def mountinfo(self) -> str:
        lines = []
        for i, (mount, controllers) in enumerate(self.mounts.items()):
            if controllers is None:
                lines.append(f"{40 + i} 31 0:{40 + i} / {mount} rw - cgroup2 cgroup2 rw")
            else:
                opts = ",".join(["rw", *sorted(controllers)])
                lines.append(f"{40 + i} 31 0:{40 + i} / {mount} rw - cgroup cgroup {opts}")
        return "\n".join(lines) + "\n"

    def self_cgroup(self) -> str:
        lines = []
        for i, (mount, controllers) in enumerate(self.mounts.items()):
            own = self.own.get(mount, "/")
            if controllers is None:
                lines.append(f"0::{own}")
            else:
                lines.append(f"{i + 1}:{','.join(sorted(controllers))}:{own}")
        return "\n".join(lines) + "\n"

    def mount_of(self, path: str) -> str:
        return max((m for m in self.mounts if path == m or path.startswith(m + "/")), key=len)

    def is_v2(self, path: str) -> bool:
        return self.mounts[self.mount_of(path)] is None

    def _create(self, path: str, root_controllers: set[str] | None = None) -> None:
        self.dirs.add(path)
        mount = self.mount_of(path)
        names = ["cgroup.procs"]
        if self.is_v2(path):
            if root_controllers is not None:
                available = root_controllers
            else:
                available = self.subtree.get(posixpath.dirname(path), set())
            self.files[posixpath.join(path, "cgroup.controllers")] = " ".join(sorted(available))
            self.subtree[path] = set()
            names += ["cgroup.subtree_control", "cgroup.freeze", "cgroup.events"]
            if self.kill_file and path != mount:
                names.append("cgroup.kill")
            names += [f"{c}.max" for c in available if path != mount]
        else:
            controllers = self.mounts[mount] or set()
            if "pids" in controllers and path != mount:
                names.append("pids.max")
            if "memory" in controllers:
                names.append("memory.limit_in_bytes")
            if "freezer" in controllers and path != mount:
                names.append("freezer.state")
        for name in names:
            self.files.setdefault(posixpath.join(path, name), "")

    def start(self, pid: int, path: str) -> None:
        """A process running in ``path`` (and the root of the other hierarchies)."""
        self.alive_pids.add(pid)
        for mount in self.mounts:
            self.member[mount][pid] = path if self.mount_of(path) == mount else mount

    def members_of(self, path: str) -> set[int]:
        mount = self.mount_of(path)
        return {
            pid
            for pid, where in self.member[mount].items()
            if pid in self.alive_pids and (where == path or where.startswith(path + "/"))
        }

    # -- CgroupPort

    def read(self, path: str) -> str:
        if path.endswith("/proc/self/mountinfo"):
            return self.mountinfo()
        if path.endswith("/proc/self/cgroup"):
            return self.self_cgroup()
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        directory, name = posixpath.split(path)
        if name == "cgroup.procs":
            return "".join(f"{pid}\n" for pid in sorted(self.members_of(directory)))
        if name == "cgroup.subtree_control":
            return " ".join(sorted(self.subtree[directory]))
        if name == "cgroup.controllers" and directory != self.mount_of(directory):
            # What the level above gives this one, as it is now.
            return " ".join(sorted(self.subtree.get(posixpath.dirname(directory), set())))
        if name == "freezer.state":
            if directory not in self.frozen:
                return "THAWED\n"
            if self.frozen[directory] > 0:
                self.frozen[directory] -= 1
                return "FREEZING\n"
            return "FROZEN\n"
        if name == "cgroup.events":
            return f"populated 1\nfrozen {int(directory in self.frozen)}\n"
        return self.files[path]

    def write(self, path: str, text: str) -> None:
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        self.writes.append((path, text))
        directory, name = posixpath.split(path)
        mount = self.mount_of(path)
        if name == "cgroup.procs":
            self.member[mount][int(text)] = directory
        elif name == "cgroup.subtree_control":
            controller = text.removeprefix("+")
            available = self.read(posixpath.join(directory, "cgroup.controllers")).split()
            if controller not in available:
                raise OSError(errno.ENOENT, "controller not available", path)
            if directory != mount and self.members_of(directory) - self._below(directory):
                raise OSError(errno.EBUSY, "device or resource busy", path)
            self.subtree[directory].add(controller)
        elif name == "cgroup.kill":
            self.alive_pids -= self.members_of(directory)
        elif name in ("freezer.state", "cgroup.freeze"):
            if text in ("FROZEN", "1"):
                self.frozen[directory] = 2 if name == "freezer.state" else 0
                self.on_freeze(directory)
            else:
                self.frozen.pop(directory, None)
                self.alive_pids -= self.pending
                self.pending.clear()
        else:
            self.files[path] = text

    def _below(self, directory: str) -> set[int]:
        mount = self.mount_of(directory)
        return {
            pid for pid, where in self.member[mount].items() if where.startswith(directory + "/")
        }

    def on_freeze(self, directory: str) -> None:
        """Hook: what happens as the freezer is set (a test can fork a process here)."""

    def make_dir(self, path: str) -> bool:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only file system", path)
        if path in self.dirs:
            return False
        if posixpath.dirname(path) not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        self._create(path)
        return True

    def remove_dir(self, path: str) -> None:
        if path not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        if self.members_of(path) or any(d.startswith(path + "/") for d in self.dirs):
            raise OSError(errno.EBUSY, "device or resource busy", path)
        self.dirs.discard(path)
        for name in [f for f in self.files if posixpath.dirname(f) == path]:
            del self.files[name]

    def child_dirs(self, path: str) -> list[str]:
        return sorted(posixpath.basename(d) for d in self.dirs if posixpath.dirname(d) == path)

    def exists(self, path: str) -> bool:
        return path in self.dirs or path in self.files

    def writable(self, path: str) -> bool:
        return not self.read_only

    def kill(self, pid: int, sig: int) -> None:
        self.signals.append(pid)
        if sig != signal.SIGKILL or pid not in self.alive_pids:
            return
        if any(pid in self.members_of(directory) for directory in self.frozen):
            self.pending.add(pid)  # dies once thawed
        else:
            self.alive_pids.discard(pid)

    def alive(self, pid: int) -> bool:
        return pid in self.alive_pids

    def wait_gone(self, pids: Collection[int], timeout: float) -> None:
        self.clock += 0.001

    def pause(self, seconds: float) -> None:
        self.clock += seconds

    def monotonic(self) -> float:
        self.clock += 0.0001
        return self.clock


def hybrid() -> FakeCgroupFs:
    """Like this project's CI machine: cgroup2 without controllers, v1 pids/memory/freezer."""
    return FakeCgroupFs(
        {
            "/cg/unified": None,
            "/cg/pids": {"pids"},
            "/cg/freezer": {"freezer"},
            "/cg/memory": {"memory"},
        },
        own={"/cg/memory": "/jobs/abc"},
    )


def test_discover_reads_a_hybrid_machine_and_the_daemon_position() -> None:
    found = {h.name: h for h in discover(HYBRID_MOUNTINFO, HYBRID_SELF)}
    assert set(found) == {"cgroup2", "pids", "freezer", "memory"}
    assert found["cgroup2"].mount == "/sys/fs/cgroup/unified" and found["cgroup2"].own == "/"
    memory = found["memory"]
    assert memory.own == "/process_api/abc"
    assert memory.directory("/process_api/abc/mep") == "/sys/fs/cgroup/memory/process_api/abc/mep"


def test_discover_handles_escapes_container_roots_and_outside_paths() -> None:
    mountinfo = "50 1 0:9 /docker/x /sys/fs/cgroup\\040two rw - cgroup2 cgroup2 rw\n"
    (v2,) = discover(mountinfo, "0::/docker/x/sub\n")
    assert v2.mount == "/sys/fs/cgroup two"
    assert v2.directory("/docker/x/sub/mep") == "/sys/fs/cgroup two/sub/mep"
    assert v2.directory("/other/mep") is None
    assert v2.directory("/docker/x/../y") is None
    assert discover("garbage\n", "also garbage\n") == ()


def test_hybrid_machine_kills_with_cgroup2_and_limits_with_v1() -> None:
    fs = hybrid()
    cgroups = prepare_cgroups(CgroupSettings(pids_max=64, memory_max=1 << 30), fs)
    assert cgroups.available and cgroups.notes == ()
    layout = cgroups.layout
    assert layout is not None and layout.stop == "cgroup.kill"
    assert [d.parent for d in layout.dirs] == [
        "/cg/unified/mep",
        "/cg/pids/mep",
        "/cg/memory/jobs/abc/mep",
    ]
    assert layout.enforced == {"pids", "memory"}  # the freezer is not needed: cgroup.kill is there

    endpoint = cgroups.create()
    name = endpoint.name
    assert name.startswith("uep-")
    assert fs.files[f"/cg/pids/mep/{name}/pids.max"] == "64"
    assert fs.files[f"/cg/memory/jobs/abc/mep/{name}/memory.limit_in_bytes"] == str(1 << 30)
    fs.start(500, "/cg/unified")
    endpoint.attach(500)
    assert {p for p, t in fs.writes if t == "500"} == {f"{d}/cgroup.procs" for d in endpoint.paths}
    # A double-forked, setsid'd child stays in the cgroup wherever its session is.
    fs.start(501, f"/cg/unified/mep/{name}")
    assert endpoint.members() == [500, 501]
    assert sorted(endpoint.end(timeout=1.0)) == [500, 501]
    assert (f"/cg/unified/mep/{name}/cgroup.kill", "1") in fs.writes
    assert fs.alive_pids == {DAEMON}
    assert endpoint.remove(timeout=1.0)
    assert not any(name in d for d in fs.dirs)
    cgroups.release()
    assert not any(d.endswith("/mep") for d in fs.dirs)


def test_pure_cgroup2_enables_its_controllers_for_the_children() -> None:
    fs = FakeCgroupFs({"/cg": None}, v2_controllers=("pids", "memory", "cpu"))
    cgroups = prepare_cgroups(CgroupSettings(pids_max=10, memory_max=4096), fs)
    layout = cgroups.layout
    assert layout is not None and [d.parent for d in layout.dirs] == ["/cg/mep"]
    assert layout.enforced == {"pids", "memory"}
    assert fs.subtree["/cg"] == {"pids", "memory"} == fs.subtree["/cg/mep"]  # not cpu
    endpoint = cgroups.create()
    assert fs.files[f"/cg/mep/{endpoint.name}/pids.max"] == "10"
    assert fs.files[f"/cg/mep/{endpoint.name}/memory.max"] == "4096"


def test_no_internal_processes_rule_leaves_a_limit_unenforced_and_says_why() -> None:
    # The daemon lives in /service (not the root): it cannot give controllers to a
    # subtree of its own cgroup while it is in it.
    fs = FakeCgroupFs({"/cg": None}, own={"/cg": "/service"}, v2_controllers=("pids",))
    fs.subtree["/cg"].add("pids")
    fs.files["/cg/service/cgroup.controllers"] = "pids"
    cgroups = prepare_cgroups(CgroupSettings(pids_max=10), fs)
    assert cgroups.available and cgroups.layout is not None
    assert cgroups.layout.stop == "cgroup.kill" and not cgroups.layout.enforced
    assert any("busy" in note for note in cgroups.notes)
    assert "pids limit not enforced: no usable pids controller" in cgroups.notes
    with pytest.raises(SpawnError) as info:
        prepare_cgroups(CgroupSettings(pids_max=10, enable=True), fs)
    assert info.value.reason == "spawn.cgroup_failed"
    assert "/cg/service/mep" not in fs.dirs  # refused: nothing made is left
    # Without a limit to enforce, the same machine is fine even with enable: true.
    assert prepare_cgroups(CgroupSettings(pids_max=None, enable=True), fs).available


def test_v1_only_freezes_kills_every_member_then_thaws() -> None:
    fs = FakeCgroupFs({"/cg/freezer": {"freezer"}, "/cg/pids": {"pids"}})
    cgroups = prepare_cgroups(CgroupSettings(pids_max=32), fs)
    layout = cgroups.layout
    assert layout is not None and layout.stop == "freezer.state"
    endpoint = cgroups.create()
    here = f"/cg/freezer/mep/{endpoint.name}"
    fs.start(600, here)
    # A process forked just before the freezer took hold is listed and killed too.
    fs.on_freeze = lambda directory: fs.start(601, here)  # type: ignore[method-assign]
    ended = endpoint.end(timeout=1.0)
    assert sorted(ended) == [600, 601]
    state = [(p, t) for p, t in fs.writes if p.endswith("freezer.state")]
    assert state[0][1] == "FROZEN" and state[-1][1] == "THAWED"
    frozen_at = fs.writes.index(state[0])
    thawed_at = fs.writes.index(state[-1])
    assert frozen_at < thawed_at and fs.signals == [600, 601]
    assert fs.alive_pids == {DAEMON}
    assert endpoint.remove(timeout=1.0)


def test_without_kill_or_freezer_members_are_signalled_until_gone() -> None:
    fs = FakeCgroupFs({"/cg/pids": {"pids"}})
    cgroups = prepare_cgroups(CgroupSettings(), fs)
    assert cgroups.layout is not None and cgroups.layout.stop == "signal"
    assert any("signals" in note for note in cgroups.notes)
    endpoint = cgroups.create()
    fs.start(700, f"/cg/pids/mep/{endpoint.name}")
    assert endpoint.end(timeout=1.0) == [700] and fs.alive_pids == {DAEMON}


def test_nothing_writable_is_said_and_refused_only_when_required() -> None:
    fs = FakeCgroupFs({"/cg": None, "/cg1/pids": {"pids"}}, read_only=True)
    cgroups = prepare_cgroups(CgroupSettings(), fs)
    assert not cgroups.available
    assert any("read-only" in note for note in cgroups.notes)
    assert "no writable cgroup for user endpoints" in cgroups.notes
    with pytest.raises(SpawnError) as info:
        prepare_cgroups(CgroupSettings(enable="true"), fs)
    assert info.value.reason == "spawn.cgroup_failed" and "read-only" in info.value.detail
    probe = probe_cgroups(CgroupSettings(), fs)
    assert not probe.usable and "not writable" in probe.detail
    assert probe_cgroups(CgroupSettings(), hybrid()).usable
    assert not probe_cgroups(CgroupSettings(enable=False), hybrid()).usable


def test_disabled_touches_nothing() -> None:
    fs = hybrid()
    before = set(fs.dirs)
    cgroups = prepare_cgroups(CgroupSettings(enable=False), fs)
    assert not cgroups.available and fs.dirs == before and fs.writes == []


def test_a_failed_create_leaves_no_directory() -> None:
    fs = hybrid()
    cgroups = prepare_cgroups(CgroupSettings(pids_max=5), fs)
    before = set(fs.dirs)
    fs.read_only = True
    with pytest.raises(SpawnError) as info:
        cgroups.create()
    assert info.value.reason == "spawn.cgroup_failed"
    assert fs.dirs == before


def test_a_parent_removed_by_another_daemon_is_made_again() -> None:
    fs = FakeCgroupFs({"/cg": None}, v2_controllers=("pids",))
    cgroups = prepare_cgroups(CgroupSettings(pids_max=9), fs)
    fs.remove_dir("/cg/mep")
    endpoint = cgroups.create()
    assert fs.subtree["/cg/mep"] == {"pids"}
    assert fs.files[f"/cg/mep/{endpoint.name}/pids.max"] == "9"


def test_leftovers_of_a_dead_daemon_are_ended_and_removed() -> None:
    fs = hybrid()
    for mount in ("/cg/unified", "/cg/pids", "/cg/memory/jobs/abc"):
        fs._make_dirs(f"{mount}/mep/uep-4242-00ff")
        fs._make_dirs(f"{mount}/mep/uep-{DAEMON}-0abc")  # a live daemon's: kept
    fs.start(900, "/cg/unified/mep/uep-4242-00ff")
    cgroups = prepare_cgroups(CgroupSettings(), fs)
    assert cgroups.reclaim() == []  # already done by prepare
    assert 900 not in fs.alive_pids
    assert not any("uep-4242" in d for d in fs.dirs)
    assert sum("uep-100-0abc" in d for d in fs.dirs) == 3


def test_settings_values() -> None:
    assert parse_size("512M") == 512 << 20 and parse_size(1000) == 1000 and parse_size(None) is None
    for bad in ("0", "1.5G", "-1", 0, True):
        with pytest.raises(SpawnError):
            parse_size(bad)
    assert CgroupSettings(enable=True).enable == "true"
    assert CgroupSettings.from_mapping({}).pids_max == 4096
    with pytest.raises(SpawnError):
        CgroupSettings.from_mapping({"pid_max": 3})
    with pytest.raises(SpawnError):
        CgroupSettings(parent="relative/x")


def test_the_daemon_settings_schema_takes_the_cgroup_section() -> None:
    from mepd.settings import Settings

    base: dict[str, Any] = {
        "state_dir": "/var/lib/mepd",
        "endpoints": [
            {
                "name": "default",
                "template": "t.yaml.j2",
                "mapping": "m.json",
                "policy_model": "model.conf",
                "policy": "policy.csv",
            }
        ],
    }
    good = {
        **base,
        "spawn": {
            "no_new_privs": False,
            "cgroup": {"enable": "auto", "pids_max": 100, "memory_max": "4G", "parent": "/mep"},
        },
    }
    settings = Settings.from_mapping(good, base_dir=Path("/etc/mepd"))
    assert settings.spawn["cgroup"]["memory_max"] == "4G"
    bad = {**base, "spawn": {"cgroup": {"enable": "sometimes"}}}
    with pytest.raises(Exception) as info:
        Settings.from_mapping(bad, base_dir=Path("/etc/mepd"))
    assert "enable" in str(info.value)
