"""File trust (security rule 8): may root read, load or execute this file?

Like sshd's ``StrictModes`` and sudo's checks on sudoers. A file root acts on must be
owned by root (or by the daemon's own uid, when it runs unprivileged) and must not be
writable by its group or by others — and so must every directory on the way to it, up
to ``/``. A shared sticky directory (``/tmp``, ``/var/tmp``: mode 1777) is refused too,
for anything root opens by name: anyone may create a name there before root does.
Secrets (private keys, client secrets) must also not be readable by group or others.
Symbolic links are followed component by component, as the kernel does: the link
(owned by a trusted uid) and everything its target resolves through are checked.

Two layers:

- ``check_path`` and ``check_tree`` are pure logic over a small ``FileSystem`` port
  (``lstat``, ``readlink``, ``listdir``, names of uids and gids), so they are tested
  with a fake file system, without root;
- ``check_settings(settings)`` is the *one* function ``mepd check``, ``Daemon.open`` and
  ``Daemon.reload`` call: it lists what the settings make root read, load or execute —
  the settings file; each endpoint's mapping documents, the external mapping programs
  they name and the interpreters on those programs' ``#!`` lines, Casbin model and
  policies, decision tables, template with its ``*.j2`` includes, schema and
  environment; issuer key and secret files; TLS certificate and key; the user endpoint
  runtime (interpreter, ``pyvenv.cfg``, every ``sys.path`` entry and everything below
  it, every ``.pth`` file); the state directory; the audit log and its directory — and
  checks each. Some of that list is only known after reading a file already found
  trustworthy (a mapping document names its programs, a program names its
  interpreter, the runtime names its ``sys.path``): a file is read only after it
  passed.

A failure is an ``Untrusted`` value: the file the settings name, the component at
fault, its owner and mode, a stable ``cause`` and the reason code
``settings.untrusted_file``; ``str()`` says how to fix it. A path that does not exist
is checked up to its nearest existing directory (the state directory and the audit log
are created by the daemon; a missing mapping file is the loader's problem to report).

Deliberately not here: POSIX ACLs (a write permission granted only by an ACL is not
seen, as with sshd), files that the programs root runs read on their own (the system's
PAM, NSS and shell configuration), and loading anything.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs

from mepd.runtime import RuntimePaths, probe_runtime_paths

if TYPE_CHECKING:
    from mepd.settings import EndpointSettings, Settings

REASON = "settings.untrusted_file"

# Stable causes, part of the message and of ``Untrusted.cause``.
OWNER = "owner"  # not owned by root or the daemon's uid
WRITABLE = "writable"  # writable by group or others
SHARED_DIRECTORY = "shared_directory"  # sticky and world-writable: /tmp
SECRET_READABLE = "secret_readable"  # noqa: S105 - a cause, not a password
UNEXAMINABLE = "unexaminable"  # lstat/readlink/listdir failed (not: does not exist)
LINK_LOOP = "link_loop"  # too many symbolic links
TOO_MANY_FILES = "too_many_files"  # a tree larger than MAX_TREE_ENTRIES

MAX_LINK_HOPS = 40  # as the kernel's MAXSYMLINKS
MAX_TREE_ENTRIES = 500_000  # a runtime has ~10k; more is a mistake, refused not walked
MAX_SHEBANG_DEPTH = 4  # as the kernel's binfmt_script recursion
SHEBANG_BYTES = 256  # the kernel reads at most this much of a #! line
INCLUDE_SUFFIX = ".j2"
MAX_MAPPING_BYTES = 4 * 1024 * 1024  # as IdentityMapper.from_file
MAX_PTH_BYTES = 1024 * 1024  # SiteFiles.from_files reads every *.j2 next to the template


class FileSystem(Protocol):
    """What the check needs of the file system (a fake one in tests)."""

    def lstat(self, path: str) -> os.stat_result: ...

    def readlink(self, path: str) -> str: ...

    def listdir(self, path: str) -> list[str]: ...

    def read(self, path: str, limit: int) -> bytes:
        """At most ``limit`` bytes from the start of a file (only ever one that passed)."""
        ...

    def user_name(self, uid: int) -> str | None: ...

    def group_name(self, gid: int) -> str | None: ...


class SystemFileSystem:
    """This machine's file system."""

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(path)

    def readlink(self, path: str) -> str:
        return os.readlink(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read(self, path: str, limit: int) -> bytes:
        with open(path, "rb") as handle:
            return handle.read(limit)

    def user_name(self, uid: int) -> str | None:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return None

    def group_name(self, gid: int) -> str | None:
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return None


@attrs.define
class _MemoFileSystem:
    """One check run looks at ``/``, ``/usr``… hundreds of times: ask once."""

    inner: FileSystem
    _stats: dict[str, os.stat_result | OSError] = attrs.field(factory=dict)

    def lstat(self, path: str) -> os.stat_result:
        found = self._stats.get(path)
        if found is None:
            try:
                found = self.inner.lstat(path)
            except OSError as exc:
                found = exc
            self._stats[path] = found
        if isinstance(found, OSError):
            raise found
        return found

    def readlink(self, path: str) -> str:
        return self.inner.readlink(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def read(self, path: str, limit: int) -> bytes:
        return self.inner.read(path, limit)

    def user_name(self, uid: int) -> str | None:
        return self.inner.user_name(uid)

    def group_name(self, gid: int) -> str | None:
        return self.inner.group_name(gid)


@attrs.frozen
class Need:
    """One path root will act on, and why (``role``).

    ``area`` says what the file belongs to — ``settings``, ``endpoint`` (then
    ``endpoint`` names it), ``issuers``, ``tls``, ``runtime``, ``state``, ``audit`` — so
    ``mepd check`` can leave out of its further checks what it must not read."""

    path: str
    role: str
    area: str
    endpoint: str | None = None
    secret: bool = False


@attrs.frozen
class Untrusted:
    """One refusal: ``need.path`` cannot be trusted because of ``culprit``."""

    need: Need
    culprit: str
    cause: str
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    owner: str | None = None  # the owner's name, when known
    group: str | None = None
    detail: str = ""  # for UNEXAMINABLE: the error
    reason: str = REASON

    def why(self) -> str:
        """The culprit, its owner and mode, what is wrong and how to fix it."""
        facts = ""
        if self.uid is not None and self.mode is not None:
            who = f"{self.owner}({self.uid})" if self.owner else f"uid {self.uid}"
            facts = f" (owner {who}, mode {stat.S_IMODE(self.mode):04o})"
        group = f"group {self.group}" if self.group else f"group {self.gid}"
        text = {
            OWNER: "is not owned by root or the daemon's account: chown "
            + ("-h " if stat.S_ISLNK(self.mode or 0) else "")
            + f"root:root {self.culprit}",
            WRITABLE: self._writable_text(group),
            SHARED_DIRECTORY: "is a shared directory (sticky, writable by everyone, like "
            "/tmp) where anyone can create or replace names: move the file to a "
            "directory only root can write (e.g. /etc/mepd, /opt, /var/lib/mepd)",
            SECRET_READABLE: f"is a secret readable by {self._readers(group)}: "
            f"chmod go-rwx {self.culprit}",
            UNEXAMINABLE: f"cannot be examined: {self.detail}",
            LINK_LOOP: "has too many levels of symbolic links",
            TOO_MANY_FILES: f"holds more than {MAX_TREE_ENTRIES} files: not verified",
        }[self.cause]
        return f"{self.culprit}{facts} {text}"

    def _writable_text(self, group: str) -> str:
        mode = self.mode or 0
        by = []
        if mode & stat.S_IWGRP:
            by.append(group)
        if mode & stat.S_IWOTH:
            by.append("everyone")
        return f"is writable by {' and '.join(by)}: chmod go-w {self.culprit}"

    def _readers(self, group: str) -> str:
        mode = self.mode or 0
        by = []
        if mode & stat.S_IRGRP:
            by.append(group)
        if mode & stat.S_IROTH:
            by.append("everyone")
        return " and ".join(by)

    def __str__(self) -> str:
        where = "" if self.culprit == self.need.path else f" {self.need.path}"
        return f"{self.reason}: {self.need.role}{where}: {self.why()}"


@attrs.frozen
class Checker:
    """The check of one daemon: which uids are trusted, on which file system."""

    trusted_uids: frozenset[int]
    fs: FileSystem

    @classmethod
    def for_daemon(cls, euid: int | None = None, fs: FileSystem | None = None) -> Checker:
        """Root, and the daemon's own uid (single-account mode)."""
        uid = os.geteuid() if euid is None else euid
        return cls(frozenset({0, uid}), _MemoFileSystem(fs or SystemFileSystem()))

    def _refusal(self, need: Need, path: str, st: os.stat_result, cause: str) -> Untrusted:
        return Untrusted(
            need,
            path,
            cause,
            uid=st.st_uid,
            gid=st.st_gid,
            mode=st.st_mode,
            owner=self.fs.user_name(st.st_uid),
            group=self.fs.group_name(st.st_gid),
        )

    def judge(self, need: Need, path: str, st: os.stat_result, *, final: bool) -> list[Untrusted]:
        """What is wrong with one component ``path`` (its lstat is ``st``)."""
        found = []
        mode = st.st_mode
        if st.st_uid not in self.trusted_uids:
            found.append(self._refusal(need, path, st, OWNER))
        if stat.S_ISLNK(mode):
            return found  # a link's own mode means nothing; its owner does
        shared = stat.S_ISDIR(mode) and mode & stat.S_ISVTX and mode & stat.S_IWOTH
        if shared:
            found.append(self._refusal(need, path, st, SHARED_DIRECTORY))
        elif mode & (stat.S_IWGRP | stat.S_IWOTH):
            found.append(self._refusal(need, path, st, WRITABLE))
        if final and need.secret and mode & (stat.S_IRGRP | stat.S_IROTH):
            found.append(self._refusal(need, path, st, SECRET_READABLE))
        return found

    def check_path(self, need: Need) -> tuple[list[Untrusted], str | None]:
        """Walk ``need.path`` from ``/``, following links hop by hop; every component
        judged. Returns the refusals and the path it resolves to (None when it does not
        exist — then only what exists on the way was judged)."""
        path = need.path
        if not path.startswith("/"):
            path = os.path.abspath(path)
        found: list[Untrusted] = []
        parts: deque[str] = deque(_components(path))
        current = "/"
        try:
            found += self.judge(need, "/", self.fs.lstat("/"), final=not parts)
        except OSError as exc:
            return [Untrusted(need, "/", UNEXAMINABLE, detail=_os_error(exc))], None
        hops = 0
        while parts:
            name = parts.popleft()
            if name == "..":
                current = os.path.dirname(current) or "/"
                continue
            candidate = os.path.join(current, name)
            try:
                st = self.fs.lstat(candidate)
            except FileNotFoundError:
                return found, None
            except OSError as exc:
                found.append(Untrusted(need, candidate, UNEXAMINABLE, detail=_os_error(exc)))
                return found, None
            found += self.judge(need, candidate, st, final=not parts)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    found.append(Untrusted(need, path, LINK_LOOP))
                    return found, None
                try:
                    target = self.fs.readlink(candidate)
                except OSError as exc:
                    found.append(Untrusted(need, candidate, UNEXAMINABLE, detail=_os_error(exc)))
                    return found, None
                if target.startswith("/"):
                    current = "/"
                parts.extendleft(reversed(_components(target)))
                if not parts:  # a link to "/" itself
                    found += self.judge(need, "/", self.fs.lstat("/"), final=True)
                continue
            if parts and not stat.S_ISDIR(st.st_mode):
                return found, None  # ENOTDIR: the loader reports it
            current = candidate
        return found, current

    def check_tree(self, need: Need) -> list[Untrusted]:
        """``check_path``, then every entry below the directory it resolves to (links
        inside checked as paths of their own, linked directories walked once)."""
        found, top = self.check_path(need)
        if top is None:
            return found
        seen: set[tuple[int, int]] = set()
        budget = [MAX_TREE_ENTRIES]
        found += self._walk(need, top, seen, budget)
        return found

    def _walk(
        self, need: Need, top: str, seen: set[tuple[int, int]], budget: list[int]
    ) -> list[Untrusted]:
        found: list[Untrusted] = []
        try:
            st = self.fs.lstat(top)
        except OSError:
            return found
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            return found
        seen.add((st.st_dev, st.st_ino))
        pending = [top]
        while pending:
            directory = pending.pop()
            try:
                names = sorted(self.fs.listdir(directory))
            except OSError as exc:
                found.append(Untrusted(need, directory, UNEXAMINABLE, detail=_os_error(exc)))
                continue
            for name in names:
                budget[0] -= 1
                if budget[0] < 0:
                    return [*found, Untrusted(need, top, TOO_MANY_FILES)]
                path = os.path.join(directory, name)
                try:
                    entry = self.fs.lstat(path)
                except OSError as exc:
                    found.append(Untrusted(need, path, UNEXAMINABLE, detail=_os_error(exc)))
                    continue
                found += self.judge(need, path, entry, final=True)
                if stat.S_ISDIR(entry.st_mode):
                    if (entry.st_dev, entry.st_ino) not in seen:
                        seen.add((entry.st_dev, entry.st_ino))
                        pending.append(path)
                elif stat.S_ISLNK(entry.st_mode):
                    more, target = self.check_path(attrs.evolve(need, path=path))
                    found += [attrs.evolve(u, need=need) for u in more]
                    if target is not None:
                        found += self._walk(need, target, seen, budget)
        return found


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)


# -- what the settings make root read, load or execute -----------------------------------


RuntimeProbe = Callable[[str, bool], RuntimePaths]
"""``probe(python, with_site)``: ``sys.path`` without (``-S``) or with site processing."""


@attrs.frozen
class TrustReport:
    """Every refusal of one check."""

    problems: tuple[Untrusted, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per refusal (the same culprit for the same file once)."""
        return list(dict.fromkeys(str(u) for u in self.problems))

    def areas(self) -> frozenset[str]:
        return frozenset(u.need.area for u in self.problems)

    def endpoints(self) -> frozenset[str]:
        """Endpoints with at least one untrusted file."""
        return frozenset(u.need.endpoint for u in self.problems if u.need.endpoint)

    def trusted_settings(self, settings: Settings) -> Settings:
        """``settings`` without the endpoints that have an untrusted file: what may be
        loaded (an untrusted file is not even read)."""
        bad = self.endpoints()
        return attrs.evolve(
            settings, endpoints=tuple(ep for ep in settings.endpoints if ep.name not in bad)
        )


def check_settings(
    settings: Settings,
    *,
    euid: int | None = None,
    fs: FileSystem | None = None,
    probe: RuntimeProbe | None = None,
) -> TrustReport:
    """The one check of rule 8, for ``mepd check``, start and every reload."""
    checker = Checker.for_daemon(euid, fs)
    gather = _Gatherer(checker, probe if probe is not None else _system_probe)
    gather.settings(settings)
    return TrustReport(tuple(gather.found))


def _system_probe(python: str, with_site: bool) -> RuntimePaths:
    return probe_runtime_paths(python, with_site=with_site)


def _runner_path() -> str:
    """The PATH external mapping programs are looked up on (their runner's)."""
    from mepcore.identity import SubprocessCommandRunner

    return SubprocessCommandRunner().env.get("PATH", os.defpath)


def _paths(value: Path | str | Sequence[Path | str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [str(value)]
    return [str(v) for v in value]


@attrs.define
class _Gatherer:
    checker: Checker
    probe: RuntimeProbe
    found: list[Untrusted] = attrs.field(factory=list)

    def check(self, need: Need) -> bool:
        """Judge one path; True when it exists and passed (it may then be read)."""
        found, resolved = self.checker.check_path(need)
        self.found += found
        return not found and resolved is not None

    def check_tree(self, need: Need) -> bool:
        found = self.checker.check_tree(need)
        self.found += found
        return not found

    def settings(self, settings: Settings) -> None:
        if settings.source is not None:
            self.check(Need(str(settings.source), "settings", "settings"))
        for ep in settings.endpoints:
            self.endpoint(ep)
        self.issuers(settings)
        for role, path, secret in (
            ("tls cert", settings.tls_cert, False),
            ("tls key", settings.tls_key, True),
        ):
            if path is not None:
                self.check(Need(str(path), role, "tls", secret=secret))
        self.state(settings)
        self.runtime(settings)

    def endpoint(self, ep: EndpointSettings) -> None:
        def need(role: str, path: str) -> Need:
            return Need(path, f"endpoint {ep.name}: {role}", "endpoint", ep.name)

        if self.check(need("mapping", str(ep.mapping))):
            self.mapping_programs(ep.name, str(ep.mapping))
        self.check(need("policy_model", str(ep.policy_model)))
        for path in _paths(ep.policy):
            self.check(need("policy", path))
        for path in _paths(ep.policy_tests):
            self.check(need("policy_tests", path))
        self.check(need("template", str(ep.template)))
        for include in self.includes(str(ep.template)):
            self.check(need("template include", include))
        if ep.schema is not None:
            self.check(need("schema", str(ep.schema)))
        if ep.environment is not None:
            self.check(need("environment", str(ep.environment)))

    def includes(self, template: str) -> list[str]:
        folder, name = os.path.split(os.path.abspath(template))
        try:
            names = self.checker.fs.listdir(folder)
        except OSError:
            return []  # the template's own check or its loader reports it
        return [
            os.path.join(folder, n)
            for n in sorted(names)
            if n != name and n.endswith(INCLUDE_SUFFIX)
        ]

    def mapping_programs(self, endpoint: str, mapping: str) -> None:
        """The programs a (trusted) mapping file names, each with its #! interpreter."""
        from mepcore.identity import IdentityMapper

        try:
            text = self.checker.fs.read(mapping, MAX_MAPPING_BYTES)
            mapper = IdentityMapper.from_json_text(
                text, source=mapping, base_dir=os.path.dirname(os.path.abspath(mapping))
            )
        except Exception:
            return  # the loader reports a broken mapping file
        for index, each in enumerate(mapper.mappers):
            command = getattr(each, "command", None)
            if command:
                role = f"endpoint {endpoint}: mapping program $[{index}]"
                self.program(command[0], role, "endpoint", endpoint, depth=0)

    def program(self, program: str, role: str, area: str, endpoint: str | None, depth: int) -> None:
        """A program root executes: found on the runner's PATH when bare (every
        directory searched before it judged too), then its #! interpreter."""
        path = self.lookup(program, role, area, endpoint)
        if path is None or not self.check(Need(path, role, area, endpoint)):
            return
        if depth >= MAX_SHEBANG_DEPTH:
            return
        for interpreter in self.shebang(path):
            self.program(interpreter, f"{role} interpreter", area, endpoint, depth + 1)

    def lookup(self, program: str, role: str, area: str, endpoint: str | None) -> str | None:
        if "/" in program:
            return os.path.abspath(program)
        for directory in _runner_path().split(os.pathsep):
            if not directory.startswith("/"):
                continue
            self.check(Need(directory, f"{role} (PATH)", area, endpoint))
            candidate = os.path.join(directory, program)
            try:
                self.checker.fs.lstat(candidate)
            except OSError:
                continue
            return candidate
        return None

    def shebang(self, path: str) -> list[str]:
        """The interpreter of a ``#!`` script (and, for ``env``, the program it runs)."""
        try:
            head = self.checker.fs.read(path, SHEBANG_BYTES)
        except OSError:
            return []
        if not head.startswith(b"#!"):
            return []
        line = head[2:].split(b"\n", 1)[0].decode(errors="replace").strip()
        words = line.split()
        if not words:
            return []
        found = [words[0]]
        if os.path.basename(words[0]) == "env":
            rest = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
            found += rest[:1]
        return found

    def issuers(self, settings: Settings) -> None:
        from mepd.auth import LOCAL_KEY_FILE

        for index, issuer in enumerate(settings.issuers):
            label = f"issuers[{index}] ({issuer.type})"
            if issuer.jwks_file is not None:
                self.check(Need(str(issuer.jwks_file), f"{label}: jwks_file", "issuers"))
            if issuer.client_secret_file is not None:
                need = Need(
                    str(issuer.client_secret_file),
                    f"{label}: client_secret_file",
                    "issuers",
                    secret=True,
                )
                self.check(need)
            if issuer.type == "local":
                key = str(settings.state_dir / LOCAL_KEY_FILE)
                self.check(Need(key, f"{label}: key", "issuers", secret=True))

    def state(self, settings: Settings) -> None:
        from mepd.daemon import STORE_FILE

        self.check(Need(str(settings.state_dir), "state_dir", "state"))
        self.check(Need(str(settings.state_dir / STORE_FILE), "task store", "state"))
        self.check(Need(str(settings.audit_path), "audit_log", "audit"))

    def runtime(self, settings: Settings) -> None:
        """The user endpoint runtime: run as every mapped account, so a file any account
        can change there runs as all the others."""
        python = settings.python
        if not self.check(Need(python, "python (user endpoint runtime)", "runtime")):
            return
        exe_dir = os.path.dirname(os.path.abspath(python))
        # Where the interpreter looks for a venv's configuration (as site.py does).
        for folder in (exe_dir, os.path.dirname(exe_dir)):
            self.check(Need(os.path.join(folder, "pyvenv.cfg"), "python venv config", "runtime"))
        for path in _paths(settings.spawn.get("package_paths")):
            self.check(Need(path, "spawn.package_paths", "runtime"))
        if not self.found_in("runtime"):
            self.runtime_paths(python)

    def found_in(self, area: str) -> bool:
        return any(u.need.area == area for u in self.found)

    def runtime_paths(self, python: str) -> None:
        """First what the interpreter loads before any site-packages (``-S``): judged,
        with every ``.pth`` file of its site directories and the directories those
        add; only then the ``sys.path`` the runtime really has (``.pth`` files may add
        to it at run time), each entry with everything below it."""
        from mepcore.errors import MepError

        try:
            bare = self.probe(python, False)
        except MepError as exc:
            self.found.append(_probe_failed(python, exc))
            return
        for entry in dict.fromkeys([*bare.sys_path, *bare.site_dirs]):
            self.check_tree(Need(entry, "python sys.path", "runtime"))
        for site_dir in bare.site_dirs:
            for pth in self.pth_files(site_dir):
                if self.check(Need(pth, "python .pth file", "runtime")):
                    for folder in self.pth_directories(pth, site_dir):
                        self.check(Need(folder, f"python path added by {pth}", "runtime"))
        if self.found_in("runtime"):
            return
        try:
            full = self.probe(python, True)
        except MepError as exc:
            self.found.append(_probe_failed(python, exc))
            return
        for entry in dict.fromkeys(full.sys_path):
            if entry not in bare.sys_path and entry not in bare.site_dirs:
                self.check_tree(Need(entry, "python sys.path", "runtime"))

    def pth_files(self, site_dir: str) -> list[str]:
        """The ``*.pth`` files of a site directory: their ``import`` lines are code run
        at every start, their other lines directories added to ``sys.path``."""
        try:
            names = sorted(self.checker.fs.listdir(site_dir))
        except OSError:
            return []
        return [os.path.join(site_dir, n) for n in names if n.endswith(".pth")]

    def pth_directories(self, path: str, site_dir: str) -> list[str]:
        """The directories a (trusted) ``.pth`` file adds; its ``import`` lines are code
        and were judged with the file."""
        try:
            lines = self.checker.fs.read(path, MAX_PTH_BYTES).decode(errors="replace")
        except OSError:
            return []
        found = []
        for raw in lines.splitlines():
            line = raw.strip()
            if not line or line.startswith("#") or line.startswith(("import ", "import\t")):
                continue
            found.append(os.path.normpath(os.path.join(site_dir, line)))
        return found


def _probe_failed(python: str, exc: Exception) -> Untrusted:
    need = Need(python, "python (user endpoint runtime)", "runtime")
    detail = getattr(exc, "detail", "") or str(exc)
    return Untrusted(need, python, UNEXAMINABLE, detail=f"the runtime cannot be probed: {detail}")
