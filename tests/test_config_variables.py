"""validate_variables: bounds, reserved names, keys, schema violations; config_key."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mepcore.config import VariableLimits, config_key, validate_variables
from mepcore.errors import ConfigError, TemplateConfigError
from tests.work_budget import work_budget

SLURM_SCHEMA = {
    "type": "object",
    "properties": {
        "partition": {"enum": ["debug", "compute"]},
        "account": {"type": "string", "pattern": "^[a-z]+$"},
        "nodes": {"type": "integer", "minimum": 1, "maximum": 16},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}},
    },
    "required": ["partition", "account"],
    "additionalProperties": False,
}


def _refused(
    variables: Any, schema: dict[str, Any] | None = None, limits: VariableLimits | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate_variables(variables, schema, limits or VariableLimits())
    return info.value


def test_valid_variables_come_back_as_a_plain_copy() -> None:
    given_vars = {"partition": "debug", "account": "abc", "nodes": 2, "tags": ["x"]}
    result = validate_variables(given_vars, SLURM_SCHEMA)
    assert result == given_vars
    assert result is not given_vars
    assert result["tags"] is not given_vars["tags"]


def test_none_means_no_variables() -> None:
    assert validate_variables(None, None) == {}


@pytest.mark.parametrize("name", ["_GC", "parent_config", "user_runtime", "mapped_identity"])
def test_every_reserved_name_is_refused(name: str) -> None:
    err = _refused({name: "x", "ok": 1})
    assert err.reason == "config.reserved_variable"
    assert [v.path for v in err.violations] == [f"$.{name}"]


def test_reserved_names_only_at_top_level() -> None:
    assert validate_variables({"outer": {"_GC": 1}}, None) == {"outer": {"_GC": 1}}


def test_all_schema_violations_are_reported_with_paths() -> None:
    err = _refused(
        {"partition": "gpu", "nodes": 99, "tags": ["ok", "toolong"], "extra": 1, "other": 2},
        SLURM_SCHEMA,
    )
    assert err.reason == "config.invalid_variables"
    paths = sorted(v.path for v in err.violations)
    assert paths == ["$", "$.extra", "$.nodes", "$.other", "$.partition", "$.tags[1]"]
    by_path = {v.path: v for v in err.violations}
    assert "account" in by_path["$"].message  # required
    assert by_path["$.extra"].code == "unknown_key"
    assert err.to_public()["violations"]  # a user may see problems in their own input


@pytest.mark.parametrize(
    "key", ["a-b", "a b", "x\ny: 1", 'q"', "1abc", "", "true", "Null", "yes", "ON", "é"]
)
def test_keys_that_are_not_plain_identifiers_are_refused(key: str) -> None:
    err = _refused({"outer": {key: 1}})
    assert err.reason == "config.invalid_variables"
    assert err.violations[0].code == "invalid_key"
    assert err.violations[0].path in (f"$.outer.{key}", f"$.outer[{json.dumps(key)}]")


def test_non_string_key_and_non_json_values_are_refused() -> None:
    err = _refused({"a": {1: 2}, "b": {1, 2}, "c": float("nan"), "d": 2**70, "e": "\ud800"})
    assert {v.path for v in err.violations} == {"$.a", "$.b", "$.c", "$.d", "$.e"}


def test_top_level_must_be_an_object() -> None:
    assert _refused(["a"]).violations[0].path == "$"


def test_reserved_and_schema_problems_are_reported_together() -> None:
    err = _refused({"_GC": 1, "partition": "nope", "account": "abc"}, SLURM_SCHEMA)
    assert err.reason == "config.reserved_variable"
    assert {"$._GC", "$.partition"} <= {v.path for v in err.violations}


def _bounded_refusal(variables: Any) -> ConfigError:
    # "Quickly" as bounded work, not seconds: a refusal takes a few hundred calls and
    # kilobytes; walking a million keys or copying a 10 MB string would not fit.
    with work_budget(max_calls=10_000, max_bytes=2**20):
        return _refused(variables)


def test_a_ten_megabyte_string_is_refused_quickly() -> None:
    err = _bounded_refusal({"s": "x" * 10_000_000})
    assert err.reason == "config.variables_too_large"
    assert err.violations[-1].path == "$.s"


def test_depth_one_thousand_is_refused_quickly_without_recursion_error() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(1000):
        child: dict[str, object] = {}
        node["a"] = child
        node = child
    err = _bounded_refusal(deep)
    assert err.reason == "config.variables_too_large"
    assert "nested deeper" in err.violations[-1].message
    # lists too
    deep_list: list[object] = []
    cur = deep_list
    for _ in range(1000):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    assert _bounded_refusal({"l": deep_list}).reason == "config.variables_too_large"


def test_a_million_keys_are_refused_quickly() -> None:
    many = {f"k{i}": i for i in range(1_000_000)}
    err = _bounded_refusal(many)
    assert err.reason == "config.variables_too_large"
    nested = _bounded_refusal({"outer": many})
    assert nested.reason == "config.variables_too_large"


def test_total_size_and_items_limits_are_configurable() -> None:
    limits = VariableLimits(max_total_bytes=100, max_items=3)
    assert _refused({"a": "x" * 200}, limits=limits).reason == "config.variables_too_large"
    assert _refused({"a": [1, 2, 3, 4]}, limits=limits).reason == "config.variables_too_large"
    assert validate_variables({"a": [1, 2, 3]}, None, limits) == {"a": [1, 2, 3]}
    with pytest.raises(ValueError, match="positive"):
        VariableLimits(max_depth=0)


def test_an_invalid_schema_is_a_site_error() -> None:
    with pytest.raises(TemplateConfigError) as info:
        validate_variables({}, {"type": "no-such-type"})
    assert info.value.reason == "config.schema_invalid"


def test_config_key_is_stable_and_separates_inputs() -> None:
    key = config_key("alice", "d1", {"b": 1, "a": [1, "x"]})
    assert key == config_key("alice", "d1", {"a": [1, "x"], "b": 1})
    assert len(key) == 64
    assert key != config_key("bob", "d1", {"b": 1, "a": [1, "x"]})
    assert key != config_key("alice", "d2", {"b": 1, "a": [1, "x"]})
    assert key != config_key("alice", "d1", {"b": 2, "a": [1, "x"]})
    # no concatenation ambiguity between the parts
    assert config_key("ab", "c", {}) != config_key("a", "bc", {})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.from_regex(r"k[a-z0-9_]{0,8}", fullmatch=True), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.from_regex(r"v[a-z0-9_]{0,8}", fullmatch=True), json_values, max_size=5))
def test_property_valid_json_round_trips_and_keys_ignore_order(
    variables: dict[str, object],
) -> None:
    plain = {k: v for k, v in variables.items()}
    result = validate_variables(plain, None)
    assert json.dumps(result, sort_keys=True) == json.dumps(plain, sort_keys=True)
    shuffled = dict(reversed(list(plain.items())))
    assert config_key("u", "d", shuffled) == config_key("u", "d", plain)
