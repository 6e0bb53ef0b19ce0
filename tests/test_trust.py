"""File trust (rule 8) as pure logic: ``mepd.trust`` over a fake file system.

Every case of the acceptance is here once without root (a user-owned or 0777 mapping
program, 0666 mapping/policy/template, 0777 config directory, 0644 client secret, a
user-writable runtime site-packages with a planted ``.pth``, symbolic-link tricks);
tests/test_trust_root.py repeats them with real accounts and real files.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest

from mepcore.errors import REASONS
from mepd.runtime import RuntimePaths
from mepd.settings import Settings
from mepd.trust import (
    LINK_LOOP,
    OWNER,
    SECRET_READABLE,
    SHARED_DIRECTORY,
    UNEXAMINABLE,
    WRITABLE,
    Checker,
    Need,
    TrustReport,
    Untrusted,
    check_settings,
)

ROOT, ALICE, DAEMON = 0, 1001, 990


@attrs.define
class Node:
    kind: str  # "dir" | "file" | "link"
    uid: int
    mode: int
    target: str = ""
    data: bytes = b""
    gid: int = 0


@attrs.define
class FakeFS:
    """Paths to nodes; everything not listed does not exist. ``/`` is root's, 0755."""

    nodes: dict[str, Node] = attrs.field(factory=dict)
    users: dict[int, str] = attrs.field(factory=lambda: {ROOT: "root", ALICE: "alice"})
    seen: list[str] = attrs.field(factory=list)  # every lstat, in order

    def __attrs_post_init__(self) -> None:
        self.nodes.setdefault("/", Node("dir", ROOT, 0o755))

    def dir(self, path: str, uid: int = ROOT, mode: int = 0o755) -> FakeFS:
        parent = os.path.dirname(path)
        if parent not in self.nodes:
            self.dir(parent)
        self.nodes[path] = Node("dir", uid, mode)
        return self

    def file(self, path: str, uid: int = ROOT, mode: int = 0o644, data: bytes = b"") -> FakeFS:
        if os.path.dirname(path) not in self.nodes:
            self.dir(os.path.dirname(path))
        self.nodes[path] = Node("file", uid, mode, data=data)
        return self

    def link(self, path: str, target: str, uid: int = ROOT) -> FakeFS:
        if os.path.dirname(path) not in self.nodes:
            self.dir(os.path.dirname(path))
        self.nodes[path] = Node("link", uid, 0o777, target=target)
        return self

    def lstat(self, path: str) -> os.stat_result:
        self.seen.append(path)
        node = self.nodes.get(path)
        if node is None:
            raise FileNotFoundError(2, "No such file or directory", path)
        kind = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "link": stat.S_IFLNK}[node.kind]
        ino = sorted(self.nodes).index(path) + 1
        return os.stat_result((kind | node.mode, ino, 1, 1, node.uid, node.gid, 0, 0, 0, 0))

    def readlink(self, path: str) -> str:
        return self.nodes[path].target

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return [
            p[len(prefix) :]
            for p in self.nodes
            if p.startswith(prefix) and "/" not in p[len(prefix) :] and p != "/"
        ]

    def read(self, path: str, limit: int) -> bytes:
        return self.nodes[path].data[:limit]

    def user_name(self, uid: int) -> str | None:
        return self.users.get(uid)

    def group_name(self, gid: int) -> str | None:
        return {0: "root"}.get(gid)


def check(fs: FakeFS, path: str, *, secret: bool = False, euid: int = ROOT) -> list[Untrusted]:
    return Checker.for_daemon(euid, fs).check_path(Need(path, "test", "settings", secret=secret))[0]


def causes(found: list[Untrusted]) -> list[tuple[str, str]]:
    return [(u.culprit, u.cause) for u in found]


# -- one path ---------------------------------------------------------------------------


def test_a_root_owned_path_of_closed_modes_passes() -> None:
    fs = FakeFS().file("/etc/mepd/mapping.json")
    assert check(fs, "/etc/mepd/mapping.json") == []
    resolved = Checker.for_daemon(0, fs).check_path(Need("/etc/mepd/mapping.json", "t", "s"))
    assert resolved == ([], "/etc/mepd/mapping.json")


def test_a_file_of_another_owner_is_refused_with_path_owner_mode_and_fix() -> None:
    fs = FakeFS().file("/etc/mepd/mapper.py", uid=ALICE, mode=0o755)
    (found,) = check(fs, "/etc/mepd/mapper.py")
    assert (found.culprit, found.cause, found.reason) == (
        "/etc/mepd/mapper.py",
        OWNER,
        REASONS and "settings.untrusted_file",
    )
    text = str(found)
    assert text.startswith("settings.untrusted_file: test: /etc/mepd/mapper.py")
    assert "owner alice(1001), mode 0755" in text
    assert "chown root:root /etc/mepd/mapper.py" in text
    assert "settings.untrusted_file" in REASONS


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o646, "everyone"), (0o664, "group root"), (0o777, "group root and everyone")],
)
def test_a_file_writable_by_group_or_others_is_refused(mode: int, who: str) -> None:
    fs = FakeFS().file("/etc/mepd/policy.csv", mode=mode)
    (found,) = check(fs, "/etc/mepd/policy.csv")
    assert found.cause == WRITABLE
    assert f"is writable by {who}: chmod go-w /etc/mepd/policy.csv" in str(found)


def test_a_writable_directory_on_the_way_is_refused_and_named() -> None:
    fs = FakeFS().dir("/etc/mepd", mode=0o777).file("/etc/mepd/templates/t.j2")
    assert causes(check(fs, "/etc/mepd/templates/t.j2")) == [("/etc/mepd", WRITABLE)]
    text = str(check(fs, "/etc/mepd/templates/t.j2")[0])
    assert "test /etc/mepd/templates/t.j2: /etc/mepd (owner root(0), mode 0777)" in text


def test_a_directory_owned_by_a_user_on_the_way_is_refused() -> None:
    fs = FakeFS().dir("/srv/site", uid=ALICE).file("/srv/site/mapping.json")
    assert causes(check(fs, "/srv/site/mapping.json")) == [("/srv/site", OWNER)]


def test_a_shared_sticky_directory_is_refused_even_for_root_owned_files() -> None:
    fs = FakeFS().dir("/tmp", mode=0o1777).dir("/tmp/site").file("/tmp/site/mepd.yaml")
    (found,) = check(fs, "/tmp/site/mepd.yaml")
    assert (found.culprit, found.cause) == ("/tmp", SHARED_DIRECTORY)
    assert "mode 1777" in str(found) and "move the file" in str(found)


def test_a_missing_file_is_judged_up_to_its_nearest_existing_directory() -> None:
    fs = FakeFS().dir("/var/lib/mepd")
    assert check(fs, "/var/lib/mepd/state/audit.jsonl") == []
    fs.dir("/var/tmp", mode=0o1777)
    assert causes(check(fs, "/var/tmp/mepd/audit.jsonl")) == [("/var/tmp", SHARED_DIRECTORY)]


@pytest.mark.parametrize(
    ("mode", "ok"), [(0o600, True), (0o400, True), (0o640, False), (0o644, False)]
)
def test_a_secret_must_not_be_readable_by_group_or_others(mode: int, ok: bool) -> None:
    fs = FakeFS().file("/etc/mepd/client-secret", mode=mode)
    found = check(fs, "/etc/mepd/client-secret", secret=True)
    assert (found == []) is ok
    if not ok:
        assert found[0].cause == SECRET_READABLE
        assert "chmod go-rwx /etc/mepd/client-secret" in str(found[0])
    assert check(fs, "/etc/mepd/client-secret") == []  # the same mode is fine for a non-secret


def test_the_daemons_own_uid_is_trusted_only_when_it_runs_as_that_uid() -> None:
    fs = FakeFS().dir("/home/svc", uid=DAEMON).file("/home/svc/mepd.yaml", uid=DAEMON)
    assert check(fs, "/home/svc/mepd.yaml", euid=DAEMON) == []
    assert causes(check(fs, "/home/svc/mepd.yaml", euid=ROOT)) == [
        ("/home/svc", OWNER),
        ("/home/svc/mepd.yaml", OWNER),
    ]
    fs.file("/home/svc/other.json", uid=ALICE)
    assert causes(check(fs, "/home/svc/other.json", euid=DAEMON)) == [
        ("/home/svc/other.json", OWNER)
    ]


# -- symbolic links -----------------------------------------------------------------------


def test_a_link_into_a_users_directory_is_refused_at_the_target() -> None:
    fs = FakeFS().dir("/home/alice", uid=ALICE).file("/home/alice/mapping.json", uid=ALICE)
    fs.link("/etc/mepd/mapping.json", "/home/alice/mapping.json")
    assert causes(check(fs, "/etc/mepd/mapping.json")) == [
        ("/home/alice", OWNER),
        ("/home/alice/mapping.json", OWNER),
    ]


def test_a_link_owned_by_a_user_is_refused_even_to_a_good_target() -> None:
    fs = FakeFS().file("/etc/mepd/real.json").link("/etc/mepd/mapping.json", "real.json", uid=ALICE)
    (found,) = check(fs, "/etc/mepd/mapping.json")
    assert (found.culprit, found.cause) == ("/etc/mepd/mapping.json", OWNER)
    assert "chown -h root:root" in str(found)


def test_relative_links_and_dotdot_resolve_as_the_kernel_does() -> None:
    # /etc/mepd/conf -> ../../srv/conf; /srv is writable: the real path is what counts.
    fs = FakeFS().dir("/srv", mode=0o777).file("/srv/conf/policy.csv")
    fs.link("/etc/mepd/conf", "../../srv/conf")
    assert causes(check(fs, "/etc/mepd/conf/policy.csv")) == [("/srv", WRITABLE)]
    # A directory link followed by ..: the parent of the *target*, not of the link.
    fs2 = FakeFS().dir("/opt/good").dir("/srv", uid=ALICE).file("/srv/x.csv").dir("/srv/in")
    fs2.link("/opt/good/in", "/srv/in")
    assert ("/srv", OWNER) in causes(check(fs2, "/opt/good/in/../x.csv"))


def test_a_link_loop_is_refused() -> None:
    fs = FakeFS().link("/etc/a", "/etc/b").link("/etc/b", "/etc/a")
    assert LINK_LOOP in [u.cause for u in check(fs, "/etc/a")]


def test_an_unreadable_component_is_refused_not_skipped() -> None:
    class Denied(FakeFS):
        def lstat(self, path: str) -> os.stat_result:
            if path == "/etc/mepd/secret":
                raise PermissionError(13, "Permission denied", path)
            return super().lstat(path)

    fs = Denied().dir("/etc/mepd")
    (found,) = check(fs, "/etc/mepd/secret")
    assert found.cause == UNEXAMINABLE and "Permission denied" in str(found)


# -- trees (a runtime's sys.path) --------------------------------------------------------


def test_a_tree_is_judged_entry_by_entry_and_through_its_links() -> None:
    fs = FakeFS().dir("/opt/venv/lib/site").file("/opt/venv/lib/site/ok.py")
    checker = Checker.for_daemon(0, fs)
    assert checker.check_tree(Need("/opt/venv/lib/site", "t", "runtime")) == []
    fs.dir("/opt/venv/lib/site/pkg", mode=0o777)
    fs.dir("/home/alice", uid=ALICE).file("/home/alice/evil.py", uid=ALICE)
    fs.link("/opt/venv/lib/site/evil.py", "/home/alice/evil.py")
    found = Checker.for_daemon(0, fs).check_tree(Need("/opt/venv/lib/site", "t", "runtime"))
    assert set(causes(found)) == {
        ("/opt/venv/lib/site/pkg", WRITABLE),
        ("/home/alice", OWNER),
        ("/home/alice/evil.py", OWNER),
    }


# -- everything the settings name ----------------------------------------------------------


def deployment(**changes: Any) -> tuple[FakeFS, Settings]:
    """A good deployment under /etc/mepd on a fake file system, and its settings."""
    fs = FakeFS()
    mapping = [
        {"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["./mapper.py", "-v"]},
        {"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["site-mapper"]},
    ]
    fs.file("/etc/mepd/mepd.yaml").file("/etc/mepd/mapping.json", data=json.dumps(mapping).encode())
    fs.file("/etc/mepd/mapper.py", mode=0o755, data=b"#!/usr/bin/env -S python3 -u\nimport x\n")
    for path in ("/usr/bin/env", "/usr/bin/python3", "/usr/sbin/site-mapper"):
        fs.file(path, mode=0o755)
    for name in ("model.conf", "base.csv", "policy.csv", "tables.yaml", "schema.json", "env.yaml"):
        fs.file(f"/etc/mepd/{name}")
    fs.file("/etc/mepd/templates/main.yaml.j2").file("/etc/mepd/templates/common.j2")
    fs.file("/etc/mepd/jwks.json").file("/etc/mepd/secret", mode=0o600)
    fs.file("/etc/mepd/tls/cert.pem").file("/etc/mepd/tls/key.pem", mode=0o600)
    fs.dir("/var/lib/mepd", mode=0o700).dir("/var/log/mepd", mode=0o700)
    fs.file("/opt/venv/bin/python", mode=0o755).file("/opt/venv/pyvenv.cfg")
    fs.file("/usr/lib/python3.11/os.py").file("/opt/venv/lib/site-packages/mepd/__init__.py")
    fs.file("/opt/venv/lib/site-packages/good.pth", data=b"import sitecustom\n../extra\n")
    fs.file("/opt/venv/lib/extra/mod.py")
    data: dict[str, Any] = {
        "state_dir": "/var/lib/mepd",
        "audit_log": "/var/log/mepd/audit.jsonl",
        "python": "/opt/venv/bin/python",
        "tls": {"cert": "tls/cert.pem", "key": "tls/key.pem"},
        "issuers": [
            {"type": "local"},
            {"type": "jwt", "issuer": "https://idp", "audience": "a", "jwks_file": "jwks.json"},
            {
                "type": "introspection",
                "url": "https://idp/introspect",
                "client_id": "c",
                "client_secret_file": "secret",
            },
        ],
        "endpoints": [
            {
                "name": "hpc",
                "template": "templates/main.yaml.j2",
                "schema": "schema.json",
                "environment": "env.yaml",
                "mapping": "mapping.json",
                "policy_model": "model.conf",
                "policy": ["base.csv", "policy.csv"],
                "policy_tests": "tables.yaml",
            },
            {
                "name": "other",
                "template": "templates/main.yaml.j2",
                "mapping": "/etc/mepd/other/mapping.json",
                "policy_model": "model.conf",
                "policy": "policy.csv",
            },
        ],
        **changes,
    }
    fs.file("/etc/mepd/other/mapping.json", data=b"[]")
    settings = Settings.from_mapping(
        data, base_dir=Path("/etc/mepd"), source=Path("/etc/mepd/mepd.yaml")
    )
    return fs, settings


def probe_of(
    sys_path: tuple[str, ...], site_dirs: tuple[str, ...], full: tuple[str, ...] = ()
) -> Any:
    calls: list[bool] = []

    def probe(python: str, with_site: bool) -> RuntimePaths:
        calls.append(with_site)
        if with_site:
            return RuntimePaths((*sys_path, *site_dirs, *full))
        return RuntimePaths(sys_path, site_dirs)

    probe.calls = calls  # type: ignore[attr-defined]
    return probe


VENV_PROBE = ("/usr/lib/python3.11",), ("/opt/venv/lib/site-packages",)


def report_of(fs: FakeFS, settings: Settings, probe: Any = None, euid: int = ROOT) -> TrustReport:
    return check_settings(settings, euid=euid, fs=fs, probe=probe or probe_of(*VENV_PROBE))


def culprits(report: TrustReport) -> set[tuple[str, str, str]]:
    return {(u.need.role, u.culprit, u.cause) for u in report.problems}


def test_a_good_deployment_passes_and_everything_named_is_looked_at() -> None:
    fs, settings = deployment()
    probe = probe_of(*VENV_PROBE, full=("/opt/venv/lib/extra",))
    report = report_of(fs, settings, probe)
    assert report.ok, report.lines()
    assert probe.calls == [False, True]
    for path in (
        "/etc/mepd/mepd.yaml",
        "/etc/mepd/mapping.json",
        "/etc/mepd/mapper.py",
        "/usr/bin/env",
        "/usr/bin/python3",  # env's program, found on the mapping runner's PATH
        "/usr/sbin/site-mapper",  # a bare program name, found on that PATH
        "/etc/mepd/model.conf",
        "/etc/mepd/base.csv",
        "/etc/mepd/policy.csv",
        "/etc/mepd/tables.yaml",
        "/etc/mepd/templates/main.yaml.j2",
        "/etc/mepd/templates/common.j2",
        "/etc/mepd/schema.json",
        "/etc/mepd/env.yaml",
        "/etc/mepd/jwks.json",
        "/etc/mepd/secret",
        "/etc/mepd/tls/cert.pem",
        "/etc/mepd/tls/key.pem",
        "/var/lib/mepd",
        "/var/log/mepd",
        "/opt/venv/bin/python",
        "/opt/venv/pyvenv.cfg",
        "/usr/lib/python3.11/os.py",
        "/opt/venv/lib/site-packages/mepd/__init__.py",
        "/opt/venv/lib/site-packages/good.pth",
        "/opt/venv/lib/extra/mod.py",
    ):
        assert path in fs.seen, path


def test_a_user_owned_or_0777_mapping_program_is_refused() -> None:
    fs, settings = deployment()
    fs.nodes["/etc/mepd/mapper.py"].uid = ALICE
    assert culprits(report_of(fs, settings)) == {
        ("endpoint hpc: mapping program $[0]", "/etc/mepd/mapper.py", OWNER)
    }
    fs.nodes["/etc/mepd/mapper.py"] = Node("file", ROOT, 0o777, data=b"#!/bin/sh\n")
    report = report_of(fs, settings)
    assert culprits(report) == {
        ("endpoint hpc: mapping program $[0]", "/etc/mepd/mapper.py", WRITABLE)
    }
    assert report.endpoints() == {"hpc"}
    assert [ep.name for ep in report.trusted_settings(settings).endpoints] == ["other"]


def test_the_interpreter_of_a_mapping_program_is_judged() -> None:
    fs, settings = deployment()
    fs.nodes["/usr/bin/python3"].mode = 0o757
    assert culprits(report_of(fs, settings)) == {
        ("endpoint hpc: mapping program $[0] interpreter", "/usr/bin/python3", WRITABLE)
    }


def test_a_writable_directory_searched_before_a_bare_program_is_refused() -> None:
    fs, settings = deployment()
    fs.nodes["/usr/sbin"] = Node("dir", ROOT, 0o777)  # a site-mapper could be planted there
    assert ("/usr/sbin", WRITABLE) in {(c, k) for _, c, k in culprits(report_of(fs, settings))}


@pytest.mark.parametrize(
    "name",
    [
        "mapping.json",
        "model.conf",
        "base.csv",
        "policy.csv",
        "tables.yaml",
        "schema.json",
        "env.yaml",
        "templates/main.yaml.j2",
        "templates/common.j2",
    ],
)
def test_a_0666_endpoint_file_is_refused_and_its_endpoint_named(name: str) -> None:
    fs, settings = deployment()
    fs.nodes[f"/etc/mepd/{name}"].mode = 0o666
    report = report_of(fs, settings)
    assert {c for _, c, _ in culprits(report)} == {f"/etc/mepd/{name}"}
    assert "hpc" in report.endpoints() and report.areas() == {"endpoint"}


def test_a_0777_config_directory_refuses_everything_in_it() -> None:
    fs, settings = deployment()
    fs.nodes["/etc/mepd"].mode = 0o777
    report = report_of(fs, settings)
    assert {c for _, c, _ in culprits(report)} == {"/etc/mepd"}
    assert report.areas() == {"settings", "endpoint", "issuers", "tls"}
    assert report.endpoints() == {"hpc", "other"}


def test_a_0644_client_secret_or_tls_key_is_refused_but_a_0644_jwks_file_is_not() -> None:
    fs, settings = deployment()
    fs.nodes["/etc/mepd/secret"].mode = 0o644
    fs.nodes["/etc/mepd/tls/key.pem"].mode = 0o640
    fs.nodes["/etc/mepd/jwks.json"].mode = 0o644
    assert culprits(report_of(fs, settings)) == {
        ("issuers[2] (introspection): client_secret_file", "/etc/mepd/secret", SECRET_READABLE),
        ("tls key", "/etc/mepd/tls/key.pem", SECRET_READABLE),
    }


def test_the_local_issuer_key_in_the_state_directory_is_a_secret() -> None:
    fs, settings = deployment()
    fs.file("/var/lib/mepd/local_issuer.pem", mode=0o644)
    assert culprits(report_of(fs, settings)) == {
        ("issuers[0] (local): key", "/var/lib/mepd/local_issuer.pem", SECRET_READABLE)
    }


def test_a_user_writable_site_packages_is_refused_before_any_pth_file_runs() -> None:
    fs, settings = deployment()
    fs.nodes["/opt/venv/lib/site-packages"] = Node("dir", ALICE, 0o755)
    fs.file("/opt/venv/lib/site-packages/evil.pth", uid=ALICE, data=b"import os; os.system('x')\n")
    probe = probe_of(*VENV_PROBE)
    report = report_of(fs, settings, probe)
    assert ("/opt/venv/lib/site-packages", OWNER) in {(c, k) for _, c, k in culprits(report)}
    assert ("/opt/venv/lib/site-packages/evil.pth", OWNER) in {
        (c, k) for _, c, k in culprits(report)
    }
    assert probe.calls == [False]  # never run with site processing
    assert report.areas() == {"runtime"} and report.endpoints() == set()


def test_a_writable_pth_file_and_the_directories_pth_files_add_are_judged() -> None:
    fs, settings = deployment()
    fs.nodes["/opt/venv/lib/site-packages/good.pth"].mode = 0o666
    assert ("/opt/venv/lib/site-packages/good.pth", WRITABLE) in {
        (c, k) for _, c, k in culprits(report_of(fs, settings))
    }
    fs, settings = deployment()
    fs.nodes["/opt/venv/lib/extra"] = Node("dir", ALICE, 0o755)  # an editable install's checkout
    assert ("/opt/venv/lib/extra", OWNER) in {
        (c, k) for _, c, k in culprits(report_of(fs, settings))
    }


def test_a_path_added_at_run_time_is_judged_from_the_second_probe() -> None:
    fs, settings = deployment()
    fs.dir("/home/alice", uid=ALICE).file("/home/alice/lib/mod.py", uid=ALICE)
    report = report_of(fs, settings, probe_of(*VENV_PROBE, full=("/home/alice/lib",)))
    assert ("python sys.path", "/home/alice", OWNER) in culprits(report)


def test_a_writable_venv_config_or_interpreter_is_refused_without_probing() -> None:
    fs, settings = deployment()
    fs.nodes["/opt/venv/pyvenv.cfg"].mode = 0o666
    probe = probe_of(*VENV_PROBE)
    assert {c for _, c, _ in culprits(report_of(fs, settings, probe))} == {"/opt/venv/pyvenv.cfg"}
    assert probe.calls == []


def test_a_runtime_that_cannot_be_probed_is_refused() -> None:
    from mepcore.errors import SpawnError

    def broken(python: str, with_site: bool) -> RuntimePaths:
        raise SpawnError("spawn.settings_invalid", "exit 1")

    fs, settings = deployment()
    report = report_of(fs, settings, broken)
    assert [u.cause for u in report.problems] == [UNEXAMINABLE]
    assert "cannot be probed" in report.lines()[0]


def test_state_directory_and_audit_log_in_a_shared_directory_are_refused() -> None:
    fs, settings = deployment(state_dir="/tmp/mepd", audit_log="/var/tmp/audit.jsonl")
    fs.dir("/tmp", mode=0o1777).dir("/var/tmp", mode=0o1777)
    report = report_of(fs, settings)
    assert {(u.need.area, u.culprit, u.cause) for u in report.problems} == {
        ("state", "/tmp", SHARED_DIRECTORY),
        ("issuers", "/tmp", SHARED_DIRECTORY),  # the local issuer's key lives there
        ("audit", "/var/tmp", SHARED_DIRECTORY),
    }


def test_one_line_per_refusal() -> None:
    fs, settings = deployment()
    fs.nodes["/etc/mepd/policy.csv"].mode = 0o666  # named by both endpoints
    lines = report_of(fs, settings).lines()
    assert len(lines) == 2
    assert all(line.startswith("settings.untrusted_file: endpoint ") for line in lines)
