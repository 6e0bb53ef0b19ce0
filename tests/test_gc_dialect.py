"""The match dialect of mapping rules, its safety rules, and what mepd check warns about.

The property tests compare mep with an oracle written from the documented facts of the
reference's dialect (../shared/GC-COMPAT.md §1: the load-time checks, the characters it
makes ordinary, ``re.match`` of ``^…$``): whatever the pattern and the subject, mep
either refuses or matches with exactly the reference's groups, and it refuses to load
whatever the reference refuses to load.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mepcore.config import SiteFiles, site_warnings
from mepcore.identity import IdentityMapper
from mepcore.identity.dialect import MatchSyntaxError, compile_match, pattern_warnings
from mepcore.types import Account, IdentitySet
from tests.trusted_dir import trusted_directory

EXPR = "expression_identity_mapping#1.0.0"


def oracle(match: str, ignore_case: bool) -> re.Pattern[str] | None:
    """The reference's compiled pattern, from GC-COMPAT.md §1 (None: a load error)."""
    if re.search(r"\\[^.?*|()\\0-9]", match) or re.search(r"[*?]\?", match):
        return None
    if re.match(r"[*?]", match):
        return None
    escaped = re.sub(r"(?<!\\)([\^$+{}\[\]])", r"\\\1", match)
    try:
        return re.compile("^" + escaped + "$", re.I if ignore_case else 0)
    except re.error:
        return None


PATTERN_CHARS = st.sampled_from(list("ab.?*|()\\^$+{}[]1@-"))
SUBJECT_CHARS = st.sampled_from(list("ab.@\n1$^[]{}+(-"))


@settings(max_examples=3000, deadline=None)
@given(
    match=st.text(PATTERN_CHARS, min_size=1, max_size=8),
    subjects=st.lists(st.text(SUBJECT_CHARS, max_size=7), min_size=1, max_size=8),
    ignore_case=st.booleans(),
)
def test_mep_matches_as_the_reference_or_not_at_all(
    match: str, subjects: list[str], ignore_case: bool
) -> None:
    reference = oracle(match, ignore_case)
    try:
        ours = compile_match(match, ignore_case=ignore_case)
    except MatchSyntaxError:
        return  # refusing is always allowed (see the by-design refusals below)
    assert reference is not None, f"mep loads {match!r}, which the reference refuses"
    for subject in subjects:
        found = ours.fullmatch(subject)
        if found is not None:
            theirs = reference.match(subject)
            assert theirs is not None and theirs.groups() == found.groups(), (match, subject)


@pytest.mark.parametrize(
    ("match", "why"),
    [
        ("alice\\", "a trailing backslash"),
        ("(?:alice)", "(?...) group extensions"),
        ("(?P<n>a)", "(?...) group extensions"),
    ],
)
def test_the_refusals_by_design_are_only_these(match: str, why: str) -> None:
    assert oracle(match, False) is not None  # the reference loads them
    with pytest.raises(MatchSyntaxError, match=re.escape(why.split()[0])):
        compile_match(match)


def test_literal_matches_exactly_and_refuses_a_backslash() -> None:
    assert compile_match("a.b[c]+", literal=True).fullmatch("a.b[c]+")
    assert not compile_match("a.b", literal=True).fullmatch("axb")
    with pytest.raises(MatchSyntaxError, match="literal"):
        compile_match("a\\.b", literal=True)
    # In Python's syntax a literal backslash is just a character.
    assert compile_match("a\\.b", literal=True, syntax="python").fullmatch("a\\.b")


def test_python_syntax_is_an_explicit_opt_in_and_still_whole_string() -> None:
    pattern = compile_match("([a-z]+)@x\\.org", syntax="python")
    assert pattern.fullmatch("abc@x.org") and not pattern.fullmatch("abc@x.org\n")
    assert not compile_match("([a-z]+)@x\\.org").fullmatch("abc@x.org")
    assert not compile_match("a|b", syntax="python").fullmatch("ab")
    with pytest.raises(MatchSyntaxError, match="unknown mep_match_syntax"):
        compile_match("a", syntax="perl")


# -- warnings ----------------------------------------------------------------------------


def warnings_of(match: str, output: str = "{0}", literal: bool = False, syntax: str = "gcs") -> set:
    groups = [int(g) for g in re.findall(r"{(\d+)}", output)]
    fields = re.findall(r"{([A-Za-z_]\w*)}", output)
    return {
        code
        for _, _, code in pattern_warnings(
            match,
            literal=literal,
            syntax=syntax,
            output_groups=groups,
            output_fields=fields,
            output_text=re.sub(r"{[^}]*}", "", output),
        )
    }


def test_warnings_about_likely_mistakes() -> None:
    assert warnings_of("(.*)@example.com") == {"unescaped_dot", "output_may_contain_at"}
    assert warnings_of("(.*)@example\\.com") == {"output_may_contain_at"}
    assert warnings_of("(a*)@example\\.com") == set()
    assert warnings_of("alice@example.org", output="alice") == {"unescaped_dot"}
    assert warnings_of("alice@example.org", output="alice", literal=True) == set()
    assert warnings_of("ali.e", output="x") == set()  # no domain: no warning
    assert warnings_of(".*", output="{username}") == {"output_may_contain_at"}
    assert warnings_of(".*", output="a@b") == {"output_may_contain_at"}
    assert warnings_of("([^@]*)@x\\.org", syntax="python") == set()
    assert warnings_of("(\\S+)@x\\.org", syntax="python") == {"output_may_contain_at"}
    assert warnings_of("([^a]+)@x\\.org", syntax="python") == {"output_may_contain_at"}
    assert warnings_of("([a-z@]+)@x\\.org", syntax="python") == {"output_may_contain_at"}
    assert warnings_of("([a-z]+)@x\\.org", syntax="python") == set()


def test_the_mapper_collects_warnings_with_their_place() -> None:
    mapper = IdentityMapper.from_documents(
        [
            {
                "DATA_TYPE": EXPR,
                "comment": "not warned about",
                "Mappings": [],
                "mappings": [
                    {"source": "{username}", "match": "(.*)@example.com", "output": "{0}"},
                    {"source": "{id}", "match": "(a*)", "output": "{0}", "literall": True},
                ],
            }
        ]
    )
    assert [(w.path, w.code) for w in mapper.warnings] == [
        ("$[0].Mappings", "unknown_key"),
        ("$[0].mappings[1].literall", "unknown_key"),
        ("$[0].mappings[0].match", "unescaped_dot"),
        ("$[0].mappings[0].output", "output_may_contain_at"),
    ]
    # Still the reference's meaning: it maps.
    who = IdentitySet.from_json({"id": "1", "username": "bob@example.com"})
    assert mapper.map(who).username == "bob"


def test_site_warnings_name_the_keys_mep_ignores() -> None:
    files = SiteFiles.from_texts(
        "amqp_port: 443\n{% if x is defined %}\nauthentication_policy: {{ x }}\n{% endif %}\n"
        "engine:\n  type: GlobusComputeEngine\n  container_type: docker\n"
    )
    account = Account("nobody", 65534, 65534, "/", "/bin/false")
    found = {(w.path, w.code) for w in site_warnings(files, account)}
    assert found == {
        ("$.amqp_port", "ignored_key"),
        ("$.authentication_policy", "ignored_key"),
        ("$.engine.container_type", "ignored_key"),
    }


def test_mepd_check_and_render_print_the_warnings() -> None:
    repo = Path(__file__).resolve().parents[1]
    with trusted_directory("mept-gcw-") as top:
        (top / "mapping.json").write_text(
            json.dumps(
                [
                    {
                        "DATA_TYPE": EXPR,
                        "ignore-case": True,
                        "mappings": [
                            {"source": "{username}", "match": "(.*)@example.org", "output": "{0}"}
                        ],
                    }
                ]
            )
        )
        (top / "t.yaml.j2").write_text("amqp_port: 443\nengine: {type: ThreadPoolEngine}\n")
        (top / "mepd.yaml").write_text(
            json.dumps(
                {
                    "state_dir": str(top / "state"),
                    "endpoints": [
                        {
                            "name": "hpc",
                            "template": "t.yaml.j2",
                            "mapping": "mapping.json",
                            "policy_model": str(repo / "policies" / "model.conf"),
                            "policy": str(repo / "policies" / "base.csv"),
                        }
                    ],
                }
            )
        )
        for path in top.iterdir():
            path.chmod(0o644)
        check = subprocess.run(
            [sys.executable, "-m", "mepd", "check", "--config", str(top / "mepd.yaml")],
            capture_output=True,
            text=True,
            check=False,
        )
        render = subprocess.run(
            [sys.executable, "-m", "mepd", "render", "--template", str(top / "t.yaml.j2")],
            capture_output=True,
            text=True,
            check=False,
        )
    assert check.returncode == 0, check.stderr
    warned = [line for line in check.stderr.splitlines() if "warning: endpoint hpc" in line]
    assert any("ignore-case']: unknown key, ignored" in line for line in warned)
    assert any("example.org" in line and "unescaped" in line for line in warned)
    assert any("'@'" in line for line in warned)
    assert any("$.amqp_port: accepted and ignored" in line for line in warned)
    assert render.returncode == 0, render.stderr
    assert "mepd render: warning: $.amqp_port: accepted and ignored: mep has no AMQP" in (
        render.stderr
    )
