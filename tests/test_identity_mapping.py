"""Loading mapping documents and applying expression rules (pure; no processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mepcore.errors import IdentityConfigError, IdentityError
from mepcore.identity import Candidate, IdentityMapper, MappingResult
from mepcore.types import IdentitySet

EXPR = "expression_identity_mapping#1.0.0"
EXT = "external_identity_mapping#1.0.0"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "identity"


def rule(
    match: str, output: str = "{0}", source: str = "{username}", **extra: Any
) -> dict[str, Any]:
    return {"source": source, "match": match, "output": output, **extra}


def expr(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"DATA_TYPE": EXPR, "mappings": list(rules)}


def ids(*identities: dict[str, Any]) -> IdentitySet:
    return IdentitySet.from_json(list(identities))


def user(ident: str, **fields: Any) -> dict[str, Any]:
    return {"id": ident, **fields}


def mapped(docs: Any, identities: IdentitySet) -> MappingResult:
    return IdentityMapper.from_documents(docs).map(identities)


def config_error(docs: Any) -> IdentityConfigError:
    with pytest.raises(IdentityConfigError) as info:
        IdentityMapper.from_documents(docs)
    assert info.value.reason == "identity.mapping_invalid"
    return info.value


def paths(error: IdentityConfigError) -> list[str]:
    return [v.path for v in error.violations]


# -- whole-string matching ---------------------------------------------------------

DOMAIN_RULE = [expr(rule(r"(.*)@example\.org"))]


def test_domain_rule_maps_the_local_part() -> None:
    result = mapped(DOMAIN_RULE, ids(user("u1", username="alice@example.org")))
    assert (result.username, result.matched_identity, result.mapper, result.rule) == (
        "alice",
        "u1",
        0,
        0,
    )
    assert result.candidates == (Candidate("u1", "alice", 0, 0),)


@pytest.mark.parametrize(
    "username",
    [
        "alice@example.org.evil.com",
        "alice@example.org\n",
        "alice@example.orgx",
        "alice@exampleXorg",
        "\nalice@example.org",
    ],
)
def test_domain_rule_matches_the_whole_string_only(username: str) -> None:
    result = mapped(DOMAIN_RULE, ids(user("u1", username=username)))
    assert result.username is None
    assert result.candidates == ()


def test_alternation_matches_the_whole_string_only() -> None:
    docs = [expr(rule("alice|bob", output="shared", source="{username}"))]
    assert mapped(docs, ids(user("u1", username="alicex"))).username is None
    assert mapped(docs, ids(user("u1", username="xbob"))).username is None
    assert mapped(docs, ids(user("u1", username="bob"))).username == "shared"


def test_ignore_case_true_and_false() -> None:
    strict = [expr(rule(r"(.*)@example\.org", ignore_case=False))]
    loose = [expr(rule(r"(.*)@example\.org", ignore_case=True))]
    who = ids(user("u1", username="Alice@EXAMPLE.org"))
    assert mapped(strict, who).username is None
    assert mapped(loose, who).username == "Alice"


def test_literal_compares_the_whole_string_literally() -> None:
    docs = [expr(rule("a.b@example.org", output="ab", literal=True))]
    assert mapped(docs, ids(user("u1", username="a.b@example.org"))).username == "ab"
    assert mapped(docs, ids(user("u1", username="aXb@example.org"))).username is None
    assert mapped(docs, ids(user("u1", username="a.b@example.org.x"))).username is None


def test_literal_with_ignore_case() -> None:
    docs = [expr(rule("Alice@Example.org", output="alice", literal=True, ignore_case=True))]
    assert mapped(docs, ids(user("u1", username="ALICE@example.ORG"))).username == "alice"


# -- interpolation -----------------------------------------------------------------


def test_source_and_output_interpolate_fields_and_groups() -> None:
    docs = [
        expr(
            rule(
                r"(.*)\|(.*)",
                source="{email}|{identity_provider}",
                output="{1}_{0}",
            )
        )
    ]
    who = ids(user("u1", email="carol@lab.org", identity_provider="idp7"))
    assert mapped(docs, who).username == "idp7_carol@lab.org"


def test_output_may_use_identity_fields() -> None:
    docs = [expr(rule(r".*@example\.org", output="x{id}"))]
    assert mapped(docs, ids(user("42", username="dave@example.org"))).username == "x42"


def test_missing_field_fails_the_whole_document_for_the_identity_set() -> None:
    # As in Globus Compute: any (rule, identity) that cannot be evaluated makes the
    # document give no result; its later rules are not tried, the next document is.
    docs = [
        expr(
            rule(r"(.*)@a\.org", source="{email}"),
            rule(r"(.*)@b\.org", source="{username}"),
        ),
        expr(rule(r"(.*)@b\.org", output="{0}-next")),
    ]
    who = ids(
        user("no-email", username="erin@b.org"),
        user("has-email", email="frank@a.org", username="frank@c.org"),
    )
    result = mapped(docs, who)
    assert (result.username, result.mapper, result.rule) == ("erin-next", 1, 0)
    assert len(result.skipped) == 1
    assert result.skipped[0].startswith("$[0].mappings[0].source: identity no-email has no {email}")
    alone = mapped(docs[:1], who)
    assert (alone.username, alone.candidates) == (None, ())
    assert alone.to_dict()["skipped"] == list(alone.skipped) != []


def test_missing_output_field_fails_the_document_only_when_the_rule_matches() -> None:
    docs = [expr(rule(r".*@a\.org", output="{email}"), rule(r"(.*)@b\.org"))]
    assert mapped(docs, ids(user("u", username="x@b.org"))).username == "x"
    failed = mapped(docs, ids(user("u", username="x@a.org")))
    assert failed.username is None
    assert "output: identity u has no {email}" in failed.skipped[0]


def test_non_string_field_counts_as_missing() -> None:
    docs = [expr(rule(r"(.*)", source="{email}"))]
    assert mapped(docs, ids(user("u1", email=None))).username is None
    assert mapped(docs, ids(user("u1", email=["a"]))).skipped != ()


def test_empty_output_decides_and_is_no_mapping() -> None:
    # The reference takes the empty name of the deciding rule and fails: no fallback.
    docs = [expr(rule(r"(.*)@example\.org"), rule(r".*", output="fallback"))]
    result = mapped(docs, ids(user("u1", username="@example.org")))
    assert (result.username, result.matched_identity) == (None, None)
    assert [(c.username, c.rule) for c in result.candidates] == [("", 0), ("fallback", 1)]
    assert (
        mapped(
            [*docs, expr(rule(".*", output="later"))], ids(user("u1", username="@example.org"))
        ).username
        is None
    )


def test_group_that_did_not_take_part_fails_the_document() -> None:
    docs = [expr(rule(r"(x)?(.*)", output="{0}{1}"))]
    result = mapped(docs, ids(user("u1", username="abc")))
    assert result.username is None
    assert result.skipped == ("$[0].mappings[0].output: group {0} took no part in the match",)
    # Not used in the output: no harm done.
    assert (
        mapped([expr(rule(r"(x)?(.*)", output="{1}"))], ids(user("u1", username="abc"))).username
        == "abc"
    )


def test_escaped_braces_are_literal() -> None:
    docs = [expr(rule(r"(.*)", output="{{{0}}}"))]
    assert mapped(docs, ids(user("u1", username="a"))).username == "{a}"


def test_over_long_source_does_not_match() -> None:
    docs = [expr(rule(r"(.*)", output="long"))]
    assert mapped(docs, ids(user("u1", username="a" * 1025))).username is None
    assert mapped(docs, ids(user("u1", username="a" * 1024))).username == "long"


# -- selection order ---------------------------------------------------------------


def test_first_rule_wins_over_first_identity() -> None:
    docs = [expr(rule(r"(.*)@first\.org"), rule(r"(.*)@second\.org"))]
    who = ids(user("a", username="x@second.org"), user("b", username="y@first.org"))
    result = mapped(docs, who)
    assert (result.username, result.matched_identity, result.rule) == ("y", "b", 0)
    assert [(c.identity, c.rule) for c in result.candidates] == [("b", 0), ("a", 1)]


def test_first_identity_wins_within_a_rule() -> None:
    docs = [expr(rule(r"(.*)@example\.org"))]
    who = ids(user("a", username="one@example.org"), user("b", username="two@example.org"))
    result = mapped(docs, who)
    assert (result.username, result.matched_identity) == ("one", "a")
    assert len(result.candidates) == 2


def test_first_mapper_with_a_result_wins_and_later_mappers_are_not_consulted() -> None:
    docs = [
        expr(rule(r"(.*)@nomatch\.org")),
        expr(rule(r"(.*)@example\.org", output="{0}-second")),
        expr(rule(r"(.*)@example\.org", output="{0}-third")),
    ]
    result = mapped(docs, ids(user("a", username="g@example.org")))
    assert (result.username, result.mapper, result.rule) == ("g-second", 1, 0)
    assert {c.mapper for c in result.candidates} == {1}


def test_no_match_is_a_result_not_an_error() -> None:
    result = mapped(DOMAIN_RULE, ids(user("a", username="h@other.org")))
    assert result == MappingResult(None, None, None, None, ())
    assert result.to_dict() == {
        "username": None,
        "matched_identity": None,
        "mapper": None,
        "rule": None,
        "candidates": [],
        "skipped": [],
    }


# -- configuration errors, each naming the document and field ---------------------


def test_unknown_data_type_names_document_and_field() -> None:
    error = config_error([expr(rule("(a)")), {"DATA_TYPE": "expression_identity_mapping#2.0.0"}])
    assert paths(error) == ["$[1].DATA_TYPE"]
    assert "$[1].DATA_TYPE" in str(error)


def test_missing_data_type() -> None:
    assert paths(config_error([{"mappings": []}])) == ["$[0].DATA_TYPE"]


@pytest.mark.parametrize("doc", [[], "text", 3, None, [[]], ["x"]])
def test_not_a_list_of_documents(doc: Any) -> None:
    error = config_error(doc)
    assert paths(error)[0] in {"$", "$[0]"}


@pytest.mark.parametrize("field", ["ignore_case", "literal"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_booleans_must_be_real_json_booleans(field: str, value: Any) -> None:
    error = config_error([expr(rule("(a)"), rule("(b)", **{field: value}))])
    assert paths(error) == [f"$[0].mappings[1].{field}"]


def test_invalid_regex_names_the_field() -> None:
    error = config_error([expr(rule("(ok)")), expr(rule("a", output="x"), rule("(unclosed"))])
    assert paths(error) == ["$[1].mappings[1].match"]
    assert "not a valid expression" in error.violations[0].message


@pytest.mark.parametrize("missing", ["source", "match", "output"])
def test_rule_fields_are_required(missing: str) -> None:
    r = rule("(a)")
    del r[missing]
    assert paths(config_error([expr(r)])) == [f"$[0].mappings[0].{missing}"]


def test_unknown_keys_are_ignored_with_a_warning() -> None:
    # As the reference: ignored. A misspelt key changes who maps to whom, so mepd check
    # lists each one (not "comment", which the reference's own example carries).
    doc = expr(rule("(a)", ignorecase=True))
    doc["extra"] = 1
    doc["comment"] = "for people"
    mapper = IdentityMapper.from_documents([doc])
    assert mapper.map(ids(user("u", username="A"))).username is None  # case-sensitive
    assert [(w.path, w.code) for w in mapper.warnings] == [
        ("$[0].extra", "unknown_key"),
        ("$[0].mappings[0].ignorecase", "unknown_key"),
    ]
    external = IdentityMapper.from_documents(
        [{"DATA_TYPE": EXT, "command": ["/bin/true"], "timeout": 3}]
    )
    assert [w.path for w in external.warnings] == ["$[0].timeout"]


def test_empty_mappings_list_is_refused() -> None:
    assert paths(config_error([{"DATA_TYPE": EXPR, "mappings": []}])) == ["$[0].mappings"]


@pytest.mark.parametrize(
    ("template_field", "template"),
    [
        ("output", "{0.__class__}"),
        ("output", "{username[0]}"),
        ("output", "{0!r}"),
        ("output", "{0:>10}"),
        ("output", "{}"),
        ("output", "{unclosed"),
        ("source", "{0}"),
        ("source", "{a-b}"),
    ],
)
def test_unsafe_or_malformed_templates_are_refused(template_field: str, template: str) -> None:
    r = rule("(.*)")
    r[template_field] = template
    assert paths(config_error([expr(r)])) == [f"$[0].mappings[0].{template_field}"]


def test_output_group_beyond_the_pattern_is_refused_at_load() -> None:
    assert paths(config_error([expr(rule("(a)", output="{1}"))])) == ["$[0].mappings[0].output"]
    literal = rule("a", output="{0}", literal=True)
    assert paths(config_error([expr(literal)])) == ["$[0].mappings[0].output"]


def test_external_command_must_be_a_non_empty_list_of_strings() -> None:
    for command in [[], "prog", [1], [""], None]:
        error = config_error([{"DATA_TYPE": EXT, "command": command}])
        assert paths(error)[0].startswith("$[0].command"), command


def test_external_command_may_not_be_a_relative_path() -> None:
    error = config_error([{"DATA_TYPE": EXT, "command": ["bin/mapper"]}])
    assert paths(error) == ["$[0].command[0]"]


def test_every_broken_document_is_reported() -> None:
    error = config_error([{"DATA_TYPE": "x"}, expr(rule("(a)")), expr(rule("(", output="y"))])
    assert paths(error) == ["$[0].DATA_TYPE", "$[2].mappings[0].match"]
    assert "(and 1 more)" in error.detail


# -- loading from text and files ---------------------------------------------------


def test_single_document_is_a_list_of_one() -> None:
    mapper = IdentityMapper.from_documents(expr(rule(r"(.*)@example\.org")))
    assert mapper.map(ids(user("a", username="i@example.org"))).username == "i"


def test_from_json_text_refuses_bad_json_and_duplicate_keys() -> None:
    with pytest.raises(IdentityConfigError, match="not valid JSON"):
        IdentityMapper.from_json_text("[{", source="t")
    dup = f'[{{"DATA_TYPE": "{EXT}", "DATA_TYPE": "{EXPR}", "mappings": []}}]'
    with pytest.raises(IdentityConfigError, match="duplicate key"):
        IdentityMapper.from_json_text(dup, source="t")
    with pytest.raises(IdentityConfigError, match="NaN"):
        IdentityMapper.from_json_text("[NaN]", source="t")


def test_from_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps([{"DATA_TYPE": "nope"}]))
    with pytest.raises(IdentityConfigError) as info:
        IdentityMapper.from_file(path)
    assert str(path) in info.value.detail
    with pytest.raises(IdentityConfigError, match="cannot read"):
        IdentityMapper.from_file(tmp_path / "absent.json")


def test_from_file_refuses_huge_files(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (4 * 1024 * 1024 + 1))
    with pytest.raises(IdentityConfigError, match="larger than"):
        IdentityMapper.from_file(path)


def test_config_error_is_also_an_identity_error() -> None:
    # The daemon catches IdentityError around the whole mapping step.
    assert issubclass(IdentityConfigError, IdentityError)


@pytest.mark.parametrize("name", ["expression.json", "external.json", "mixed.json"])
def test_shipped_examples_load(name: str) -> None:
    mapper = IdentityMapper.from_file(EXAMPLES / name)
    assert mapper.mappers
