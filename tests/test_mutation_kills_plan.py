"""The spawn plan, pinned where mutation testing (``make mutation``) found it loose.

Every name that changes how the loader, the interpreter or a shell behaves is refused on
its own (not only the few the older tests named); a group id 0 is refused for any
account, not only for root; the limits of names, values and entries hold at their exact
bounds; the settings read every key of the ``spawn`` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mepcore.errors import SpawnError, Violation
from mepcore.spawn import (
    SAFE_PATH,
    ResourceLimits,
    SpawnSettings,
    environment_violations,
    plan_spawn,
)
from mepcore.testing import FakeAccountDatabase
from mepcore.types import Account

SETTINGS = SpawnSettings(python="/opt/mep/bin/python")
DANGEROUS = "changes how programs load or run; refused"
BAD_VALUE = "value must be a string without NUL, at most 32 KiB"


def account(uid: int = 2001, gid: int | None = None, **kwargs: Any) -> Account:
    return FakeAccountDatabase().add("alice", uid, gid, **kwargs)


@pytest.mark.parametrize(
    "key",
    [
        # exact names
        "BASH_ENV",
        "ENV",
        "IFS",
        "CDPATH",
        "GCONV_PATH",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        # prefixes: the dynamic loader, Python, glibc, malloc, exported bash functions, macOS
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
        "PYTHON",
        "GLIBC_TUNABLES",
        "MALLOC_CHECK_",
        "MALLOC_PERTURB_",
        "BASH_FUNC_ls",
        "DYLD_INSERT_LIBRARIES",
    ],
)
def test_each_dangerous_name_is_refused_on_its_own(key: str) -> None:
    assert environment_violations({key: "/tmp/x"}) == [
        Violation(f"$.{key}", DANGEROUS, "dangerous")
    ]
    with pytest.raises(SpawnError) as info:
        plan_spawn(account(), SETTINGS, {key: "/tmp/x"})
    assert info.value.reason == "spawn.settings_invalid"
    assert info.value.detail == f"user_environment is not usable: $.{key}: {DANGEROUS}"


@pytest.mark.parametrize("key", ["HOME", "USER", "LOGNAME", "SHELL"])
def test_each_identity_name_is_reserved(key: str) -> None:
    assert environment_violations({key: "x"}) == [
        Violation(f"$.{key}", "set by the daemon from the account", "reserved")
    ]


@pytest.mark.parametrize(
    "key", ["SCRATCH", "LDFLAGS", "ENVIRONMENT", "MY_LD_PRELOAD", "OMP_NUM_THREADS", "A" * 128]
)
def test_names_that_only_look_alike_are_accepted(key: str) -> None:
    assert environment_violations({key: "v"}) == []
    assert plan_spawn(account(), SETTINGS, {key: "v"}).env[key] == "v"


def test_every_problem_is_reported_with_its_path() -> None:
    problems = environment_violations(
        {"bad-name": 5, "1X": "v", "A" * 129: "v", "LD_PRELOAD": 5, "OK": "a\0b"}
    )
    invalid_name = "not a valid environment variable name"
    assert problems == [
        Violation("$.bad-name", invalid_name),  # its value is not looked at
        Violation("$.1X", invalid_name),
        Violation(f"$.{'A' * 129}", invalid_name),
        Violation("$.LD_PRELOAD", DANGEROUS, "dangerous"),
        Violation("$.LD_PRELOAD", BAD_VALUE),
        Violation("$.OK", BAD_VALUE),
    ]
    with pytest.raises(SpawnError) as info:
        plan_spawn(account(), SETTINGS, {"bad-name": "v", "OK": "a\0b"})
    assert info.value.detail == (
        f"user_environment is not usable: $.bad-name: {invalid_name}; $.OK: {BAD_VALUE}"
    )
    assert list(info.value.violations) == [
        Violation("$.bad-name", invalid_name),
        Violation("$.OK", BAD_VALUE),
    ]


def test_value_and_entry_limits_hold_at_their_bounds() -> None:
    assert environment_violations({"BIG": "x" * 32 * 1024}) == []
    assert environment_violations({"BIG": "x" * (32 * 1024 + 1)}) == [Violation("$.BIG", BAD_VALUE)]
    assert environment_violations({f"V{n}": "v" for n in range(256)}) == []
    assert environment_violations({f"V{n}": "v" for n in range(257)}) == [
        Violation("$", "more than 256 entries")
    ]


@pytest.mark.parametrize(("uid", "gid"), [(2001, 0), (0, 2001), (0, 0)])
def test_group_zero_is_refused_for_any_account(uid: int, gid: int) -> None:
    with pytest.raises(SpawnError) as info:
        plan_spawn(account(uid, gid), SETTINGS, {})
    assert info.value.reason == "spawn.privilege_drop"
    assert info.value.detail == "refusing to plan a user endpoint as root"


def test_low_ids_other_than_zero_are_planned() -> None:
    # Which uids may be served is the identity component's decision (min_uid).
    plan = plan_spawn(account(1, 1), SETTINGS, {})
    assert (plan.uid, plan.gid) == (1, 1)


def test_a_relative_home_is_refused() -> None:
    with pytest.raises(SpawnError) as info:
        plan_spawn(account(home="home/alice"), SETTINGS, {})
    assert info.value.reason == "spawn.launch_failed"
    assert info.value.detail == "home of alice is not absolute"


def test_environment_from_settings_site_and_account() -> None:
    settings = SpawnSettings(python="/p", lang=None, tz="Europe/Paris")
    plan = plan_spawn(account(shell=""), settings, {"SCRATCH": "/scratch"})
    assert dict(plan.env) == {
        "PATH": SAFE_PATH,
        "TZ": "Europe/Paris",
        "SCRATCH": "/scratch",
        "HOME": "/home/alice",
        "USER": "alice",
        "LOGNAME": "alice",
        "SHELL": "/bin/sh",  # an account without a shell gets the POSIX one
    }
    plan = plan_spawn(account(), SETTINGS, {})
    assert (plan.env["LANG"], "TZ" in plan.env) == ("C.UTF-8", False)  # the defaults
    plan = plan_spawn(account(shell="/bin/zsh"), SETTINGS, {"TZ": "UTC", "LANG": "de_DE.UTF-8"})
    assert plan.env["SHELL"] == "/bin/zsh"
    assert (plan.env["TZ"], plan.env["LANG"]) == ("UTC", "de_DE.UTF-8")  # the site decides


def test_the_plan_carries_the_account_and_the_runtime() -> None:
    settings = SpawnSettings(
        python="/opt/py/bin/python",
        package_paths=[Path("/opt/py/lib"), "/opt/mep"],  # type: ignore[arg-type]
        inherit_stderr=True,
        limits=ResourceLimits(nproc=None, nofile=None, address_space=1 << 30, core=None),
    )
    who = account()
    plan = plan_spawn(who, settings, {})
    assert plan.account == who
    assert (plan.python, plan.package_paths) == ("/opt/py/bin/python", ("/opt/py/lib", "/opt/mep"))
    assert plan.inherit_stderr is True
    assert f"--rlimit=RLIMIT_AS={1 << 30}" in plan.argv
    assert plan_spawn(who, SETTINGS, {}).inherit_stderr is False


def test_settings_read_every_key_of_the_spawn_section() -> None:
    settings = SpawnSettings.from_mapping(
        {
            "python": "/opt/py/bin/python",
            "package_paths": [Path("/opt/a"), "/opt/b"],
            "path": "/opt/bin:/usr/bin",
            "lang": "en_GB.UTF-8",
            "tz": "UTC",
            "inherit_stderr": True,
            "limits": {"nproc": 1, "nofile": 2, "address_space": 3, "core": 4},
        },
        default_python="/usr/bin/python3",
    )
    assert (settings.python, settings.package_paths, settings.path) == (
        "/opt/py/bin/python",
        ("/opt/a", "/opt/b"),
        "/opt/bin:/usr/bin",
    )
    assert (settings.lang, settings.tz, settings.inherit_stderr) == ("en_GB.UTF-8", "UTC", True)
    assert settings.limits.items() == (
        ("RLIMIT_NPROC", 1),
        ("RLIMIT_NOFILE", 2),
        ("RLIMIT_AS", 3),
        ("RLIMIT_CORE", 4),
    )


def test_settings_defaults_and_an_explicitly_empty_lang() -> None:
    settings = SpawnSettings.from_mapping({}, default_python="/usr/bin/python3")
    assert settings.python == "/usr/bin/python3"
    assert (settings.package_paths, settings.path) == ((), SAFE_PATH)
    assert (settings.lang, settings.tz, settings.inherit_stderr) == ("C.UTF-8", None, False)
    assert SpawnSettings.from_mapping({"lang": None}, default_python="/p").lang is None


def test_limits_refuse_unknown_names_negative_numbers_and_booleans() -> None:
    with pytest.raises(SpawnError) as info:
        ResourceLimits.from_mapping({"nprocs": 5, "core": 0})
    assert (info.value.reason, info.value.detail) == (
        "spawn.settings_invalid",
        "unknown limits: ['nprocs']",
    )
    for bad in (-1, True, 1.5, "5"):
        with pytest.raises(SpawnError) as info:
            ResourceLimits(nofile=bad)
        assert (info.value.reason, info.value.detail) == (
            "spawn.settings_invalid",
            "nofile must be a non-negative integer",
        )
    assert ResourceLimits(nproc=0, nofile=None).items() == (("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0))
