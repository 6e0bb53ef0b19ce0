"""File trust (rule 8) with real accounts and real files: ``mepd check``, ``mepd serve``
and reload refuse what an ordinary account could change, name the path, its owner and
mode, and accept the examples installed as root's files.

Every tree here is built under a root-owned 0755 directory of its own (not pytest's
``tmp_path``, and never under /tmp: a shared sticky directory is itself refused).
These tests deliberately import nothing of ``mepd.trust``: they drive the commands and
``collect_problems`` (what ``mepd check`` prints), so they run — and fail — against a
mepd without the check too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mepd.commands.check import collect_problems
from mepd.settings import Settings
from tests.daemon_harness import REPO, RunningDaemon, running_daemon, write_deployment

pytestmark = [pytest.mark.root]

CODE = "settings.untrusted_file"
PARENT = Path("/var/lib/mep-test")


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh root-owned 0755 directory, every directory above it root's and 0755."""
    PARENT.mkdir(mode=0o755, parents=True, exist_ok=True)
    PARENT.chmod(0o755)
    top = Path(tempfile.mkdtemp(prefix="trust-", dir=PARENT))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def site(base: Path, **kwargs: Any) -> Path:
    """A daemon deployment of root's files (the test harness's), its settings path."""
    return write_deployment(base / "site", python=sys.executable, **kwargs)


def untrusted(config: Path) -> list[str]:
    """The lines ``mepd check`` would print about untrusted files."""
    return [p for p in collect_problems(str(config)) if CODE in p]


def assert_refused(config: Path, path: Path | str, *words: str) -> str:
    lines = untrusted(config)
    named = [line for line in lines if f"{path} (owner" in line]
    assert named, f"{path} not refused: {collect_problems(str(config))}"
    fitting = [line for line in named if all(word in line for word in words)]
    assert fitting, (words, named)
    return fitting[0]


def mepd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        check=False,
    )


def external_mapping(top: Path, program: Path) -> None:
    (top / "mapping.json").write_text(
        json.dumps([{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": [str(program)]}])
    )


def write_mapper(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/usr/bin/python3\nimport json, sys\nprint(json.dumps({'result': []}))\n")
    path.chmod(mode)
    return path


# -- the acceptance cases, one by one ------------------------------------------------------


def test_a_user_owned_mapping_program_is_refused_by_check_and_serve(
    base: Path, make_account: Any
) -> None:
    acct = make_account()
    config = site(base)
    mapper = write_mapper(base / "site" / "mapper.py")
    external_mapping(base / "site", mapper)
    assert untrusted(config) == []
    os.chown(mapper, acct.pw_uid, acct.pw_gid)
    line = assert_refused(config, mapper, f"owner {acct.pw_name}({acct.pw_uid})", "mode 0755")
    assert "endpoint hpc: mapping program" in line and "chown root:root" in line
    # The daemon does not start (and so never runs the program as root).
    done = mepd("serve", "--config", str(config), timeout=120)
    assert done.returncode == 2, done.stderr
    assert CODE in done.stderr and str(mapper) in done.stderr
    assert not (base / "site" / "state" / "port").exists()
    # `mepd check` says the same, exit status 2.
    done = mepd("check", "--config", str(config))
    assert done.returncode == 2 and str(mapper) in done.stderr


def test_a_0777_mapping_program_and_a_writable_interpreter_line_are_refused(base: Path) -> None:
    config = site(base)
    mapper = write_mapper(base / "site" / "mapper.py", 0o777)
    external_mapping(base / "site", mapper)
    assert_refused(config, mapper, "mode 0777", "writable by group root and everyone")
    # A root-owned program whose #! names an interpreter someone else could change.
    mapper.chmod(0o755)
    interpreter = base / "bin" / "python3"
    interpreter.parent.mkdir()
    interpreter.symlink_to("/usr/bin/python3")
    mapper.write_text(f"#!{interpreter}\nprint('{{}}')\n")
    assert untrusted(config) == []
    interpreter.parent.chmod(0o775)
    assert_refused(config, interpreter.parent, "mode 0775", "writable by group")


@pytest.mark.parametrize(
    "name",
    [
        "mapping.json",
        "policy.csv",
        "templates/user_config_template.yaml.j2",
        "templates/user_config_schema.json",
        "templates/user_environment.yaml",
        "mepd.yaml",
    ],
)
def test_a_0666_site_file_is_refused(base: Path, name: str) -> None:
    config = site(base)
    path = base / "site" / name
    assert untrusted(config) == []
    path.chmod(0o666)
    assert_refused(config, path, "owner root(0), mode 0666", f"chmod go-w {path}")


def test_a_0777_config_directory_is_refused_for_every_file_in_it(base: Path) -> None:
    config = site(base)
    (base / "site").chmod(0o777)
    lines = untrusted(config)
    assert lines and all(f"{base / 'site'} (owner root(0), mode 0777)" in line for line in lines)
    for role in ("settings", "endpoint hpc: mapping", "endpoint hpc: policy", "state_dir"):
        assert any(f": {role} " in line for line in lines), (role, lines)


def test_a_0644_client_secret_and_tls_key_are_refused(base: Path) -> None:
    secret = base / "site" / "client-secret"
    key = base / "site" / "tls.key"
    config = site(
        base,
        settings_extra={
            "issuers": [
                {"type": "local"},
                {
                    "type": "introspection",
                    "url": "https://idp.example.org/introspect",
                    "client_id": "mep",
                    "client_secret_file": str(secret),
                },
            ],
        },
    )
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    assert untrusted(config) == []
    secret.chmod(0o644)
    assert_refused(config, secret, "mode 0644", "is a secret readable by group root and everyone")
    # The TLS key of a deployment with TLS.
    data = yaml.safe_load(config.read_text())
    cert = base / "site" / "tls.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost", "-days", "2"],
        check=True, capture_output=True,
    )  # fmt: skip
    data["tls"] = {"cert": str(cert), "key": str(key)}
    config.write_text(yaml.safe_dump(data))
    key.chmod(0o640)
    assert_refused(config, key, "mode 0640", "is a secret readable by group root:")


def make_venv(path: Path) -> Path:
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--without-pip", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def site_packages(venv: Path) -> Path:
    (found,) = (venv / "lib").glob("python3*/site-packages")
    return found


def test_a_user_writable_runtime_or_a_planted_pth_file_is_refused(
    base: Path, make_account: Any
) -> None:
    acct = make_account()
    venv = make_venv(base / "venv")
    config = site(base, settings_extra={"python": str(venv / "bin" / "python")})
    packages = site_packages(venv)
    assert untrusted(config) == []

    # The account owns site-packages: it could plant a .pth run by every account.
    os.chown(packages, acct.pw_uid, acct.pw_gid)
    assert_refused(config, packages, f"owner {acct.pw_name}", "python sys.path")
    os.chown(packages, 0, 0)

    # A .pth file the account planted (and owns): refused, and never run by the check.
    ran = base / "pth-ran"
    planted = packages / "zz_planted.pth"
    planted.write_text(f"import pathlib; pathlib.Path({str(ran)!r}).touch()\n")
    os.chown(planted, acct.pw_uid, acct.pw_gid)
    assert_refused(config, planted, f"owner {acct.pw_name}", "python .pth file")
    assert not ran.exists(), "the check ran a .pth file it had not judged"
    planted.unlink()

    # The venv group-writable; a package directory inside world-writable.
    venv.chmod(0o775)
    assert_refused(config, venv, "mode 0775")
    venv.chmod(0o755)
    (packages / "somepkg").mkdir(mode=0o755)
    (packages / "somepkg").chmod(0o777)
    assert_refused(config, packages / "somepkg", "mode 0777")


def test_a_user_owned_audit_log_in_a_shared_directory_is_refused(
    base: Path, make_account: Any
) -> None:
    from mepd.audit import AuditLog, AuditUnavailable

    acct = make_account()
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    log = shared / "audit.jsonl"
    # The account was first: its own file (or a link) waits for root's appends.
    log.write_text("")
    os.chown(log, acct.pw_uid, acct.pw_gid)
    config = site(base, settings_extra={"audit_log": str(log)})
    assert_refused(config, shared, "mode 1777", "shared directory")
    assert_refused(config, log, f"owner {acct.pw_name}")
    done = mepd("serve", "--config", str(config))
    assert done.returncode == 2 and str(shared) in done.stderr

    # The audit log itself refuses such a file when it opens it (fstat, no race).
    with pytest.raises(AuditUnavailable, match="not owned by root"):
        AuditLog(log).open()
    # ... a symbolic link (O_NOFOLLOW) and a hard link to a file of root's.
    log.unlink()
    victim = base / "victim"
    victim.write_text("root's\n")
    log.symlink_to(victim)
    with pytest.raises(AuditUnavailable):
        AuditLog(log).open()
    log.unlink()
    os.link(victim, log)
    with pytest.raises(AuditUnavailable, match="hard link"):
        AuditLog(log).open()
    assert victim.read_text() == "root's\n"


def test_symbolic_link_tricks_are_followed_and_refused(base: Path, make_account: Any) -> None:
    acct = make_account(home_mode=0o755)
    config = site(base)
    home = Path(acct.pw_dir)
    mapping = base / "site" / "mapping.json"
    # A root-owned link into the account's home: the target's directory is the account's.
    theirs = home / "mapping.json"
    shutil.copy(mapping, theirs)
    os.chown(theirs, acct.pw_uid, acct.pw_gid)
    mapping.unlink()
    mapping.symlink_to(theirs)
    assert_refused(config, home, f"owner {acct.pw_name}")
    assert_refused(config, theirs, f"owner {acct.pw_name}")
    # A link the account owns, to a good root-owned file: the link itself is refused.
    good = base / "site" / "mapping-real.json"
    shutil.copy(theirs, good)
    os.chown(good, 0, 0)
    mapping.unlink()
    mapping.symlink_to(good)
    assert untrusted(config) == []
    os.lchown(mapping, acct.pw_uid, acct.pw_gid)
    assert_refused(config, mapping, "chown -h root:root")
    # A linked templates directory whose target another account can write.
    os.lchown(mapping, 0, 0)
    templates = base / "site" / "templates"
    moved = base / "elsewhere" / "templates"
    moved.parent.mkdir()
    templates.rename(moved)
    templates.symlink_to("../elsewhere/templates")
    assert untrusted(config) == []
    moved.parent.chmod(0o777)
    assert_refused(config, moved.parent, "mode 0777")


# -- start and reload ---------------------------------------------------------------------


def wait_for_reloads(daemon: RunningDaemon, count: int, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        out = mepd("status", "--state-dir", str(daemon.state_dir), timeout=30)
        if out.returncode == 0 and json.loads(out.stdout)["reloads"] >= count:
            return
        time.sleep(0.05)  # polling interval of a deadline loop
    raise AssertionError("the daemon did not reload in time")


def test_a_reload_that_finds_an_untrusted_file_keeps_the_old_configuration(
    base: Path, make_account: Any
) -> None:
    acct = make_account()
    config = site(base)
    policy = base / "site" / "policy.csv"
    with running_daemon(config, base / "site" / "state") as daemon:
        client = daemon.client(daemon.token(f"{acct.pw_name}@example.org"))
        assert client.get("/v1/endpoints/hpc/status").status_code == 200

        # A new policy that would take read_status away — in a file anyone can write.
        policy.write_text(policy.read_text() + "p, **, *, user:*, read_status, -, deny\n")
        policy.chmod(0o666)
        done = mepd("reload", "--config", str(config))
        assert done.returncode == 1
        assert CODE in done.stderr and f"{policy} (owner root(0), mode 0666)" in done.stderr
        assert client.get("/v1/endpoints/hpc/status").status_code == 200  # the old one

        # SIGHUP: the same, logged.
        daemon.process.send_signal(signal.SIGHUP)
        wait_for_reloads(daemon, 2)
        assert client.get("/v1/endpoints/hpc/status").status_code == 200
        assert CODE in daemon.stderr()

        # Made root's own again, the new policy takes effect.
        policy.chmod(0o644)
        assert mepd("reload", "--config", str(config)).returncode == 0
        assert client.get("/v1/endpoints/hpc/status").status_code == 403
        # Audited: two refused reloads naming the file, then one that took effect.
        audit = (base / "site" / "state" / "audit.jsonl").read_text()
        refused = [line for line in audit.splitlines() if '"event":"daemon.reload_failed"' in line]
        assert len(refused) == 2 and all(CODE in line and str(policy) in line for line in refused)
        assert audit.count('"event":"daemon.reloaded"') == 1


# -- single-account mode --------------------------------------------------------------------


def test_an_unprivileged_daemon_trusts_its_own_files_and_no_one_elses(
    base: Path, make_account: Any
) -> None:
    from tests.runtime_venv import runtime_python

    me, other = make_account(home_mode=0o755), make_account(home_mode=0o755)
    home = Path(me.pw_dir)
    shutil.copytree(REPO / "policies", home / "policies")
    config = write_deployment(home / "site", python=runtime_python())
    data = yaml.safe_load(config.read_text())
    data["endpoints"][0]["policy_model"] = str(home / "policies" / "model.conf")
    config.write_text(yaml.safe_dump(data))
    subprocess.run(["chown", "-R", f"{me.pw_uid}:{me.pw_gid}", str(home)], check=True)

    def check_as_me() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [runtime_python(), "-I", "-m", "mepd", "check", "--config", str(config)],
            user=me.pw_uid,
            group=me.pw_gid,
            extra_groups=[],
            env={"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd=str(home),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    done = check_as_me()
    assert done.returncode == 0, done.stderr
    policy = home / "site" / "policy.csv"
    os.chown(policy, other.pw_uid, other.pw_gid)
    done = check_as_me()
    assert done.returncode == 2
    assert f"{policy} (owner {other.pw_name}({other.pw_uid})" in done.stderr


# -- the examples, installed as root's files ------------------------------------------------


def install_examples(base: Path) -> Path:
    """examples/ and policies/ copied as root's files (dirs 0755, files 0644 or 0755)."""
    shutil.copytree(REPO / "examples", base / "examples")
    shutil.copytree(REPO / "policies", base / "policies")
    for path in [base / "examples", base / "policies", *base.rglob("*")]:
        if path.is_symlink():
            continue
        os.chown(path, 0, 0)
        executable = path.is_dir() or path.stat().st_mode & stat.S_IXUSR
        path.chmod(0o755 if executable else 0o644)
    return base / "examples"


def example_settings(base: Path, examples: Path) -> dict[str, Path]:
    """A settings file for every example directory (those without settings of their own
    use the daemon example's, with their mapping or template)."""
    daemon = examples / "daemon"
    data = yaml.safe_load((daemon / "mepd.yaml").read_text())
    data["state_dir"] = str(base / "state")
    data["audit_log"] = str(base / "log" / "audit.jsonl")
    (daemon / "mepd.yaml").write_text(yaml.safe_dump(data))
    configs = {"daemon": daemon / "mepd.yaml"}

    def variant(name: str, **endpoint: str) -> None:
        changed = json.loads(json.dumps(data))
        changed["endpoints"][0].update(endpoint)
        changed["endpoints"][0].pop("policy_tests", None)  # the tables are the daemon's
        path = daemon / f"check-{name.replace('/', '-')}.yaml"
        path.write_text(yaml.safe_dump(changed))
        configs[name] = path

    for mapping in ("expression", "external", "mixed"):
        variant(f"identity/{mapping}", mapping=str(examples / "identity" / f"{mapping}.json"))
    for folder in sorted((examples / "templates").iterdir()):
        variant(
            f"templates/{folder.name}",
            template=str(folder / "user_config_template.yaml.j2"),
            schema=str(folder / "user_config_schema.json"),
            environment=str(folder / "user_environment.yaml"),
        )
    demo = examples / "demo"
    values = {
        "STATE_DIR": str(base / "demo-state"),
        "PYTHON": sys.executable,
        "DEMO_DIR": str(demo),
        "WORK_DIR": str(demo),
        "REPO": str(base),
        "ALLOWED_FUNCTIONS": json.dumps(["0" * 64]),
        "ALICE_ACCOUNT": "mepdemo1",
        "BOB_ACCOUNT": "mepdemo2",
    }
    for source in ("settings.yaml.in", "mapping.json.in"):
        text = (demo / source).read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        (demo / source.removesuffix(".in")).write_text(text)
    configs["demo"] = demo / "settings.yaml"
    covered = {name.split("/")[0] for name in configs}
    assert covered == {p.name for p in examples.iterdir() if p.is_dir()}, covered
    return configs


def files_of(config: Path) -> list[Path]:
    """The files a settings file names (and itself), inside the installed examples."""
    settings = Settings.from_file(config)
    found = [config]
    for ep in settings.endpoints:
        for value in attrs_values(ep):
            found += list(value) if isinstance(value, tuple) else [value]
    paths = [Path(os.path.normpath(p)) for p in found if isinstance(p, Path)]
    return [p for p in dict.fromkeys(paths) if p.is_file()]


def attrs_values(obj: Any) -> list[Any]:
    import attrs

    return [getattr(obj, f.name) for f in attrs.fields(type(obj))]


@pytest.mark.slow
def test_every_example_passes_installed_as_roots_files_and_each_insecure_variant_fails(
    base: Path, make_account: Any
) -> None:
    acct = make_account()
    examples = install_examples(base)
    configs = example_settings(base, examples)
    for name, config in configs.items():
        done = mepd("check", "--config", str(config), timeout=300)
        assert done.returncode == 0, (name, done.stderr)

    for name, config in configs.items():
        variants: list[tuple[Path, int | None]] = [(p, 0o666) for p in files_of(config)]
        variants.append((config.parent, 0o777))
        if "external" in name or "mixed" in name:
            variants.append((examples / "identity" / "example_mapper.py", None))
        if name == "templates/slurm":
            variants.append((examples / "templates" / "slurm" / "common_heartbeats.yaml.j2", 0o666))
        for path, mode in variants:
            before = path.stat()
            if mode is None:
                os.chown(path, acct.pw_uid, acct.pw_gid)  # a program an ordinary user owns
            else:
                path.chmod(mode)
            try:
                assert_refused(config, path)
            finally:
                os.chown(path, before.st_uid, before.st_gid)
                path.chmod(stat.S_IMODE(before.st_mode))
        assert untrusted(config) == [], name
