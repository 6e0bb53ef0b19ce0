"""The spawn plan: everything about a user endpoint process, decided before it exists.

``plan_spawn(account, settings, environment)`` is pure: it turns an account, the
daemon's spawn settings and the site's ``user_environment.yaml`` mapping into a frozen
``SpawnPlan`` (argv, environment, cwd, uid, gid, every group, umask, resource limits).
The process starts in ``/``: Python's subprocess changes directory *before* it drops
privileges, i.e. as root, so a home that is a symbolic link to a root-only directory
would put the user's process there. The home travels as data (``--home=``) and the user
endpoint enters it itself, once it has proved it cannot regain root. It reads nothing
from the machine — not even ``os.environ``: the interpreter path is
an input (mepd passes its own ``sys.executable`` unless configured otherwise).

The environment is built from an allowlist, never inherited. Callers (remote users)
have no way to add to it: their variables travel in the start message and are only
ever template input. The site's ``user_environment.yaml`` is administrator-written and
trusted, but keys that change how the dynamic loader, the interpreter or ``/bin/sh``
behave (``LD_*``, ``PYTHON*``, ``BASH_ENV``…) and the identity keys (``HOME``,
``USER``…) are refused there too: a typo in a site file must not undo the process
isolation, and failing closed tells the administrator at once.

Deliberately not here: launching (``launcher``) and checking files (``access``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

from mepcore.errors import SpawnError, Violation
from mepcore.spawn.cgroup import CgroupSettings
from mepcore.types import Account

UEP_MODULE = "mepd.uep"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
UMASK = 0o077
# Where the process starts: never a directory root chose for it (see the docstring).
START_DIRECTORY = "/"

# Keys the daemon sets itself from the account; a site file may not override them.
IDENTITY_KEYS = frozenset({"HOME", "USER", "LOGNAME", "SHELL"})
# Keys that change how the loader, the interpreter or a shell behave.
_DANGEROUS_EXACT = frozenset(
    {
        "BASH_ENV",
        "ENV",
        "IFS",
        "CDPATH",
        "GCONV_PATH",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "NLSPATH",
        "RESOLV_HOST_CONF",
    }
)
_DANGEROUS_PREFIXES = ("LD_", "PYTHON", "GLIBC_", "MALLOC_", "BASH_FUNC_", "DYLD_")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_ENTRIES = 256


def _freeze(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


def _str_tuple(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


def _positive_or_none(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise SpawnError("spawn.settings_invalid", f"{attr.name} must be a non-negative integer")


@attrs.frozen
class ResourceLimits:
    """Resource limits set on the user endpoint (soft = hard). None leaves a limit as is.

    ``nproc`` counts every process *and thread* of the account on the machine (that is
    how Linux applies RLIMIT_NPROC), so it must leave room for the engine's workers.
    """

    nproc: int | None = attrs.field(default=512, validator=_positive_or_none)
    nofile: int | None = attrs.field(default=1024, validator=_positive_or_none)
    address_space: int | None = attrs.field(default=None, validator=_positive_or_none)
    core: int | None = attrs.field(default=0, validator=_positive_or_none)

    def items(self) -> tuple[tuple[str, int], ...]:
        """(resource name as in the ``resource`` module, value) for every set limit."""
        pairs = (
            ("RLIMIT_NPROC", self.nproc),
            ("RLIMIT_NOFILE", self.nofile),
            ("RLIMIT_AS", self.address_space),
            ("RLIMIT_CORE", self.core),
        )
        return tuple((name, value) for name, value in pairs if value is not None)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ResourceLimits:
        known = {"nproc", "nofile", "address_space", "core"}
        unknown = set(data) - known
        if unknown:
            raise SpawnError("spawn.settings_invalid", f"unknown limits: {sorted(unknown)}")
        return cls(**{k: data[k] for k in known if k in data})


@attrs.frozen
class SpawnSettings:
    """How the daemon starts user endpoints (a part of the daemon's settings).

    ``python`` is the interpreter the user endpoint runs; it and ``package_paths`` (the
    directories holding mepd, mepcore and their dependencies for that interpreter) must be
    readable by every mapped account — the launcher checks before each spawn.

    ``no_new_privs``: the user endpoint sets PR_SET_NO_NEW_PRIVS on itself before it runs
    anything of the user's, so no setuid program or file capability gains privilege
    below it; turn it off only for sites whose batch scheduler tools are setuid.
    ``cgroup``: the user endpoint's own cgroup and its limits (``mepcore.spawn.cgroup``).
    ``pin_malloc``: the user endpoint pins glibc's malloc thresholds for megabyte payloads
    (``mepd.malloc``); off, it passes ``--keep-malloc`` and keeps glibc's defaults.
    """

    python: str = attrs.field()
    package_paths: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    path: str = SAFE_PATH
    lang: str | None = "C.UTF-8"
    tz: str | None = None
    limits: ResourceLimits = ResourceLimits()
    inherit_stderr: bool = False
    module: str = UEP_MODULE
    no_new_privs: bool = True
    cgroup: CgroupSettings = attrs.field(factory=CgroupSettings)
    pin_malloc: bool = True

    @python.validator
    def _absolute(self, _attr: object, value: str) -> None:
        if not isinstance(value, str) or not value.startswith("/"):
            raise SpawnError("spawn.settings_invalid", "python must be an absolute path")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, default_python: str) -> SpawnSettings:
        """From the ``spawn`` section of the daemon's (already schema-validated) settings."""
        limits = ResourceLimits.from_mapping(data.get("limits") or {})
        return cls(
            python=str(data.get("python") or default_python),
            package_paths=tuple(str(p) for p in data.get("package_paths") or ()),
            path=str(data.get("path") or SAFE_PATH),
            lang=data.get("lang", "C.UTF-8"),
            tz=data.get("tz"),
            limits=limits,
            inherit_stderr=bool(data.get("inherit_stderr", False)),
            no_new_privs=bool(data.get("no_new_privs", True)),
            cgroup=CgroupSettings.from_mapping(data.get("cgroup") or {}),
            pin_malloc=bool(data.get("pin_malloc", True)),
        )


@attrs.frozen
class SpawnPlan:
    """Everything the launcher needs; the launcher adds only the channel descriptor.

    ``cwd`` is where the process starts (``/``); ``home`` is where the user endpoint goes
    once it runs as the account (it is also in argv, ``--home=``).
    """

    argv: tuple[str, ...]
    env: Mapping[str, str] = attrs.field(converter=_freeze)
    cwd: str
    home: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int
    limits: ResourceLimits
    account: Account
    python: str
    package_paths: tuple[str, ...]
    inherit_stderr: bool = False
    no_new_privs: bool = True


def environment_violations(environment: Mapping[str, Any]) -> list[Violation]:
    """Problems with a site ``user_environment`` mapping (empty when it is usable)."""
    problems: list[Violation] = []
    if len(environment) > MAX_ENV_ENTRIES:
        problems.append(Violation("$", f"more than {MAX_ENV_ENTRIES} entries"))
    for key, value in environment.items():
        path = f"$.{key}"
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            problems.append(Violation(path, "not a valid environment variable name"))
            continue
        if key in IDENTITY_KEYS:
            problems.append(Violation(path, "set by the daemon from the account", "reserved"))
        elif key in _DANGEROUS_EXACT or key.startswith(_DANGEROUS_PREFIXES):
            problems.append(
                Violation(path, "changes how programs load or run; refused", "dangerous")
            )
        if not isinstance(value, str) or "\0" in value or len(value) > MAX_ENV_VALUE:
            problems.append(Violation(path, "value must be a string without NUL, at most 32 KiB"))
    return problems


def plan_spawn(
    account: Account, settings: SpawnSettings, environment: Mapping[str, str]
) -> SpawnPlan:
    """The plan for a user endpoint of ``account``. Raises ``SpawnError`` on bad input."""
    problems = environment_violations(environment)
    if problems:
        raise SpawnError(
            "spawn.settings_invalid",
            "user_environment is not usable: "
            + "; ".join(f"{v.path}: {v.message}" for v in problems),
            violations=problems,
        )
    if account.uid == 0 or account.gid == 0:
        # The identity component refuses root already; a second line of defence.
        raise SpawnError("spawn.privilege_drop", "refusing to plan a user endpoint as root")
    if not account.home.startswith("/"):
        raise SpawnError("spawn.launch_failed", f"home of {account.name} is not absolute")
    env: dict[str, str] = {"PATH": settings.path}
    if settings.lang:
        env["LANG"] = settings.lang
    if settings.tz:
        env["TZ"] = settings.tz
    env.update(environment)
    env.update(
        {
            "HOME": account.home,
            "USER": account.name,
            "LOGNAME": account.name,
            "SHELL": account.shell or "/bin/sh",
        }
    )
    groups = tuple(dict.fromkeys((account.gid, *account.group_ids)))
    return SpawnPlan(
        # -I: isolated mode — no PYTHON* variables, no user site-packages, and above all
        # no current directory (the user's home) on sys.path ahead of the installed mepd.
        argv=(
            settings.python,
            "-I",
            "-m",
            settings.module,
            *(f"--rlimit={name}={value}" for name, value in settings.limits.items()),
            *(("--no-new-privs",) if settings.no_new_privs else ()),
            *(() if settings.pin_malloc else ("--keep-malloc",)),
            f"--home={account.home}",
        ),
        env=env,
        cwd=START_DIRECTORY,
        home=account.home,
        uid=account.uid,
        gid=account.gid,
        groups=groups,
        umask=UMASK,
        limits=settings.limits,
        account=account,
        python=settings.python,
        package_paths=settings.package_paths,
        inherit_stderr=settings.inherit_stderr,
        no_new_privs=settings.no_new_privs,
    )
