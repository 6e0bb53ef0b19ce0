"""The pure spawn plan and the readability check, with fakes (no root, no processes)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mepcore.errors import SpawnError
from mepcore.spawn import (
    IDENTITY_KEYS,
    ResourceLimits,
    SpawnSettings,
    check_runtime_readable,
    environment_violations,
    permits,
    plan_spawn,
    unreachable_reason,
)
from mepcore.testing import FakeAccountDatabase

ALLOWED = {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "TZ"}


def alice():  # type: ignore[no-untyped-def]
    db = FakeAccountDatabase()
    return db.add("alice", 2001, 2001, groups=[("lab", 3000), ("gpu", 3001)], home="/home/alice")


SETTINGS = SpawnSettings(
    python="/opt/mep/venv/bin/python", limits=ResourceLimits(nproc=100, nofile=200)
)


def test_plan_has_identity_groups_umask_cwd_and_limits() -> None:
    plan = plan_spawn(alice(), SETTINGS, {})
    assert plan.uid == 2001 and plan.gid == 2001
    assert plan.groups == (2001, 3000, 3001)
    assert plan.umask == 0o077
    # The process starts in "/" (subprocess changes directory as root, before the drop);
    # the home is data, entered by the user endpoint as the user.
    assert plan.cwd == "/" and plan.home == "/home/alice"
    assert plan.argv[:4] == ("/opt/mep/venv/bin/python", "-I", "-m", "mepd.uep")
    assert plan.argv[-1] == "--home=/home/alice"
    assert "--no-new-privs" in plan.argv and plan.no_new_privs
    assert "--keep-malloc" not in plan.argv  # the user endpoint pins malloc by default
    assert "--rlimit=RLIMIT_NPROC=100" in plan.argv and "--rlimit=RLIMIT_NOFILE=200" in plan.argv
    assert dict(plan.limits.items()) == {
        "RLIMIT_NPROC": 100,
        "RLIMIT_NOFILE": 200,
        "RLIMIT_CORE": 0,
    }
    assert plan.env["HOME"] == "/home/alice" and plan.env["USER"] == plan.env["LOGNAME"] == "alice"
    assert set(plan.env) <= ALLOWED


def test_site_environment_is_added_but_cannot_touch_identity_or_loader() -> None:
    plan = plan_spawn(alice(), SETTINGS, {"SCRATCH": "/scratch", "PATH": "/opt/bin:/usr/bin"})
    assert plan.env["SCRATCH"] == "/scratch" and plan.env["PATH"] == "/opt/bin:/usr/bin"
    for key in (
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "BASH_ENV",
        "HOME",
        "USER",
        "GLIBC_TUNABLES",
        "bad-name",
    ):
        with pytest.raises(SpawnError) as info:
            plan_spawn(alice(), SETTINGS, {key: "/tmp/x"})
        assert info.value.reason == "spawn.settings_invalid"
        assert info.value.violations and info.value.violations[0].path == f"$.{key}"


@given(st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=6))
def test_no_environment_can_inject_loader_or_interpreter_variables(env: dict[str, str]) -> None:
    try:
        plan = plan_spawn(alice(), SETTINGS, env)
    except SpawnError:
        assert environment_violations(env)
        return
    for key in plan.env:
        assert not key.startswith(("LD_", "PYTHON")), key
    for key in IDENTITY_KEYS:
        assert plan.env[key] == plan_spawn(alice(), SETTINGS, {}).env[key]


def test_root_account_is_refused_even_here() -> None:
    root = FakeAccountDatabase().add("root", 0, 0, home="/root")
    with pytest.raises(SpawnError) as info:
        plan_spawn(root, SETTINGS, {})
    assert info.value.reason == "spawn.privilege_drop"


def test_settings_validation() -> None:
    with pytest.raises(SpawnError):
        SpawnSettings(python="python3")
    with pytest.raises(SpawnError):
        ResourceLimits(nproc=-1)
    with pytest.raises(SpawnError):
        ResourceLimits.from_mapping({"nprocs": 5})
    settings = SpawnSettings.from_mapping(
        {"limits": {"nproc": 7}}, default_python="/usr/bin/python3"
    )
    assert settings.python == "/usr/bin/python3" and settings.limits.nproc == 7
    assert settings.no_new_privs and settings.cgroup.enable == "auto"
    assert settings.pin_malloc


def test_no_new_privs_and_cgroup_settings_come_from_the_mapping() -> None:
    settings = SpawnSettings.from_mapping(
        {"no_new_privs": False, "cgroup": {"enable": True, "pids_max": 50, "memory_max": "2G"}},
        default_python="/usr/bin/python3",
    )
    assert not settings.no_new_privs
    assert settings.cgroup.enable == "true" and settings.cgroup.pids_max == 50
    assert settings.cgroup.memory_max == 2 << 30
    plan = plan_spawn(alice(), settings, {})
    assert "--no-new-privs" not in plan.argv and not plan.no_new_privs


def test_pin_malloc_off_asks_the_user_endpoint_to_keep_glibcs_defaults() -> None:
    from mepd.uep.entry import _parse

    settings = SpawnSettings.from_mapping({"pin_malloc": False}, default_python="/usr/bin/python3")
    plan = plan_spawn(alice(), settings, {})
    assert not settings.pin_malloc and "--keep-malloc" in plan.argv
    # What the user endpoint makes of the two argument lists (the launcher adds the fd).
    assert _parse([*plan.argv[4:], "--channel-fd", "3"]).keep_malloc
    default = plan_spawn(alice(), SETTINGS, {})
    assert not _parse([*default.argv[4:], "--channel-fd", "3"]).keep_malloc
    for bad in ({"enable": "yes"}, {"pids_max": 0}, {"memory_max": "2X"}, {"parent": "../x"}):
        with pytest.raises(SpawnError) as info:
            SpawnSettings.from_mapping({"cgroup": bad}, default_python="/usr/bin/python3")
        assert info.value.reason == "spawn.settings_invalid"


def fake_stat(uid: int, gid: int, mode: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("owner", "group", "mode", "want", "expected"),
    [
        (2001, 9, 0o700, 7, True),  # owner bits
        (5, 3000, 0o070, 5, True),  # through a supplementary group
        (5, 9, 0o775, 1, True),  # other bits
        (5, 9, 0o770, 1, False),
        (2001, 3000, 0o077, 4, False),  # the owner class decides, even if group would allow
        (5, 3000, 0o705, 4, False),  # the group class decides, even if other would allow
    ],
)
def test_permits_follows_the_posix_class_rules(
    owner: int, group: int, mode: int, want: int, expected: bool
) -> None:
    assert permits(fake_stat(owner, group, mode), 2001, [2001, 3000], want) is expected


@pytest.fixture
def open_dir():  # type: ignore[no-untyped-def]
    """A temporary directory every account can reach (pytest's tmp_path may be private)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as name:
        yield Path(name)


def test_unreachable_reason_walks_symlinks(open_dir: Path) -> None:
    tmp_path = open_dir
    private = tmp_path / "private"
    private.mkdir()
    (private / "python").write_text("#!/bin/sh\n")
    (private / "python").chmod(0o755)
    public = tmp_path / "public"
    public.mkdir()
    (public / "python").symlink_to(private / "python")
    tmp_path.chmod(0o755)
    me = os.getuid()
    nobody = 65534 if me != 65534 else 65533
    private.chmod(0o700)
    assert unreachable_reason(str(public / "python"), me, [os.getgid()], 1) is None
    reason = unreachable_reason(str(public / "python"), nobody, [nobody], 1)
    assert reason is not None and str(private) in reason
    private.chmod(0o755)
    assert unreachable_reason(str(public / "python"), nobody, [nobody], 1) is None
    with pytest.raises(SpawnError) as info:
        check_runtime_readable(
            str(public / "python"),
            [str(tmp_path / "missing")],
            uid=nobody,
            gids=[nobody],
            account="n",
        )
    assert info.value.reason == "spawn.interpreter_unreadable"
    assert "missing" in info.value.detail
