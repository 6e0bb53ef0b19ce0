"""``mep-ood-map`` called the way Open OnDemand calls its ``user_map_cmd``.

Open OnDemand's Apache module runs ``<user_map_cmd> '<REMOTE_USER, URL-encoded>'``
through a shell, reads the first line of stdout as the local user name and refuses the
request when it is empty. ``ood_map`` below does exactly that with the installed console
script, so every case checks what Open OnDemand would see: the name (or nothing), and
the exit status and the administrator's line on stderr.

Cases that need real accounts (a mapped one, a denied one, a locked one) are marked
``root`` and create them with ``make_account``; the refusals of uid 0, low uids, missing
accounts, unmapped names, names that look like options and broken input run anywhere.
"""

from __future__ import annotations

import json
import pwd
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote_plus

import pytest

SCRIPT = Path(sys.executable).with_name("mep-ood-map")
DOMAIN = "campus.example"
MAPPING = [
    {
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [{"source": "{username}", "match": r"(.*)@campus\.example", "output": "{0}"}],
    }
]


def apache_escape(remote_user: str) -> str:
    """Apache's ``r:escape`` (``ap_escape_urlencoded``): form encoding, space as ``+``;
    only letters, digits and ``.-*_`` stay as they are."""
    return quote_plus(remote_user, safe="*").replace("~", "%7E")


def ood_map(user_map_cmd: str, remote_user: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """What mod_ood_proxy does: ``io.popen(cmd .. " '" .. r:escape(user) .. "'")`` and
    ``handle:read()`` (the first line of stdout, without its newline)."""
    done = subprocess.run(
        ["/bin/sh", "-c", f"{user_map_cmd} '{apache_escape(remote_user)}'"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    first_line = done.stdout.split("\n", 1)[0]
    return first_line, done


@pytest.fixture
def mapping_file(tmp_path: Path) -> Path:
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(MAPPING))
    return path


@pytest.fixture
def user_map_cmd(mapping_file: Path) -> str:
    """The ``user_map_cmd`` of ood_portal.yml, as docs/integrations.md writes it."""
    return f"{shlex.quote(str(SCRIPT))} --mapping-config {shlex.quote(str(mapping_file))}"


def assert_refused(done: subprocess.CompletedProcess[str], name: str, reason: str) -> None:
    assert name == ""
    assert done.stdout == ""
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"mep-ood-map: {reason}: "), done.stderr
    assert done.stderr.count("\n") == 1


def test_the_console_script_is_installed() -> None:
    assert SCRIPT.is_file(), "pip install -e . installs mep-ood-map next to python"


def test_an_unmapped_remote_user_gets_nothing(user_map_cmd: str) -> None:
    name, done = ood_map(user_map_cmd, "alice@elsewhere.example")
    assert_refused(done, name, "identity.no_mapping")


def test_uid_0_is_refused(user_map_cmd: str) -> None:
    name, done = ood_map(user_map_cmd, f"root@{DOMAIN}")
    assert_refused(done, name, "identity.account_root")


def test_a_missing_account_is_refused(user_map_cmd: str) -> None:
    name, done = ood_map(user_map_cmd, f"meptnosuchaccount@{DOMAIN}")
    assert_refused(done, name, "identity.account_missing")


def test_a_system_account_below_min_uid_is_refused(user_map_cmd: str) -> None:
    system = next((e for e in pwd.getpwall() if 0 < e.pw_uid < 1000 and e.pw_name.isalpha()), None)
    if system is None:
        pytest.skip("no system account with 0 < uid < 1000 on this machine")
    name, done = ood_map(user_map_cmd, f"{system.pw_name}@{DOMAIN}")
    assert_refused(done, name, "identity.account_uid_too_low")


def test_an_account_on_the_deny_list_is_refused(user_map_cmd: str) -> None:
    name, done = ood_map(f"{user_map_cmd} --deny operator", f"operator@{DOMAIN}")
    assert_refused(done, name, "identity.account_denied")


@pytest.mark.parametrize(
    "remote_user", ["--allow-nologin-shell", "--help", "-h", "--min-uid=0", "--"]
)
def test_a_remote_user_that_looks_like_an_option_is_a_name(
    user_map_cmd: str, remote_user: str
) -> None:
    name, done = ood_map(user_map_cmd, remote_user)
    assert_refused(done, name, "identity.no_mapping")


def test_a_remote_user_with_a_newline_is_refused(user_map_cmd: str) -> None:
    # URL-encoded by Apache, decoded here: a newline must never reach the answer.
    name, done = ood_map(user_map_cmd, f"alice\nroot@{DOMAIN}")
    assert_refused(done, name, "identity.input_invalid")


def test_a_remote_user_that_is_not_utf8_is_refused(user_map_cmd: str) -> None:
    done = subprocess.run(
        ["/bin/sh", "-c", f"{user_map_cmd} '%FF%40{DOMAIN}'"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_refused(done, "", "identity.input_invalid")


def test_a_broken_mapping_file_is_a_usage_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": [{}]}]')
    for path in (broken, tmp_path / "absent.json"):
        name, done = ood_map(f"{SCRIPT} --mapping-config {path}", f"alice@{DOMAIN}")
        assert (name, done.stdout, done.returncode) == ("", "", 2)
        assert done.stderr.startswith(f"mep-ood-map: {path}"), done.stderr


def test_without_a_mapping_file_it_is_a_usage_error() -> None:
    name, done = ood_map(str(SCRIPT), f"alice@{DOMAIN}")
    assert (name, done.stdout, done.returncode) == ("", "", 2)
    assert "--mapping-config" in done.stderr


def test_help_goes_to_stderr() -> None:
    done = subprocess.run(
        [str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.stdout, done.returncode) == ("", 0)
    assert "REMOTE_USER" in done.stderr


def test_main_in_process_answers_like_the_script(mapping_file: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from mepcore.contrib.ood import main

    assert main(["--mapping-config", str(mapping_file), f"root%40{DOMAIN}"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("mep-ood-map: identity.account_root")


# -- real accounts (root) ----------------------------------------------------------------


@pytest.mark.root
def test_a_mapped_account_is_printed(user_map_cmd: str, make_account) -> None:  # type: ignore[no-untyped-def]
    entry = make_account()
    name, done = ood_map(user_map_cmd, f"{entry.pw_name}@{DOMAIN}")
    assert (name, done.stdout, done.returncode) == (entry.pw_name, entry.pw_name + "\n", 0)
    assert done.stderr == ""


@pytest.mark.root
def test_a_mapped_account_literally_with_no_decode(mapping_file: Path, make_account) -> None:  # type: ignore[no-untyped-def]
    entry = make_account()
    done = subprocess.run(
        [
            str(SCRIPT),
            "--mapping-config",
            str(mapping_file),
            "--no-decode",
            entry.pw_name + "@" + DOMAIN,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.stdout, done.returncode) == (entry.pw_name + "\n", 0)


@pytest.mark.root
def test_a_real_account_on_the_deny_list_is_refused(user_map_cmd: str, make_account) -> None:  # type: ignore[no-untyped-def]
    entry = make_account()
    name, done = ood_map(f"{user_map_cmd} --deny {entry.pw_name}", f"{entry.pw_name}@{DOMAIN}")
    assert_refused(done, name, "identity.account_denied")


@pytest.mark.root
def test_a_locked_account_is_refused(user_map_cmd: str, make_account) -> None:  # type: ignore[no-untyped-def]
    entry = make_account()
    subprocess.run(["usermod", "--lock", entry.pw_name], check=True, capture_output=True)
    name, done = ood_map(user_map_cmd, f"{entry.pw_name}@{DOMAIN}")
    assert_refused(done, name, "identity.account_locked")


@pytest.mark.root
def test_a_nologin_account_needs_the_option(user_map_cmd: str, make_account) -> None:  # type: ignore[no-untyped-def]
    entry = make_account()
    subprocess.run(
        ["usermod", "--shell", "/usr/sbin/nologin", entry.pw_name], check=True, capture_output=True
    )
    name, done = ood_map(user_map_cmd, f"{entry.pw_name}@{DOMAIN}")
    assert_refused(done, name, "identity.account_nologin")
    name, done = ood_map(f"{user_map_cmd} --allow-nologin-shell", f"{entry.pw_name}@{DOMAIN}")
    assert (name, done.returncode) == (entry.pw_name, 0)
