"""``mepd map``: in-process for the many cases, as a real command for the end-to-end ones."""

from __future__ import annotations

import grp
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mepd.cli import main
from tests.accounts import create_group, delete_group

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "identity"
EXPR = "expression_identity_mapping#1.0.0"
KEYS = [
    "username",
    "matched_identity",
    "mapper",
    "rule",
    "candidates",
    "skipped",
    "account",
    "error",
]


def write_mapping(tmp_path: Path, docs: Any) -> str:
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(docs))
    return str(path)


def domain_mapping(tmp_path: Path) -> str:
    return write_mapping(
        tmp_path,
        [
            {
                "DATA_TYPE": EXPR,
                "mappings": [
                    {"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}
                ],
            }
        ],
    )


def run_map(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    stdin: Any,
) -> tuple[int, dict[str, Any] | None, str]:
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code = main(["map", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


@pytest.fixture
def mapmain(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    def call(argv: list[str], stdin: Any) -> tuple[int, dict[str, Any] | None, str]:
        return run_map(capsys, monkeypatch, argv, stdin)

    return call


def test_no_account_check_prints_the_result_and_exits_0(tmp_path: Path, mapmain: Any) -> None:
    code, out, err = mapmain(
        ["--mapping-config", domain_mapping(tmp_path), "--no-account-check"],
        {
            "identities": [
                {"id": "a", "username": "x@other.org"},
                {"id": "b", "username": "zoe@example.org"},
            ]
        },
    )
    assert code == 0, err
    assert out is not None and list(out) == KEYS
    assert out == {
        "username": "zoe",
        "matched_identity": "b",
        "mapper": 0,
        "rule": 0,
        "candidates": [{"identity": "b", "username": "zoe", "mapper": 0, "rule": 0}],
        "skipped": [],
        "account": None,
        "error": None,
    }
    assert err == ""


@pytest.mark.parametrize(
    "stdin",
    [
        {"id": "a", "username": "zoe@example.org"},
        [{"id": "a", "username": "zoe@example.org"}],
        {"identities": [{"id": "a", "username": "zoe@example.org"}]},
    ],
)
def test_three_input_shapes(tmp_path: Path, mapmain: Any, stdin: Any) -> None:
    code, out, _ = mapmain(
        ["--mapping-config", domain_mapping(tmp_path), "--no-account-check"], stdin
    )
    assert code == 0
    assert out is not None and out["username"] == "zoe"


def test_not_mapped_exits_1_with_reason(tmp_path: Path, mapmain: Any) -> None:
    code, out, err = mapmain(
        ["--mapping-config", domain_mapping(tmp_path), "--no-account-check"],
        {"id": "a", "username": "zoe@example.org.evil.com"},
    )
    assert code == 1
    assert out is not None and out["username"] is None and out["error"] == "identity.no_mapping"
    assert err.count("\n") == 1


def test_non_portable_name_fails_even_without_account_check(tmp_path: Path, mapmain: Any) -> None:
    code, out, _ = mapmain(
        ["--mapping-config", domain_mapping(tmp_path), "--no-account-check"],
        {"id": "a", "username": "4294967295@example.org"},
    )
    assert code == 1
    assert out is not None
    assert (out["username"], out["error"]) == ("4294967295", "identity.invalid_username")


@pytest.mark.parametrize(
    ("local", "reason"),
    [
        ("root", "identity.account_root"),
        ("0", "identity.invalid_username"),
        ("-1", "identity.invalid_username"),
        ("mep-no-such-user-x", "identity.account_missing"),
        ("аlice", "identity.invalid_username"),
    ],
)
def test_account_refusals_exit_1(tmp_path: Path, mapmain: Any, local: str, reason: str) -> None:
    code, out, err = mapmain(
        ["--mapping-config", domain_mapping(tmp_path)],
        {"id": "a", "username": f"{local}@example.org"},
    )
    assert code == 1
    assert out is not None and out["error"] == reason and out["account"] is None
    assert out["username"] == local
    assert err.startswith(f"mepd map: {reason}: ") and err.count("\n") == 1


def test_system_account_below_min_uid_is_refused(tmp_path: Path, mapmain: Any) -> None:
    # "daemon" (uid 1 on Debian) exists on every Debian-like system.
    code, out, _ = mapmain(
        ["--mapping-config", domain_mapping(tmp_path)],
        {"id": "a", "username": "daemon@example.org"},
    )
    assert code == 1
    assert out is not None and out["error"] == "identity.account_uid_too_low"


def test_deny_option(tmp_path: Path, mapmain: Any) -> None:
    code, out, _ = mapmain(
        ["--mapping-config", domain_mapping(tmp_path), "--deny", "zoe", "--min-uid", "0"],
        {"id": "a", "username": "zoe@example.org"},
    )
    assert code == 1
    assert out is not None and out["error"] == "identity.account_denied"


@pytest.mark.parametrize(
    "docs",
    [
        [{"DATA_TYPE": "nope"}],
        [{"DATA_TYPE": EXPR, "mappings": [{"source": "{username}", "match": "(", "output": "x"}]}],
        [
            {
                "DATA_TYPE": EXPR,
                "mappings": [
                    {"source": "{username}", "match": "a", "output": "x", "literal": "false"}
                ],
            }
        ],
    ],
)
def test_bad_mapping_exits_2_with_one_line(tmp_path: Path, mapmain: Any, docs: Any) -> None:
    code, out, err = mapmain(["--mapping-config", write_mapping(tmp_path, docs)], {"id": "a"})
    assert code == 2
    assert out is None
    assert err.startswith("mepd map: ") and err.count("\n") == 1
    assert "$[0]" in err


@pytest.mark.parametrize(
    "stdin",
    [b"", b"{", b"[]", b'{"identities": "x"}', b'[{"username": "no id"}]', b"\xff", b"5"],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, mapmain: Any, stdin: bytes) -> None:
    code, out, err = mapmain(["--mapping-config", domain_mapping(tmp_path)], stdin)
    assert code == 2
    assert out is None
    assert err.startswith("mepd map: input") and err.count("\n") == 1


def test_missing_mapping_file_exits_2(tmp_path: Path, mapmain: Any) -> None:
    code, _, err = mapmain(["--mapping-config", str(tmp_path / "absent.json")], {"id": "a"})
    assert code == 2 and "cannot read" in err


def test_failing_mapper_program_exits_1_with_its_reason(tmp_path: Path, mapmain: Any) -> None:
    prog = tmp_path / "hang.sh"
    prog.write_text("#!/bin/sh\nexec /bin/sleep 300\n")
    prog.chmod(0o755)
    docs = [{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": [str(prog)]}]
    code, out, err = mapmain(
        ["--mapping-config", write_mapping(tmp_path, docs), "--timeout", "0.5"], {"id": "a"}
    )
    assert code == 1
    assert out is not None and out["error"] == "identity.mapper_timeout"
    assert "mapper_timeout" in err


def test_shipped_examples_through_the_real_command() -> None:
    """``python -m mepd map`` as an administrator runs it, on the shipped examples."""
    identities = (EXAMPLES / "identities.json").read_bytes()
    answers = {}
    for name in ["expression", "external", "mixed"]:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mepd",
                "map",
                "--mapping-config",
                str(EXAMPLES / f"{name}.json"),
                "--no-account-check",
            ],
            input=identities,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        answers[name] = json.loads(proc.stdout)
    assert (answers["expression"]["username"], answers["expression"]["rule"]) == ("alice", 0)
    assert (answers["external"]["username"], answers["external"]["rule"]) == ("carol", None)
    # mixed: the expression document comes first and has a result, so it wins.
    assert (answers["mixed"]["username"], answers["mixed"]["mapper"]) == ("alice", 0)


@pytest.mark.root
def test_maps_to_real_accounts_through_mepd_map(tmp_path: Path, make_account: Any) -> None:
    group = create_group()
    try:
        first = make_account(groups=[group])
        second = make_account()
        mapping = write_mapping(
            tmp_path,
            [
                {
                    "DATA_TYPE": EXPR,
                    "mappings": [
                        {"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}
                    ],
                },
            ],
        )

        def mepd_map(identities: Any, *extra: str) -> tuple[int, dict[str, Any]]:
            proc = subprocess.run(
                [sys.executable, "-m", "mepd", "map", "--mapping-config", mapping, *extra],
                input=json.dumps(identities).encode(),
                capture_output=True,
                timeout=60,
                check=False,
            )
            return proc.returncode, json.loads(proc.stdout)

        for entry, extra_groups in [(first, [group]), (second, [])]:
            code, out = mepd_map(
                {
                    "identities": [
                        {"id": "x", "username": "someone@else.org"},
                        {"id": entry.pw_name, "username": f"{entry.pw_name}@example.org"},
                    ]
                }
            )
            assert code == 0, out
            assert out["error"] is None
            assert out["matched_identity"] == entry.pw_name
            account = out["account"]
            assert account == {
                "name": entry.pw_name,
                "uid": entry.pw_uid,
                "gid": entry.pw_gid,
                "home": entry.pw_dir,
                "shell": entry.pw_shell,
                "groups": sorted(
                    [grp.getgrgid(entry.pw_gid).gr_name, *extra_groups],
                    key=lambda n: grp.getgrnam(n).gr_gid,
                ),
            }
        # The same real account is refused when the site's min_uid is above its uid.
        code, out = mepd_map(
            {"id": "y", "username": f"{first.pw_name}@example.org"},
            "--min-uid",
            str(first.pw_uid + 1),
        )
        assert (code, out["error"], out["account"]) == (1, "identity.account_uid_too_low", None)
    finally:
        delete_group(group)


def test_linked_identities_that_disagree_are_shown_with_their_candidates(
    tmp_path: Path, mapmain: Any
) -> None:
    linked = [{"id": "b", "username": "bob@example.org"}, {"id": "a", "username": "al@example.org"}]
    for order in (linked, linked[::-1]):
        code, out, err = mapmain(
            ["--mapping-config", domain_mapping(tmp_path), "--no-account-check"],
            [{"id": "p", "username": "p@other.org"}, *order],
        )
        assert code == 1
        assert out is not None and out["error"] == "identity.ambiguous_mapping"
        assert out["username"] is None
        assert [(c["identity"], c["username"]) for c in out["candidates"]] == [
            ("a", "al"),
            ("b", "bob"),
        ]
        assert err.startswith("mepd map: identity.ambiguous_mapping: ")
        assert "a -> 'al'" in err and "b -> 'bob'" in err


def test_a_closed_linked_identity_is_not_mapped(tmp_path: Path, mapmain: Any) -> None:
    code, out, _ = mapmain(
        ["--mapping-config", domain_mapping(tmp_path), "--no-account-check"],
        [
            {"id": "p", "username": "p@other.org"},
            {"id": "a", "username": "al@example.org", "status": "closed"},
        ],
    )
    assert code == 1
    assert out is not None and out["error"] == "identity.no_mapping"
