"""``mepd init DIR`` (issue 21, item 2): a commented, working starting configuration.

Its output passes ``mepd check`` as written (file trust included: the test's DIR is
under a root-owned 0755 base outside /tmp, ``tests/trusted_dir.py``), the policy list
is the shipped ``base.csv`` (byte for byte) then the site's lines, its decision tables
pass, and the mapping maps ``<name>@<domain>``. Existing files are kept unless
``--force``, a planted symbolic link is never followed, and a DIR the trust check
refuses (under /tmp) is reported at once.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mepcore.authz import MODEL_TEXT
from tests.trusted_dir import trusted_directory

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "mepd.yaml",
    "mapping.json",
    "model.conf",
    "base.csv",
    "site.csv",
    "policy_tests.yaml",
    "user_config_template.yaml.j2",
    "user_config_schema.json",
    "user_environment.yaml",
}


def mepd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepd", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        input=stdin,
    )


@pytest.fixture
def top() -> Iterator[Path]:
    with trusted_directory("mept-init-") as path:
        yield path


def init(top: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return mepd("init", str(top / "etc"), "--state-dir", str(top / "state"), *extra)


def test_the_output_passes_mepd_check(top: Path) -> None:
    done = init(top)
    assert done.returncode == 0, done.stderr
    assert "mepd check passes" in done.stdout
    folder = top / "etc"
    assert {p.name for p in folder.iterdir()} == FILES
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for path in folder.iterdir():
        info = path.lstat()
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o644, path
        assert info.st_uid == os.geteuid()
    checked = mepd("check", "--config", str(folder / "mepd.yaml"))
    assert checked.returncode == 0, checked.stderr
    assert "warning" not in checked.stderr  # nothing likely to be a mistake either
    tables = mepd("policy", "test", "--config", str(folder / "mepd.yaml"))
    assert tables.returncode == 0 and " 0 failed" in tables.stdout, tables.stdout


def test_the_policy_is_the_shipped_base_then_the_sites_lines(top: Path) -> None:
    assert init(top).returncode == 0
    folder = top / "etc"
    assert (folder / "base.csv").read_text() == (REPO / "policies" / "base.csv").read_text()
    assert (folder / "model.conf").read_text().endswith(MODEL_TEXT)
    settings = (folder / "mepd.yaml").read_text()
    assert "policy: [base.csv, site.csv]" in settings


def test_every_file_explains_itself(top: Path) -> None:
    assert init(top).returncode == 0
    folder = top / "etc"
    for name in FILES - {"mapping.json", "user_config_schema.json"}:
        assert "#" in (folder / name).read_text(), name  # YAML, CSV and Jinja2 comments
    assert json.loads((folder / "mapping.json").read_text())[0]["comment"]
    assert json.loads((folder / "user_config_schema.json").read_text())["$comment"]
    settings = (folder / "mepd.yaml").read_text()
    for key in ("state_dir", "audit_log", "min_uid", "deny_accounts", "issuers", "endpoints"):
        assert key in settings


def test_domain_and_endpoint_are_used(top: Path) -> None:
    done = init(top, "--domain", "uni.example.edu", "--endpoint", "hpc")
    assert done.returncode == 0, done.stderr
    config = str(top / "etc" / "mepd.yaml")
    identity = json.dumps({"id": "1", "username": "alice@uni.example.edu"})
    mapped = mepd("map", "--config", config, "--no-account-check", stdin=identity)
    assert json.loads(mapped.stdout)["username"] == "alice", mapped.stderr
    other = json.dumps({"id": "1", "username": "alice@example.org"})
    unmapped = mepd("map", "--config", config, "--no-account-check", stdin=other)
    assert json.loads(unmapped.stdout)["error"] == "identity.no_mapping"
    explained = mepd(
        "policy",
        "explain",
        "--config",
        config,
        "--request",
        json.dumps(
            {
                "obj": "function:" + "a" * 64,
                "action": "submit_task",
                "uid": 1001,
                "principals": ["domain:uni.example.edu", "user:alice"],
            }
        ),
    )
    assert explained.returncode == 0, explained.stdout + explained.stderr
    assert json.loads(explained.stdout)["request"]["endpoint"] == "hpc"


def test_existing_files_are_kept_unless_forced(top: Path) -> None:
    folder = top / "etc"
    folder.mkdir(mode=0o755)
    (folder / "site.csv").write_text("# mine\n")
    done = init(top)
    assert done.returncode == 2 and "site.csv" in done.stderr
    assert (folder / "site.csv").read_text() == "# mine\n"
    assert [p.name for p in folder.iterdir()] == ["site.csv"]
    forced = init(top, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "domain:example.org" in (folder / "site.csv").read_text()


def test_a_planted_link_is_replaced_not_followed(top: Path) -> None:
    folder = top / "etc"
    folder.mkdir(mode=0o755)
    victim = top / "victim"
    victim.write_text("untouched\n")
    (folder / "mepd.yaml").symlink_to(victim)
    assert init(top).returncode == 2
    assert init(top, "--force").returncode == 0
    assert victim.read_text() == "untouched\n"
    assert not (folder / "mepd.yaml").is_symlink()


def test_a_directory_the_trust_check_refuses_is_reported(tmp_path: Path) -> None:
    """Under a shared sticky directory (/tmp) mepd would refuse every file: init says so."""
    shared = Path(tempfile.mkdtemp(prefix="mept-init-", dir="/tmp"))
    try:
        done = mepd("init", str(shared / "etc"), "--state-dir", str(tmp_path / "state"))
        assert done.returncode == 1, done.stderr
        assert "settings.untrusted_file" in done.stderr and "/tmp" in done.stderr
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)


@pytest.mark.parametrize(
    "args", [["--domain", "not a domain"], ["--endpoint", "a/b"], ["--port", "70000"]]
)
def test_bad_options_write_nothing(top: Path, args: list[str]) -> None:
    done = init(top, *args)
    assert done.returncode == 2 and done.stderr.startswith("mepd init: ")
    assert not (top / "etc").exists()
