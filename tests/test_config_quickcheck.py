"""``certainly_valid`` (mepcore.config.quickcheck) never vouches for what jsonschema refuses.

Its whole contract is soundness: ``True`` implies jsonschema finds no error. Hypothesis
generates documents shaped like endpoint configurations — the schema's own keys, engine,
provider and launcher types and enum words, values at and around the bounds, floats
where integers are asked for, NaN and infinities, unknown keys, wrong types — and each
one is checked against jsonschema's Draft 2020-12 validator on the same schema. The
configurations the project documents must pass the quick check (else the fast path
would never be taken and a start would import jsonschema after all).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mepcore.config import ENGINE_TYPES, LAUNCHER_TYPES, PROVIDER_TYPES, endpoint_config_schema
from mepcore.config.quickcheck import certainly_valid

SCHEMA = endpoint_config_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _walk(schema: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(schema, dict):
        for key, value in schema.items():
            yield key, value
            if key == "properties":
                for name, sub in value.items():
                    yield "name", name
                    yield from _walk(sub)
            else:
                yield from _walk(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _walk(item)


NAMES = sorted({v for k, v in _walk(SCHEMA) if k == "name"} | {"unknown_key", "high_assurance"})
WORDS = sorted(
    {v for k, v in _walk(SCHEMA) if k == "const" and isinstance(v, str)}
    | {w for k, v in _walk(SCHEMA) if k == "enum" for w in v if isinstance(w, str)}
    | {"", "x", "00:10:00", "1-00:00:00", "25:99", "127.0.0.1", "a" * 257}
)
BOUNDS = sorted(
    {v for k, v in _walk(SCHEMA) if k in ("minimum", "maximum", "exclusiveMinimum")}
    | {0, 1, 2, -1, 2**63}
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(BOUNDS),
    st.sampled_from(BOUNDS).map(lambda b: b + 1),
    st.sampled_from(BOUNDS).map(lambda b: b - 1),
    st.sampled_from(BOUNDS).map(float),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=5),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(NAMES), inner, max_size=4),
    ),
    max_leaves=8,
)


def typed(types: tuple[str, ...], inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """An object with a ``type`` (usually a real one) and some of the schema's keys."""
    return st.builds(
        lambda kind, rest: {"type": kind, **rest} if kind is not None else rest,
        st.one_of(st.sampled_from(types), st.sampled_from(WORDS), st.none()),
        st.dictionaries(st.sampled_from(NAMES), inner, max_size=5),
    )


launchers = typed(LAUNCHER_TYPES, values)
providers = typed(PROVIDER_TYPES, st.one_of(values, launchers))
engines = typed(ENGINE_TYPES, st.one_of(values, providers))
documents = st.dictionaries(st.sampled_from(NAMES), st.one_of(values, engines), max_size=6)


VALID = [
    {},
    {"engine": {"type": "ThreadPoolEngine", "max_workers": 4}, "heartbeat_period": 30},
    {
        "display_name": "cluster",
        "engine": {"type": "ProcessPoolEngine", "max_workers": 2, "prefetch": 10},
        "idle_heartbeats_soft": 100,
        "idle_heartbeats_hard": 10000,
        "endpoint_setup": "module load python",
        "allowed_functions": ["a" * 64, "b" * 64],
    },
    {
        "engine": {
            "type": "GlobusComputeEngine",
            "max_workers_per_node": 2,
            "strategy": "simple",
            "provider": {
                "type": "SlurmProvider",
                "partition": "debug",
                "nodes_per_block": 1,
                "walltime": "00:10:00",
                "launcher": {"type": "SrunLauncher"},
            },
        }
    },
]


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _paths(sub, (*path, key))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            yield from _paths(sub, (*path, index))


def _mutated(base: dict[str, Any], path: tuple[Any, ...], key: str, value: Any) -> Any:
    """``base`` with the value at ``path`` replaced by ``value`` (or, for a mapping,
    ``key`` set to it): a near-valid document, where single bounds and types matter."""
    document = copy.deepcopy(base)
    if not path:
        document[key] = value
        return document
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    target = parent[path[-1]]
    if isinstance(target, dict) and key != "":
        target[key] = value
    else:
        parent[path[-1]] = value
    return document


mutations = st.sampled_from(VALID).flatmap(
    lambda base: st.builds(
        _mutated,
        st.just(base),
        st.sampled_from(list(_paths(base))),
        st.sampled_from(["", *NAMES]),
        st.one_of(values, st.sampled_from(BOUNDS)),
    )
)


def _agrees(document: Any) -> None:
    if certainly_valid(SCHEMA, document):
        errors = [e.message for e in VALIDATOR.iter_errors(document)]
        assert errors == [], f"vouched for an invalid document: {errors}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_certainly_valid_only_when_jsonschema_agrees(document: dict[str, Any]) -> None:
    _agrees(document)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations)
def test_near_valid_documents(document: dict[str, Any]) -> None:
    _agrees(document)


@pytest.mark.parametrize("document", VALID)
def test_documented_configurations_take_the_quick_path(document: dict[str, Any]) -> None:
    assert not list(VALIDATOR.iter_errors(document))
    assert certainly_valid(SCHEMA, document)


@pytest.mark.parametrize(
    "document",
    [
        {"engine": {"type": "ThreadPoolEngine", "max_workers": 0}},
        {"engine": {"type": "ThreadPoolEngine", "max_workers": 2.0}},  # jsonschema decides
        {"engine": {"type": "NoSuchEngine"}},
        {"heartbeat_period": float("nan")},
        {"allowed_functions": ["a", "a"]},
        {"surprise": 1},
        {"engine": {"type": "GlobusComputeEngine", "provider": {"type": "SlurmProvider", "x": 1}}},
    ],
)
def test_anything_else_goes_to_jsonschema(document: dict[str, Any]) -> None:
    assert not certainly_valid(SCHEMA, document)
