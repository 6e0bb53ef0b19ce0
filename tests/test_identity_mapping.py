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
                r"(.+)\|(.+)",
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


def test_missing_field_skips_that_rule_for_that_identity_only() -> None:
    docs = [
        expr(
            rule(r"(.*)@a\.org", source="{email}"),
            rule(r"(.*)@b\.org", source="{username}"),
        )
    ]
    who = ids(user("no-email", username="erin@b.org"), user("has-email", email="frank@a.org"))
    result = mapped(docs, who)
    # Rule 0 matches the second identity (the first has no email); rule 0 wins.
    assert (result.username, result.matched_identity, result.rule) == ("frank", "has-email", 0)
    assert [c.to_dict() for c in result.candidates] == [
        {"identity": "has-email", "username": "frank", "mapper": 0, "rule": 0},
        {"identity": "no-email", "username": "erin", "mapper": 0, "rule": 1},
    ]


def test_non_string_field_counts_as_missing() -> None:
    docs = [expr(rule(r"(.*)", source="{email}"))]
    assert mapped(docs, ids(user("u1", email=None))).username is None
    assert mapped(docs, ids(user("u1", email=["a"]))).username is None


def test_empty_output_is_no_result() -> None:
    docs = [expr(rule(r"(.*)@example\.org"), rule(r".*", output="fallback"))]
    result = mapped(docs, ids(user("u1", username="@example.org")))
    assert (result.username, result.rule) == ("fallback", 1)


def test_group_that_did_not_take_part_renders_empty() -> None:
    docs = [expr(rule(r"(x)?(.*)", output="{0}{1}"))]
    assert mapped(docs, ids(user("u1", username="abc"))).username == "abc"


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
    assert "regular expression" in error.violations[0].message


@pytest.mark.parametrize("missing", ["source", "match", "output"])
def test_rule_fields_are_required(missing: str) -> None:
    r = rule("(a)")
    del r[missing]
    assert paths(config_error([expr(r)])) == [f"$[0].mappings[0].{missing}"]


def test_unknown_keys_are_refused() -> None:
    error = config_error([expr(rule("(a)", ignorecase=True))])
    assert paths(error) == ["$[0].mappings[0].ignorecase"]
    doc = expr(rule("(a)"))
    doc["extra"] = 1
    assert paths(config_error([doc])) == ["$[0].extra"]


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
